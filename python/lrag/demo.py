"""The built-in demo, ``lrag generate --demo``: the shipped toy generator continues a toy-world clip, natively and
with LongLive-RAG, exactly as ``lrag eval`` runs its ``sink`` and ``rag`` modes; videos, logs and the evaluation's
metrics of the two rollouts.

What runs (no download, the CPU, under a minute):

- the weights: the trained toy generator shipped with the package (:func:`lrag.toy.shipped.load_shipped_generator`,
  checked against its card's sha256): a 0.31 M-parameter causal Wan DiT trained on the procedural toy world
  (docs/toy_training.md), whose 4 x 16 x 16 frames are used directly as latents (no VAE, no text);
- the clip: ``make_clip(--seed)`` (seeds 0-999: the trainer leaves them to evaluation; 1000-1999 are its
  validation clips);
- a ground-truth prefix of :func:`lrag.toy.evaluate.default_prefix_blocks` blocks (11 = 33 frames: the longest
  period + 1 frame), then ``--seconds`` of generated blocks (0.75 s each: 30 s = 40 blocks = 120 frames);
- the two modes, through :func:`lrag.toy.evaluate.run_mode` (the same rollout, noise rule, Euler sampler, steps and
  RoPE position mode as the evaluation): ``native`` = the evaluation's ``sink`` (the sink + the 11 most recent
  frames) and ``rag`` = its ``rag`` (the sink + K = 6 frames retrieved with the reference policy + the 5 most
  recent);
- the scores: :func:`lrag.toy.evaluate.score` of each rollout against the clip's ground truth.

Rendering: every frame through :func:`lrag.video.latent_preview` (a fixed orthonormal 4 -> RGB map, nearest
upsampling x10 to 160 px), under a label band (PIL, which comes with matplotlib) and above
:func:`timeline_strip`. Outputs: ``ground_truth.mp4``, ``native.mp4``, ``rag.mp4``, ``side_by_side.mp4`` (the
three, labelled), ``memory_log.json``, ``timings.json``, ``retrieval.png``, ``demo_metrics.json``; the metrics are
also printed. One clip is one clip: docs/toy_eval.md has the evaluation over 20 clips, where retrieval did not
beat the native schedule on this model.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

import numpy as np
import torch

from lrag.errors import UsageError
from lrag.generate import ModeRun, Progress, blocks_for_seconds, stream_blocks, write_outputs
from lrag.video import VideoWriter, latent_preview, side_by_side

METRICS_FORMAT = "lrag-toy-demo/1"
METRICS_NAME = "demo_metrics.json"
MAX_SEED = 999               # clips 0-999 are the evaluation's; the trainer validates on 1000-1999
SCALE = 10                   # 16 x 16 world frames -> 160 x 160 px
LABEL_HEIGHT = 32            # two lines of text above each frame
# CLI mode (and video name) -> the lrag.toy.evaluate mode it runs
EVAL_MODES = {"native": "sink", "rag": "rag"}
# The metrics printed (the file has every one of lrag.toy.evaluate.score's); all are errors: lower is better.
HEADLINE = {"revisit_truth": "error vs the true view of the place",
            "revisit_self": "vs the rollout one period earlier",
            "nearest_view_error": "distance to the nearest true view",
            "colour_drift": "colour drift, last vs first period",
            "palette_error": "pixels off the scene's colours"}

_POLICY = ("the demo runs lrag eval's reference retrieval policy as it is (K = 6, R = 5, spatial-mean key, retrieved "
           "frames at temporal position 0, K/V kept); other policies: lrag eval (docs/toy_eval.md)")
_MODEL = ("the demo runs the shipped toy generator (4 x 16 x 16 world frames, float32, its own schedule); other "
          "generators: lrag generate without --demo")
# options of `lrag generate` the demo refuses: (attribute, option, why)
REFUSED = (("prompt", "--prompt", "the toy world has no text: the demo continues the world clip chosen by --seed"),
           ("top_k", "--top-k", _POLICY), ("recent_exclude", "--recent-exclude", _POLICY),
           ("memory_position", "--memory-position", _POLICY), ("embedder", "--embedder", _POLICY),
           ("storage", "--storage", _POLICY), ("device_frames", "--device-frames", _POLICY),
           ("host_frames", "--host-frames", _POLICY), ("backbone", "--backbone", _MODEL),
           ("checkpoint", "--checkpoint", _MODEL), ("no_ema", "--no-ema", _MODEL), ("wan_dir", "--wan-dir", _MODEL),
           ("dtype", "--dtype", _MODEL), ("height", "--height", _MODEL), ("width", "--width", _MODEL),
           ("num_heads", "--num-heads", _MODEL), ("text_len", "--text-len", _MODEL),
           ("frames_per_block", "--frames-per-block", _MODEL), ("lora", "--lora", _MODEL),
           ("lora_alpha", "--lora-alpha", _MODEL), ("lora_scale", "--lora-scale", _MODEL),
           ("lora_unmerged", "--lora-unmerged", _MODEL), ("checkpoint_name", "--checkpoint-name", _MODEL),
           ("steps", "--steps", _MODEL), ("first_block_steps", "--first-block-steps", _MODEL),
           ("sink", "--sink", _MODEL), ("retrieve_every", "--retrieve-every", _POLICY),
           ("switch", "--switch", "the toy world has no text to switch"),
           ("switch_memory", "--switch-memory", "the toy world has no text to switch"))


# ------------------------------------------------------------------------------------------------- rendering
STRIP_HEIGHT = 16
COLOURS = {"empty": (24, 24, 24), "past": (90, 90, 90), "window": (60, 120, 255), "retrieved": (255, 160, 0),
           "block": (255, 255, 255)}


def timeline_strip(width: int, total_frames: int, start: int, frames: int, sink: int, local: int,
                   retrieved: list[int]) -> np.ndarray:
    """``uint8 [STRIP_HEIGHT, width, 3]``: one column range per latent frame of the whole video, coloured by
    its role for the block ``[start, start + frames)``: not generated yet (near black), generated (grey), attended
    from the cache (blue: the sink and the last ``local`` frames of the window), retrieved (orange), the block
    itself (white)."""
    role = ["empty"] * total_frames
    end = start + frames
    role[:end] = ["past"] * end
    for f in list(range(min(sink, end))) + list(range(max(sink, end - local), end)):
        role[f] = "window"
    for f in retrieved:
        role[f] = "retrieved"
    role[start:end] = ["block"] * frames
    strip = np.empty((STRIP_HEIGHT, width, 3), dtype=np.uint8)
    for f, name in enumerate(role):
        x0 = f * width // total_frames
        x1 = max((f + 1) * width // total_frames, x0 + 1)
        strip[:, x0:x1] = COLOURS[name]
    strip[:2] = 0                                    # a dark line between the frame and the strip
    return strip


@functools.lru_cache(maxsize=None)
def _font(size: int):
    from PIL import ImageFont  # noqa: PLC0415  (pillow: a dependency of matplotlib, the demo's plot)

    try:
        return ImageFont.load_default(size=size)        # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()                 # the built-in bitmap font


@functools.lru_cache(maxsize=256)
def label_band(width: int, lines: tuple[str, ...], height: int = LABEL_HEIGHT) -> np.ndarray:
    """``uint8 [height, width, 3]``: ``lines`` of text, the first white, the others grey, on black."""
    try:
        from PIL import Image, ImageDraw  # noqa: PLC0415
    except ImportError as e:
        raise RuntimeError(f"the demo's labels need pillow (it comes with matplotlib): pip install -e .[demo]; "
                           f"import failed: {e}") from None
    img = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((4, 2 + 14 * i), line, fill=(255, 255, 255) if i == 0 else (190, 190, 190), font=_font(11))
    band = np.array(img, dtype=np.uint8)
    band.setflags(write=False)
    return band


class Panel:
    """Renders one column of the demo's video. Per latent frame: a :func:`label_band` (``label``, then the block
    number and ``status``, or else whether the block is ground truth or generated), the frame
    (:func:`latent_preview`, nearest upsampling x ``scale``) and a :func:`timeline_strip` marking what the block
    attended (``sink`` sink frames, the last ``local`` frames including the block, the retrieved ones). Each
    latent frame is shown for 4 video frames (:data:`lrag.video.TEMPORAL_STRIDE`, as ``--seconds`` counts)."""

    def __init__(self, label: str, total_frames: int, prefix_frames: int, frames_per_block: int, sink: int,
                 local: int, scale: int = SCALE, status: str | None = None):
        self.label, self.total, self.prefix, self.F = label, total_frames, prefix_frames, frames_per_block
        self.sink, self.local, self.scale, self.status = sink, local, scale, status

    def render(self, latents: torch.Tensor, start: int, retrieved=()) -> np.ndarray:
        """``latents [F, C, H, W]`` of the block starting at frame ``start`` -> ``uint8 [4F, h, w, 3]``."""
        frames = latent_preview(latents, scale=self.scale, interpolation="nearest")
        width = frames.shape[2]
        block, blocks = start // self.F + 1, self.total // self.F
        status = f"block {block}/{blocks}: " + (self.status or ("ground truth" if start < self.prefix else
                                                                "generated"))
        band = label_band(width, (self.label, status))
        strip = timeline_strip(width, self.total, start, latents.shape[0], self.sink, self.local, list(retrieved))
        n = len(frames)
        return np.concatenate([np.broadcast_to(band, (n, *band.shape)), frames,
                               np.broadcast_to(strip, (n, *strip.shape))], axis=1)

    def __call__(self, block) -> np.ndarray:
        rec = block.memory_record
        return self.render(block.latents[0], block.start_frame, rec["selected_global_frames"][0] if rec else ())


# ------------------------------------------------------------------------------------------------- the run
def _check_options(args) -> tuple[torch.device, list[str]]:
    """The demo's own checks, before anything is read or written: ``(device, modes)``."""
    from lrag_ext.state_dicts import check_output_dir, parse_device  # noqa: PLC0415

    for attr, option, why in REFUSED:
        if getattr(args, attr) not in (None, False):
            raise UsageError(f"{option} does not apply to --demo: {why}")
    try:
        check_output_dir(args.out or "lrag_demo", "--out")
        device = parse_device(args.device or "cpu", "--device")
        blocks_for_seconds(args.seconds, 1)                 # a finite number > 0 (the blocks need the weights)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be in [0, {MAX_SEED}] with --demo (it picks the world clip; clips 1000-1999 "
                         f"are the trainer's validation clips), got {args.seed}")
    modes = {None: ["rag", "native"], "both": ["rag", "native"]}.get(args.mode, [args.mode])
    return device, modes


