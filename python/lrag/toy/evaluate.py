"""Evaluate a toy generator: long rollouts from a ground-truth prefix, in modes of equal attention budget, scored
against the world's ground truth (docs/toy_eval.md).

    python -m lrag.toy.evaluate --weights RUN/toy_generator.safetensors --out RUN/eval [--seeds 0-19] [--blocks 40]
    lrag eval ...                           (the same)

Every mode continues the same ground-truth prefix of each clip (``--prefix-blocks``, default: the longest period
plus one frame, rounded up to blocks, so every place of the loop is in the prefix) with the same noise, the same
weights, the same sampler and the same number of attended frames per block (the model's window, 12):

- ``window``: a sliding window without a sink (the model run with ``sink = 0``): the 12 most recent frames;
- ``sink``: the native schedule the toy was trained with: the sink (frame 0) + the 11 most recent frames;
- ``rag``: LongLive-RAG's reference policy: the sink + K = 6 retrieved frames (cosine top-k of the spatial-mean
  descriptor, recency guard R = 5, every retrieved frame at the sink's temporal position 0) + the 5 most recent;
- ``rag-best``: LongLive-RAG with the policy (embedder, K, R, memory position) that scored best on the validation
  seeds (``--val-seeds``, disjoint from the test seeds) among a small grid (``--grid-*``).

Metrics (:func:`lrag.toy.metrics.rollout_metrics`, plus identity over returns after ``window`` frames out of
view) per rollout; per mode the mean and a 95 % bootstrap interval over the test seeds, the paired difference to
``--baseline`` per seed with its interval, the retrieval hit rate with its chance level, and per-block curves.
One longer run (``--long-blocks`` on ``--long-seed``) in every mode. Outputs in ``--out``: ``report.json`` and
``curves_test.png`` / ``curves_long.png`` (when matplotlib is installed).

Errors in the options exit with status 2 and ``<prog>: error: <message naming the option>`` before anything is
generated or written.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

import lrag_ext
from lrag.block_memory import config_for_streams
from lrag.models.wan import CausalWanModel
from lrag.pipeline import SAMPLERS, BlockResult
from lrag.toy.metrics import (background_error, bootstrap_ci, colour_drift, hit_rate_chance, identity_error,
                              nearest_view_error, palette_error, retrieval_hit_rate, revisit_error, rollout_metrics,
                              selection_from_log)
from lrag.toy.sample import rollout
from lrag.toy.train import VAL_SEED, OptionError, ToyConfig, load_toy_generator
from lrag.toy.world import ClipMeta, make_clip
from lrag_ext.memory_format import sha256_file
from lrag_ext.positions import check_policy
from lrag_ext.progress import ProgressLine
from lrag_ext.reference import mean_descriptor
from lrag_ext.state_dicts import InputFileError, check_output_dir, check_regular_file, parse_device

PROG = "python -m lrag.toy.evaluate"
REPORT_FORMAT = "lrag-toy-eval/1"
REPORT_NAME = "report.json"
MODES = ("window", "sink", "rag", "rag-best")
TEST_SEEDS = "0-19"                   # the trainer leaves clip seeds 0..999 to the evaluation
VAL_SEEDS = f"{VAL_SEED}-{VAL_SEED + 9}"   # the trainer's validation clips: tuning happens there, never on test
RESERVED = (VAL_SEED, 2 * VAL_SEED)   # validation / sink-probe clips of the trainer: never test seeds
# Every error metric (lower is better); the hit rate is higher-is-better and not a selection criterion.
ERROR_METRICS = ("revisit_truth", "revisit_self", "identity_truth", "identity_self", "identity_truth_far",
                 "identity_self_far", "colour_drift", "background_error", "nearest_view_error", "palette_error")
RAG_METRICS = ("hit_rate", "hit_rate_chance")
CURVES = ("revisit_truth", "revisit_self", "nearest_view_error", "palette_error", "background_error",
          "colour_drift", "hit_rate")
BOOTSTRAP = dict(n=10000, seed=0, level=0.95)


# ------------------------------------------------------------------------------------------------- policies, modes
def grid_descriptor(x: torch.Tensor, grid: int) -> torch.Tensor:
    """A parameter-free retrieval key: the frame average-pooled to ``grid x grid`` cells, flattened
    (``[N, C, H, W] -> [N, C * grid^2]`` float32, not normalised; retrieval normalises it)."""
    return torch.nn.functional.adaptive_avg_pool2d(x.float(), grid).flatten(1)


def make_embedder(spec: str, channels: int, size: int, device="cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """The frame embedder named by ``spec``: ``"mean"`` (the reference's fallback, the spatial mean colour),
    ``"pool<g>"`` (:func:`grid_descriptor` with ``g x g`` cells, ``1 <= g <= size``) or the path of a trained
    embedder checkpoint (:func:`lrag_ext.embedder.load_embedder`, for ``[N, channels, size, size]`` frames).

    Raises:
        ValueError: an unknown spec, a grid out of range, or an embedder that cannot embed these frames;
        FileNotFoundError, InputFileError: an unusable checkpoint.
    """
    if spec == "mean":
        return mean_descriptor
    m = re.fullmatch(r"pool(\d+)", spec)
    if m:
        grid = int(m.group(1))
        if not 1 <= grid <= size:
            raise ValueError(f"embedder {spec!r}: the grid must be in [1, {size}]")
        return functools.partial(grid_descriptor, grid=grid)
    if not (os.sep in spec or spec.endswith((".pt", ".pth", ".safetensors"))):
        raise ValueError(f"embedder {spec!r} is not 'mean', 'pool<g>' or the path of an embedder checkpoint")
    from lrag_ext.embedder.checkpoint import check_embedder, check_embedder_input, load_embedder  # noqa: PLC0415
    check_embedder_input(check_embedder(spec), channels, size, size)
    return load_embedder(spec, map_location=device).embed


@dataclass(frozen=True)
class Policy:
    """A LongLive-RAG retrieval policy: the embedder (:func:`make_embedder` spec), K, R and the temporal RoPE
    position of retrieved frames (:mod:`lrag_ext.positions`)."""

    embedder: str = "mean"
    top_k: int = 6
    recent_exclude: int = 5
    memory_position: object = 0

    @property
    def name(self) -> str:
        return f"{self.embedder}/K{self.top_k}/R{self.recent_exclude}/pos{self.memory_position}"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "name": self.name}

    def memory_config(self, streams: int, frames: int) -> lrag_ext.MemoryConfig:
        """The memory of one rollout batch: ``streams`` streams of ``frames`` frames, every frame on the model's
        device (:func:`lrag.block_memory.config_for_streams`)."""
        return config_for_streams(lrag_ext.MemoryConfig(top_k=self.top_k, recent_exclude=self.recent_exclude,
                                                        memory_position=self.memory_position), streams, frames)


REFERENCE = Policy()   # the release's policy, with its fallback descriptor (the spatial mean colour)


@dataclass(frozen=True)
class Mode:
    """How a rollout attends: ``sink`` sink frames, and retrieval with ``policy`` (None: native)."""

    name: str
    sink: int
    policy: Optional[Policy] = None

    def attended(self, window: int) -> dict:
        """Frames attended by a block at steady state: ``{"sink", "retrieved", "local"}`` (local includes the
        block's own frames); they sum to ``window``, the attention budget, in every mode."""
        k = self.policy.top_k if self.policy else 0
        return {"sink": self.sink, "retrieved": k, "local": window - self.sink - k}

    def describe(self, window: int) -> dict:
        return {"attended": self.attended(window), "policy": self.policy.to_dict() if self.policy else None}


def base_modes(cfg: ToyConfig) -> dict[str, Mode]:
    """The modes whose definition does not depend on validation (``rag-best`` is :func:`select_policy`'s)."""
    return {"window": Mode("window", 0), "sink": Mode("sink", cfg.sink), "rag": Mode("rag", cfg.sink, REFERENCE)}


def default_prefix_blocks(cfg: ToyConfig) -> int:
    """The ground-truth prefix every rollout continues, in blocks: the longest period + 1 frame, rounded up to
    whole blocks, so that every place of the loop is in the prefix (11 blocks = 33 frames by default)."""
    return -(-(cfg.world.period[1] + 1) // cfg.frames_per_block)


def with_sink(model: CausalWanModel, sink: int) -> CausalWanModel:
    """``model`` itself, or a copy of its weights whose cache keeps ``sink`` sink frames (the window's size, the
    attention budget, unchanged)."""
    if sink == model.cfg.sink:
        return model
    other = CausalWanModel(dataclasses.replace(model.cfg, sink=sink))
    other.load_state_dict(model.state_dict())
    return other.to(device=model.device, dtype=model.dtype).eval()


# ------------------------------------------------------------------------------------------------- rollouts, scores
def seed_noise(seed: int, num_frames: int, shape: Sequence[int]) -> torch.Tensor:
    """``[num_frames, *shape]`` float32 initial noise of clip ``seed``: the same in every mode."""
    return torch.randn((num_frames, *shape), generator=torch.Generator().manual_seed(int(seed)))


def block_curves(x: np.ndarray, meta: ClipMeta, start: int, frames_per_block: int,
                 memory_log: Optional[list] = None, stream: int = 0) -> dict:
    """Per generated block ``[s, s + F)`` (``s >= start``) of the float64 rollout ``x``: the metrics of
    :mod:`lrag.toy.metrics` restricted to the block (``revisit_*``, ``nearest_view_error``, ``palette_error``,
    ``background_error``), ``colour_drift`` of the rollout up to the block's end (NaN before one period), and
    the block's retrieval hit rate (NaN without retrieval). Lists of floats, NaN where undefined."""
    F, P = frames_per_block, meta.period
    picked = dict(zip(*selection_from_log(memory_log, stream))) if memory_log else {}
    out = {name: [] for name in CURVES}
    for s in range(start, len(x), F):
        e = s + F
        out["revisit_truth"].append(revisit_error(x[:e], meta, s, "truth"))
        out["revisit_self"].append(revisit_error(x[:e], meta, s, "self") if max(s, P) < e else math.nan)
        out["nearest_view_error"].append(nearest_view_error(x[:e], meta, s))
        out["palette_error"].append(palette_error(x[:e], meta, s))
        out["background_error"].append(background_error(x[:e], meta, s))
        out["colour_drift"].append(colour_drift(x[:e], meta) if e >= P else math.nan)
        ids = picked.get(s)
        out["hit_rate"].append(retrieval_hit_rate(meta, [s], [ids], F) if ids else math.nan)
    return out


def score(frames, meta: ClipMeta, start: int, frames_per_block: int, window: int,
          memory_log: Optional[list] = None, stream: int = 0) -> dict:
    """One rollout's record: ``{"seed", "period", "metrics", "curves"}``. ``metrics``: :func:`rollout_metrics`
    (with the hit rate and its chance level when ``memory_log`` is given: over the generated blocks' retrievals
    only, those of the prefix blocks are left out) plus ``identity_*_far``, identity over returns after at least
    ``window`` frames out of view (objects that left the attention window)."""
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu().double().numpy()
    x = np.asarray(frames, dtype=np.float64)
    if memory_log is not None:
        memory_log = [rec for rec in memory_log if rec["query_frame"] >= start]
    metrics = rollout_metrics(x, meta, start, memory_log, stream, frames_per_block)
    metrics["identity_truth_far"] = identity_error(x, meta, start, "truth", min_gap=window)
    metrics["identity_self_far"] = identity_error(x, meta, start, "self", min_gap=window)
    return {"seed": meta.seed, "period": meta.period, "metrics": metrics,
            "curves": block_curves(x, meta, start, frames_per_block, memory_log, stream)}


@dataclass
class Setup:
    """What every rollout of an evaluation shares."""

    model: CausalWanModel
    config: ToyConfig
    prefix_blocks: int
    steps: int = 16
    sampler: str = "euler"
    batch: int = 20

    @property
    def prefix_frames(self) -> int:
        return self.prefix_blocks * self.config.frames_per_block


def rollouts(setup: Setup, mode: Mode, seeds: Sequence[int], blocks: int,
             on_block: Optional[Callable[[], None]] = None,
             callback: Optional[Callable[[BlockResult], None]] = None) -> Iterator[tuple]:
    """Rolls out ``blocks`` blocks after the prefix of every clip ``seeds`` in ``mode``, ``setup.batch`` clips per
    generation (one memory stream each). Yields per batch ``(result, clips, seconds)``: the
    :class:`~lrag.pipeline.GenerationResult`, the ``(frames, meta)`` of its clips and the wall seconds it took.
    ``on_block`` is called after every generated block (prefix blocks are not counted); ``callback`` with every
    block's :class:`~lrag.pipeline.BlockResult`, prefix blocks included (e.g. to stream a video: ``lrag generate
    --demo``)."""
    cfg, model = setup.config, with_sink(setup.model, mode.sink)
    F, P0 = cfg.frames_per_block, setup.prefix_frames
    T = P0 + blocks * F
    embed = make_embedder(mode.policy.embedder, cfg.world.channels, cfg.world.size, model.device) \
        if mode.policy else None
    for i in range(0, len(seeds), setup.batch):
        chunk = [int(s) for s in seeds[i:i + setup.batch]]
        clips = [make_clip(seed, T, cfg.world) for seed in chunk]
        prefix = torch.from_numpy(np.stack([frames[:P0] for frames, _ in clips]))
        noise = torch.stack([seed_noise(seed, T, prefix.shape[2:]) for seed in chunk])
        retrieval = mode.policy.memory_config(len(chunk), T) if mode.policy else None

        def each_block(blk: BlockResult) -> None:
            if callback is not None:
                callback(blk)
            if on_block is not None and blk.start_frame >= P0:
                on_block()

        t0 = time.perf_counter()
        # the re-noise of the "renoise" sampler (the Euler sampler draws none): the same stream in every mode
        renoise = torch.Generator().manual_seed(chunk[0])
        res = rollout(model, prefix, T, setup.steps, setup.sampler, mode="rag" if mode.policy else "native",
                      position_mode=cfg.position_mode, generator=renoise, noise=noise, retrieval=retrieval,
                      embed=embed, callback=each_block if on_block or callback else None)
        yield res, clips, time.perf_counter() - t0


def run_mode(setup: Setup, mode: Mode, seeds: Sequence[int], blocks: int,
             on_block: Optional[Callable[[], None]] = None,
             callback: Optional[Callable[[BlockResult], None]] = None) -> tuple[list[dict], float]:
    """:func:`rollouts` (``on_block``, ``callback`` as there), scored (:func:`score`): the records in seed order and
    the wall seconds spent generating."""
    cfg, records, seconds = setup.config, [], 0.0
    for res, clips, wall in rollouts(setup, mode, seeds, blocks, on_block, callback):
        log = res.memory_log if mode.policy else None
        records += [score(res.latents[j], meta, setup.prefix_frames, cfg.frames_per_block, cfg.window, log, j)
                    for j, (_, meta) in enumerate(clips)]
        seconds += wall
    return records, seconds


# ------------------------------------------------------------------------------------------------- aggregation
def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def interval(values: Sequence[float]) -> dict:
    """``{"mean", "low", "high", "n"}``: :func:`bootstrap_ci` over the finite values (``n`` of them; all None
    when there is none)."""
    v = _finite(values)
    if not v:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean, low, high = bootstrap_ci(v, **BOOTSTRAP)
    return {"mean": mean, "low": low, "high": high, "n": len(v)}


def paired(values: Sequence[float], base: Sequence[float]) -> dict:
    """The paired difference ``values[i] - base[i]`` per seed (seeds where either is NaN left out): its
    :func:`interval` and the differences themselves."""
    diffs = [a - b for a, b in zip(values, base) if math.isfinite(a) and math.isfinite(b)]
    return {**interval(diffs), "diffs": diffs}


def summarise(records: dict[str, list[dict]], baseline: Optional[str] = None) -> dict:
    """Aggregates the records of each mode (the same seeds, in the same order, in every mode): per metric the
    mean and bootstrap interval over seeds with the per-seed values, the paired difference to ``baseline`` (when
    given and present), and the per-block curves averaged over seeds (NaN-aware)."""
    seeds = {mode: [r["seed"] for r in recs] for mode, recs in records.items()}
    if len({tuple(s) for s in seeds.values()}) > 1:
        raise ValueError(f"the modes were run on different seeds: {seeds}")
    out = {"seeds": next(iter(seeds.values()), []), "metrics": {}, "paired": {}, "curves": {}}
    for mode, recs in records.items():
        names = list(recs[0]["metrics"]) if recs else []
        out["metrics"][mode] = {m: {**interval([r["metrics"][m] for r in recs]),
                                    "values": [r["metrics"][m] for r in recs]} for m in names}
        if baseline in records and mode != baseline:
            base = records[baseline]
            out["paired"][mode] = {m: paired([r["metrics"][m] for r in recs], [r["metrics"][m] for r in base])
                                   for m in names if m in base[0]["metrics"] and m not in RAG_METRICS}
        curves = {}
        for name in CURVES:
            stack = np.array([r["curves"][name] for r in recs], dtype=np.float64)   # [seeds, blocks]
            ok = np.isfinite(stack)
            count = ok.sum(axis=0)
            mean = np.where(ok, stack, 0.0).sum(axis=0) / np.maximum(count, 1)
            curves[name] = [float(v) if c else math.nan for v, c in zip(mean, count)]
        out["curves"][mode] = curves
    return out


def select_policy(setup: Setup, grid: Sequence[Policy], seeds: Sequence[int], blocks: int, metric: str,
                  on_block: Optional[Callable[[], None]] = None) -> tuple[Policy, dict]:
    """Runs every policy of ``grid`` on the validation ``seeds`` and picks the one with the lowest mean
    ``metric`` (the first of equals; a policy whose metric is undefined on every seed is never picked, the first
    of the grid is when none has a score). Returns the policy and ``{"metric", "seeds", "blocks", "candidates":
    [{"policy", "score", "hit_rate"}], "chosen"}``."""
    candidates, best = [], None
    for policy in grid:
        recs, _ = run_mode(setup, Mode("rag-best", setup.config.sink, policy), seeds, blocks, on_block)
        cand = {"policy": policy.to_dict(), "score": interval([r["metrics"][metric] for r in recs]),
                "hit_rate": interval([r["metrics"]["hit_rate"] for r in recs])}
        candidates.append(cand)
        if cand["score"]["mean"] is not None and (best is None or cand["score"]["mean"] < best[1]):
            best = (policy, cand["score"]["mean"])
    chosen = best[0] if best else grid[0]
    return chosen, {"metric": metric, "seeds": [int(s) for s in seeds], "blocks": blocks, "candidates": candidates,
                    "chosen": chosen.to_dict()}


# ------------------------------------------------------------------------------------------------- plots
def plot_curves(curves: dict[str, dict], path: str, first_frame: int, frames_per_block: int, title: str,
                chance: Optional[float] = None) -> str:
    """One panel per curve (``CURVES``), one line per mode (a fixed colour per mode; ``rag-best`` dashed, as it
    may coincide with ``rag``) against the block's first latent frame; ``chance``: the hit rate's chance level
    (a grey line)."""
    import matplotlib  # noqa: PLC0415  (optional dependency)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(2, 4, figsize=(16, 7), dpi=90)
    for ax, name in zip(axes.flat, CURVES):
        for mode, c in curves.items():
            y = np.array(c[name], dtype=np.float64)
            if np.isfinite(y).any():
                ax.plot(first_frame + frames_per_block * np.arange(len(y)), y, label=mode, lw=1.2,
                        color=f"C{MODES.index(mode) if mode in MODES else len(MODES)}",
                        ls="--" if mode == "rag-best" else "-")
        if name == "hit_rate" and chance is not None:
            ax.axhline(chance, color="0.6", ls=":", lw=1, label="chance")
            ax.legend(fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("latent frame")
    axes.flat[0].legend(fontsize=8)
    for ax in list(axes.flat)[len(CURVES):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------- command line
def parse_seeds(text: str, option: str) -> list[int]:
    """``"0-19"``, ``"3,5,8"`` or a mix (``"0-4,10"``): distinct non-negative ints, in the given order."""
    seeds = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise OptionError(f"{option} must be seeds such as 0-19 or 3,5,8 (ranges low-high), got {text!r}")
        lo = int(m.group(1))
        seeds += range(lo, int(m.group(2) if m.group(2) is not None else lo) + 1)
    if len(set(seeds)) != len(seeds):
        raise OptionError(f"{option} lists a seed twice: {text!r}")
    return seeds


def _list(text: str, option: str, kind=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise OptionError(f"{option} must be a comma-separated list, got {text!r}")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise OptionError(f"{option} must be a comma-separated list of {kind.__name__}, got {text!r}") from None


def _position(text: str):
    return int(text) if text.isdigit() else text


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="toy generator (toy_generator.safetensors of lrag train-toy)")
    p.add_argument("--out", required=True, help="output folder (report.json, curves_*.png)")
    p.add_argument("--seeds", default=TEST_SEEDS, help=f"test clip seeds (default {TEST_SEEDS}; not in "
                   f"{RESERVED[0]}-{RESERVED[1] - 1}, the trainer's validation and probe clips)")
    p.add_argument("--val-seeds", default=VAL_SEEDS,
                   help=f"validation clip seeds that choose rag-best (default {VAL_SEEDS}; disjoint from --seeds)")
    p.add_argument("--blocks", type=int, default=40, help="blocks generated after the prefix (default 40)")
    p.add_argument("--long-blocks", type=int, default=200, help="blocks of the one long run (0: none; default 200)")
    p.add_argument("--long-seed", type=int, default=None, help="clip seed of the long run (default: the first "
                   "test seed)")
    p.add_argument("--prefix-blocks", type=int, default=None, help="ground-truth blocks every rollout continues "
                   "(default: the longest period + 1 frame, rounded up to blocks)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's sample_steps)")
    p.add_argument("--sampler", choices=SAMPLERS, default="euler", help="euler (the toy is not distilled) or renoise")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--baseline", default="sink", help="mode the paired differences are taken against")
    p.add_argument("--select-metric", default="revisit_truth", choices=ERROR_METRICS, metavar="METRIC",
                   help="validation metric that chooses rag-best, lower is better (default revisit_truth; any of "
                        f"{', '.join(ERROR_METRICS)})")
    p.add_argument("--grid-embedders", default="mean,pool4",
                   help="rag-best candidates: embedders (mean, pool<g>, or embedder checkpoint paths)")
    p.add_argument("--grid-k", default="3,6", help="rag-best candidates: frames retrieved per block")
    p.add_argument("--grid-r", default="5", help="rag-best candidates: recency guard (evicted frames never retrieved)")
    p.add_argument("--grid-positions", default="0,ordered",
                   help="rag-best candidates: temporal position of retrieved frames (int, ordered, absolute)")
    p.add_argument("--batch", type=int, default=20, help="clips generated together (one memory stream each)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-plots", action="store_true", help="write report.json only")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p.parse_args(argv)


@dataclass
class Plan:
    """The checked options of an evaluation."""

    setup: Setup
    modes: list[str]
    seeds: list[int]
    val_seeds: list[int]
    blocks: int
    long_blocks: int
    long_seed: int
    baseline: Optional[str]
    select_metric: str
    grid: list[Policy]
    weights: dict
    device: torch.device


def _check_range(args, option: str, lo: int, hi: Optional[int] = None) -> None:
    value = getattr(args, option)
    if value is not None and not (value >= lo and (hi is None or value <= hi)):
        raise OptionError(f"--{option.replace('_', '-')} must be " + (f">= {lo}" if hi is None else
                                                                       f"in [{lo}, {hi}]") + f", got {value}")


def prepare(args: argparse.Namespace, model: Optional[CausalWanModel] = None,
            config: Optional[ToyConfig] = None) -> Plan:
    """Checks every option and loads ``--weights`` (or takes ``model`` with its ``config``, e.g. an untrained
    toy model in tests: ``--weights`` is then only recorded). Generates and writes nothing.

    Raises:
        OptionError, FileNotFoundError, InputFileError: naming the option or file.
    """
    for option, lo, hi in (("blocks", 1, None), ("long_blocks", 0, None), ("long_seed", 0, None),
                           ("prefix_blocks", 1, None), ("steps", 1, 1000), ("batch", 1, None), ("threads", 0, None)):
        _check_range(args, option, lo, hi)
    modes = _list(args.modes, "--modes")
    if any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise OptionError(f"--modes must be distinct names among {', '.join(MODES)}, got {args.modes!r}")
    if args.baseline not in modes:
        raise OptionError(f"--baseline {args.baseline!r} must be one of --modes ({', '.join(modes)})")
    seeds, val_seeds = parse_seeds(args.seeds, "--seeds"), parse_seeds(args.val_seeds, "--val-seeds")
    reserved = [s for s in seeds if RESERVED[0] <= s < RESERVED[1]]
    if reserved:
        raise OptionError(f"--seeds must not use {RESERVED[0]}-{RESERVED[1] - 1} (the trainer's validation and "
                          f"probe clips), got {reserved[:5]}")
    shared = sorted(set(seeds) & set(val_seeds))
    if shared and "rag-best" in modes:
        raise OptionError(f"--seeds and --val-seeds must be disjoint (rag-best is chosen on --val-seeds), both "
                          f"have {shared[:5]}")
    if args.long_seed is not None and (RESERVED[0] <= args.long_seed < RESERVED[1] or
                                       ("rag-best" in modes and args.long_seed in val_seeds)):
        raise OptionError(f"--long-seed {args.long_seed} is a validation seed (--val-seeds, or "
                          f"{RESERVED[0]}-{RESERVED[1] - 1}); use a held-out one")
    try:
        device = parse_device(args.device, "--device")
        check_output_dir(args.out, "--out")
    except ValueError as e:
        raise OptionError(str(e)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = {"path": args.weights, "sha256": None}
    if model is None:
        check_regular_file(args.weights, "--weights")
        model, config = load_toy_generator(args.weights, device)
        weights["sha256"] = sha256_file(args.weights)
    else:
        model = model.to(device).eval()
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().float().numpy().tobytes())
    weights["state_sha256"] = digest.hexdigest()   # of the weights as evaluated, whatever file they came from
    cfg = config
    F = cfg.frames_per_block
    prefix_blocks = args.prefix_blocks or default_prefix_blocks(cfg)
    grid = []
    if "rag-best" in modes:
        embedders = _list(args.grid_embedders, "--grid-embedders")
        for spec in embedders:
            try:
                make_embedder(spec, cfg.world.channels, cfg.world.size, "cpu")
            except (ValueError, FileNotFoundError) as e:
                raise OptionError(f"--grid-embedders: {e}") from None
        ks = _list(args.grid_k, "--grid-k", int)
        k_max = cfg.window - cfg.sink - F     # the local window must still hold the block's own frames
        if any(not 1 <= k <= k_max for k in ks):
            raise OptionError(f"--grid-k values must be in [1, {k_max}] (window - sink - frames_per_block), got "
                              f"{args.grid_k!r}")
        rs = _list(args.grid_r, "--grid-r", int)
        if any(r < 0 for r in rs):
            raise OptionError(f"--grid-r values must be >= 0, got {args.grid_r!r}")
        positions = [_position(p) for p in _list(args.grid_positions, "--grid-positions")]
        for pos in positions:
            try:
                check_policy(pos, "--grid-positions")
            except ValueError as e:
                raise OptionError(str(e)) from None
        grid = [Policy(e, k, r, pos) for e in embedders for k in ks for r in rs for pos in positions]
        grid.sort(key=lambda p: p != REFERENCE)   # the reference first: it wins ties
    setup = Setup(model, cfg, prefix_blocks, args.steps or cfg.sample_steps, args.sampler, args.batch)
    return Plan(setup, modes, seeds, val_seeds, args.blocks, args.long_blocks,
                seeds[0] if args.long_seed is None else args.long_seed, args.baseline, args.select_metric, grid,
                weights, device)


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def json_safe(obj):
    """NaN and infinities as None, numpy scalars as Python numbers, tuples as lists: a report that JSON
    round-trips exactly."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def evaluate(args: argparse.Namespace, plan: Optional[Plan] = None, command: Optional[str] = None) -> dict:
    """Runs the evaluation (checked by :func:`prepare` unless ``plan`` is given), writes ``report.json`` and the
    plots to ``--out``; returns the report."""
    plan = plan or prepare(args)
    setup, cfg = plan.setup, plan.setup.config
    F, window = cfg.frames_per_block, cfg.window
    modes = base_modes(cfg)
    run_best = "rag-best" in plan.modes
    n_test = len(plan.modes) * plan.blocks * -(-len(plan.seeds) // setup.batch)
    n_val = len(plan.grid) * plan.blocks * -(-len(plan.val_seeds) // setup.batch) if run_best else 0
    line = ProgressLine("eval", n_val + n_test + len(plan.modes) * plan.long_blocks, unit="block",
                        enabled=not args.quiet)
    state = {"done": 0, "what": ""}

    def tick():
        state["done"] += 1
        line.show(state["done"], state["what"])

    t_start = time.perf_counter()
    seconds = {}
    selection = None
    if run_best:
        state["what"] = "validation grid"
        t0 = time.perf_counter()
        best, selection = select_policy(setup, plan.grid, plan.val_seeds, plan.blocks, plan.select_metric, tick)
        seconds["selection"] = time.perf_counter() - t0
        modes["rag-best"] = Mode("rag-best", cfg.sink, best)

    records, timing = {}, {}
    t0 = time.perf_counter()
    for name in plan.modes:
        state["what"] = f"test {name}"
        mode = modes[name]
        if name == "rag-best" and "rag" in records and mode.policy == REFERENCE:
            records[name], timing[name] = records["rag"], timing["rag"]   # the same policy: the same rollouts
            selection["same_as"] = "rag"
            state["done"] += plan.blocks * -(-len(plan.seeds) // setup.batch)
            line.show(state["done"], f"{state['what']}: the rag rollouts (the same policy)")
            continue
        records[name], wall = run_mode(setup, mode, plan.seeds, plan.blocks, tick)
        timing[name] = {"seconds": wall, "seconds_per_block": wall / (plan.blocks * -(-len(plan.seeds) //
                                                                                         setup.batch))}
    seconds["test"] = time.perf_counter() - t0
    test = summarise(records, plan.baseline)
    test["periods"] = [r["period"] for r in records[plan.modes[0]]]
    test["timing"] = timing

    long = None
    if plan.long_blocks:
        t0 = time.perf_counter()
        long_records = {}
        for name in plan.modes:
            state["what"] = f"long {name}"
            if name == "rag-best" and "rag" in long_records and modes[name].policy == REFERENCE:
                long_records[name] = long_records["rag"]
                state["done"] += plan.long_blocks
                line.show(state["done"], f"{state['what']}: the rag rollout (the same policy)")
                continue
            long_records[name], _ = run_mode(setup, modes[name], [plan.long_seed], plan.long_blocks, tick)
        seconds["long"] = time.perf_counter() - t0
        first = next(iter(long_records.values()))[0]
        long = {"seed": plan.long_seed, "period": first["period"], "blocks": plan.long_blocks,
                "metrics": {m: recs[0]["metrics"] for m, recs in long_records.items()},
                "curves": {m: recs[0]["curves"] for m, recs in long_records.items()}}
    line.close()
    seconds["total"] = time.perf_counter() - t_start

    report = {
        "format": REPORT_FORMAT,
        "command": command or shlex.join([PROG] + sys.argv[1:]),
        "machine": machine_info(plan.device),
        "weights": plan.weights,
        "model_config": cfg.to_dict(),
        "config": {
            "modes": {name: modes[name].describe(window) for name in plan.modes},
            "attention_budget": window, "frames_per_block": F, "blocks": plan.blocks,
            "prefix_blocks": setup.prefix_blocks, "prefix_frames": setup.prefix_frames,
            "num_frames": setup.prefix_frames + plan.blocks * F, "steps": setup.steps, "sampler": setup.sampler,
            "position_mode": cfg.position_mode, "test_seeds": plan.seeds, "val_seeds": plan.val_seeds,
            "baseline": plan.baseline, "select_metric": plan.select_metric,
            "grid": [p.to_dict() for p in plan.grid], "batch": setup.batch, "bootstrap": BOOTSTRAP,
            "hit_tolerance": 1, "identity_far_gap": window,
            "long": {"seed": plan.long_seed, "blocks": plan.long_blocks},
            "noise": "torch.randn([num_frames, C, H, W], generator=torch.Generator().manual_seed(clip seed))",
        },
        "selection": selection,
        "test": test,
        "long": long,
        "seconds": seconds,
        "plots": [],
    }
    report = json_safe(report)
    os.makedirs(args.out, exist_ok=True)
    if not args.no_plots:
        if importlib.util.find_spec("matplotlib") is None:     # an optional dependency
            report["plots_skipped"] = "matplotlib is not installed (pip install matplotlib)"
        else:
            chance = float(np.mean([hit_rate_chance(p, F) for p in test["periods"]]))
            report["plots"].append(plot_curves(test["curves"], os.path.join(args.out, "curves_test.png"),
                                               setup.prefix_frames, F, f"test seeds ({len(plan.seeds)}): mean "
                                               "per block", chance))
            if long:
                report["plots"].append(plot_curves(long["curves"], os.path.join(args.out, "curves_long.png"),
                                                   setup.prefix_frames, F, f"long run: seed {plan.long_seed}, "
                                                   f"{plan.long_blocks} blocks", hit_rate_chance(long["period"], F)))
    with open(os.path.join(args.out, REPORT_NAME), "w") as f:
        json.dump(report, f, indent=1)
    return report


def main(argv: list[str] | None = None, prog: str = PROG, error_prefix: str | None = None) -> int:
    """The command line: 0 after the evaluation; 2 after ``<error_prefix or prog>: error: <message>`` for a
    mistake in the options or ``--weights`` (nothing generated or written)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, prog)
    try:
        plan = prepare(args)
    except (OptionError, InputFileError, FileNotFoundError) as err:
        print(f"{error_prefix or prog}: error: {err}", file=sys.stderr)
        return 2
    report = evaluate(args, plan, command=shlex.join(prog.split() + argv))
    if not args.quiet:
        print(format_table(report), file=sys.stderr)
    return 0


def format_table(report: dict, metrics: Sequence[str] = ("revisit_truth", "identity_truth_far", "colour_drift",
                                                          "nearest_view_error", "palette_error", "hit_rate")) -> str:
    """A text table of the test metrics: ``mean [low, high]`` per mode and metric."""
    rows = [["mode"] + list(metrics)]
    for mode, values in report["test"]["metrics"].items():
        cells = []
        for m in metrics:
            v = values.get(m)
            cells.append("-" if not v or v["mean"] is None else f"{v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]")
        rows.append([mode] + cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


if __name__ == "__main__":
    sys.exit(main())
