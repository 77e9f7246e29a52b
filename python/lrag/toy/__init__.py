"""The toy world: procedural clips whose continuation needs memory, and ground-truth metrics of rollouts
(docs/toy_world.md). numpy only; frames are used directly as latents."""
from lrag.toy.metrics import (background_error, bootstrap_ci, colour_drift, hit_rate_chance, identity_error,
                              mean_colour, nearest_view_error, palette_error, retrieval_hit_rate, revisit_error,
                              rollout_metrics, selection_from_log)
from lrag.toy.world import SHAPES, ClipMeta, WorldConfig, make_clip, sample_windows

__all__ = ["SHAPES", "ClipMeta", "WorldConfig", "make_clip", "sample_windows", "background_error", "bootstrap_ci",
           "colour_drift", "hit_rate_chance", "identity_error", "mean_colour", "nearest_view_error", "palette_error",
           "retrieval_hit_rate", "revisit_error", "rollout_metrics", "selection_from_log"]