def _banner(cfg, card: dict, params: int, seed: int) -> str:
    val = (card.get("validation") or {}).get("val_loss")
    val = f", validation loss {val:.3f}" if isinstance(val, (int, float)) else ""
    return (f"lrag: built-in demo: the shipped toy generator ({params / 1e6:.2f} M parameters, trained "
            f"{card.get('step')} steps on the procedural toy world{val}; docs/toy_training.md) continues clip "
            f"{seed} of that world from a ground-truth prefix, natively (sink + window) and with LongLive-RAG "
            f"retrieval, exactly as `lrag eval` does. Its frames are {cfg.world.channels} x {cfg.world.size} x "
            f"{cfg.world.size} toy-world images, not a text-to-video model. Real videos: docs/cli.md.")


def metrics_document(scores: dict[str, dict], setup, seed: int, blocks: int, card: dict, path: str) -> dict:
    """``demo_metrics.json``: per mode the :func:`lrag.toy.evaluate.score` record of its rollout, and the setting
    they were measured in."""
    from lrag.toy.evaluate import REFERENCE, json_safe  # noqa: PLC0415

    cfg = setup.config
    period = next(iter(scores.values()))["period"]
    doc = {
        "format": METRICS_FORMAT,
        "weights": {"path": path, "sha256": card.get("sha256"), "step": card.get("step"),
                    "validation": card.get("validation")},
        "clip": {"seed": seed, "period": period},
        "prefix_frames": setup.prefix_frames, "generated_blocks": blocks,
        "generated_frames": blocks * cfg.frames_per_block, "steps": setup.steps, "sampler": setup.sampler,
        "position_mode": cfg.position_mode, "policy": REFERENCE.to_dict(),
        "scored_from_frame": setup.prefix_frames,
        "modes": {mode: {"evaluation_mode": EVAL_MODES[mode], **scores[mode]} for mode in EVAL_MODES
                  if mode in scores},
        "lower_is_better": "every metric except hit_rate (higher is better; compare it with hit_rate_chance)",
        "note": ("one clip and one noise draw, no interval: docs/toy_eval.md evaluates 20 clips with bootstrap "
                 "intervals; there, retrieval did not beat the native sink schedule on the toy generator"),
    }
    return json_safe(doc)


