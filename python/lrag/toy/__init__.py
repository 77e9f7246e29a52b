"""The toy world: procedural clips whose continuation needs memory, and ground-truth metrics of rollouts
(docs/toy_world.md). numpy only; frames are used directly as latents.

Also the trained toy generator shipped with the package (:mod:`lrag.toy.shipped`): ``shipped_generator_path()``
and ``load_shipped_generator(device)``, both checked against the sha256 of the trainer's card.
"""
from lrag.toy.metrics import (background_error, bootstrap_ci, colour_drift, hit_rate_chance, identity_error,
                              mean_colour, nearest_view_error, palette_error, retrieval_hit_rate, revisit_error,
                              rollout_metrics, selection_from_log)
from lrag.toy.shipped import ShippedWeightsError, load_shipped_generator, shipped_generator_path
from lrag.toy.world import SHAPES, ClipMeta, WorldConfig, make_clip, sample_windows

__all__ = ["SHAPES", "ClipMeta", "WorldConfig", "make_clip", "sample_windows", "background_error", "bootstrap_ci",
           "colour_drift", "hit_rate_chance", "identity_error", "mean_colour", "nearest_view_error", "palette_error",
           "retrieval_hit_rate", "revisit_error", "rollout_metrics", "selection_from_log", "ShippedWeightsError",
           "load_shipped_generator", "shipped_generator_path"]