def format_metrics(doc: dict) -> str:
    """The printed summary of :func:`metrics_document`: the headline metrics per mode, the hit rate against
    chance, and what one clip can and cannot say."""
    modes = list(doc["modes"])
    names = {"native": "native", "rag": "LongLive-RAG"}
    lines = [f"toy demo, clip {doc['clip']['seed']} (period {doc['clip']['period']}): "
             f"{doc['generated_blocks']} blocks ({doc['generated_frames']} frames) generated after a "
             f"{doc['prefix_frames']}-frame ground-truth prefix; errors, lower is better:",
             "  " + "metric".ljust(20) + "".join(names[m].rjust(14) for m in modes)]
    for metric, meaning in HEADLINE.items():
        values = [doc["modes"][m]["metrics"].get(metric) for m in modes]
        cells = "".join(("-" if v is None else f"{v:.3f}").rjust(14) for v in values)
        lines.append(f"  {metric:<20}{cells}   {meaning}")
    if "rag" in doc["modes"]:
        m = doc["modes"]["rag"]["metrics"]
        hit, chance = m.get("hit_rate"), m.get("hit_rate_chance")
        if hit is not None:
            lines.append(f"  LongLive-RAG hit rate {hit:.3f} (retrieved frames showing the block's place; a "
                         f"random pick: {chance:.3f})")
    lines.append("One clip and one noise draw, no interval. docs/toy_eval.md evaluates 20 clips: there retrieval "
                 "did not beat the native sink schedule on this model, and its hits were barely above chance.")
    return "\n".join(lines)


def run_demo(args, on_block=None) -> dict[str, str]:
    """Runs ``lrag generate --demo`` for parsed ``args``; returns the artefacts' paths.

    Raises:
        UsageError: an option the demo refuses or out of range, an unusable ``--out`` or ``--device``, or missing
            or corrupt shipped weights; before anything is written.
        KeyboardInterrupt: after the finished blocks' video and logs have been written (no metrics then).
    """
    from lrag.runner import check_memory  # noqa: PLC0415
    from lrag.toy.evaluate import (REFERENCE, Setup, base_modes, default_prefix_blocks,  # noqa: PLC0415
                                   run_mode as eval_run_mode)
    from lrag.toy.shipped import ShippedWeightsError, load_shipped_generator, shipped_paths  # noqa: PLC0415
    from lrag.toy.world import make_clip  # noqa: PLC0415

    device, modes = _check_options(args)
    out, seed = args.out or "lrag_demo", args.seed
    try:
        model, cfg, card = load_shipped_generator(device)
    except ShippedWeightsError as e:
        raise UsageError(str(e)) from None
    F = cfg.frames_per_block
    blocks = blocks_for_seconds(args.seconds, F)
    setup = Setup(model, cfg, default_prefix_blocks(cfg), cfg.sample_steps, "euler", batch=1)
    total_blocks = setup.prefix_blocks + blocks
    T = total_blocks * F
    params = sum(p.numel() for p in model.parameters())
    check_memory(cfg.wan_config(), T, device, model.dtype, modes, REFERENCE.memory_config(1, T), cfg.world.channels,
                 params, args.seconds)
    print(_banner(cfg, card, params, seed), file=sys.stderr)
    os.makedirs(out, exist_ok=True)

    eval_modes = base_modes(cfg)
    clip, clip_meta = make_clip(seed, T, cfg.world)
    labels = {"truth": f"ground truth (clip {seed})", "native": "native (sink + window)",
              "rag": f"LongLive-RAG (K={REFERENCE.top_k})"}
    paths = {"truth": os.path.join(out, "ground_truth.mp4")}
    with VideoWriter(paths["truth"]) as writer:
        truth = Panel(labels["truth"], T, setup.prefix_frames, F, sink=0, local=0,
                      status=f"period {clip_meta.period}")
        for s in range(0, T, F):
            writer.append(truth.render(torch.from_numpy(clip[s:s + F]), s))
    weights_path = shipped_paths()[0]             # checked against its card by load_shipped_generator
    meta = {"source": "demo: the shipped toy generator (lrag.toy.shipped), the evaluation's sink and rag modes",
            "weights": {"path": weights_path, "sha256": card.get("sha256"), "step": card.get("step")},
            "embedder": "spatial-mean descriptor (the reference policy's key)",
            "prompt": None, "seed": seed, "clip_period": clip_meta.period, "seconds_requested": args.seconds,
            "num_blocks": total_blocks, "prefix_blocks": setup.prefix_blocks, "generated_blocks": blocks,
            "frames_per_block": F, "latent_shape": [cfg.world.channels, cfg.world.size, cfg.world.size],
            "window": cfg.window, "sink": cfg.sink, "top_k": REFERENCE.top_k,
            "recent_exclude": REFERENCE.recent_exclude, "memory_position": REFERENCE.memory_position,
            "storage": "kv", "device": str(device), "dtype": str(model.dtype).replace("torch.", ""),
            "modes": modes, "evaluation_modes": {m: EVAL_MODES[m] for m in modes}, "steps": setup.steps,
            "sampler": setup.sampler, "position_mode": cfg.position_mode,
            "panels": [labels[p] for p in ["truth"] + [m for m in ("native", "rag") if m in modes]],
            "title": f"toy demo, clip {seed}"}
    runs, scores, interrupted = [], {}, True
    start, threads = time.perf_counter(), torch.get_num_threads()
    # One thread: the toy's ops are too small to gain from more, and on a busy 2-core machine two threads lost 4x
    # to OpenMP spinning (measured on the previous demo model: 50 s vs 11 s).
    torch.set_num_threads(1)
    try:
        for mode in modes:
            eval_mode = eval_modes[EVAL_MODES[mode]]
            attended = eval_mode.attended(cfg.window)
            panel = Panel(labels[mode], T, setup.prefix_frames, F, attended["sink"], attended["local"])
            run = ModeRun(mode, total_blocks, os.path.join(out, f"{mode}.mp4"))
            runs.append(run)

            def produce(callback, eval_mode=eval_mode, mode=mode):
                records, _ = eval_run_mode(setup, eval_mode, [seed], blocks, callback=callback)
                scores[mode] = records[0]

            stream_blocks(mode, total_blocks, panel, run.video, produce, on_block,
                          Progress(mode, total_blocks, enabled=not args.quiet), run)
        interrupted = False
    finally:
        torch.set_num_threads(threads)
        meta["wall_s"] = time.perf_counter() - start
        paths.update(write_outputs(out, runs, meta, F, interrupted))
    paths.update({f"video_{r.mode}": r.video for r in runs})
    paths["side_by_side"] = os.path.join(out, "side_by_side.mp4")
    side_by_side([paths["truth"]] + [r.video for r in sorted(runs, key=lambda r: r.mode != "native")],
                 paths["side_by_side"])
    doc = metrics_document(scores, setup, seed, blocks, card, weights_path)
    paths["metrics"] = os.path.join(out, METRICS_NAME)
    with open(paths["metrics"], "w") as f:
        json.dump(doc, f, indent=1)
    print(format_metrics(doc))
    order = ("truth", "video_native", "video_rag", "side_by_side", "metrics", "timings", "memory_log", "plot")
    return {("video_truth" if k == "truth" else k): paths[k] for k in order if k in paths}
