"""Sampling the toy generator from a ground-truth prefix (docs/toy_training.md), and the sink-revisit probe.

The toy generator is not distilled: it needs more denoising steps than the released 4-step generators and the
deterministic Euler sampler. Both are options of :class:`lrag.pipeline.Pipeline` (``sampler="euler"``,
``generate(prefix=...)``), which does every rollout here: native or with retrieval, one generation loop.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from lrag.models.wan import CausalWanModel
from lrag.pipeline import SAMPLERS, Embedder, Pipeline
from lrag.scheduler import FlowMatchScheduler
from lrag.toy.world import ClipMeta, WorldConfig, make_clip

__all__ = ["SAMPLERS", "null_text", "nominal_steps", "sampling_timesteps", "rollout", "sink_probe"]


def null_text(model: CausalWanModel, batch: int) -> torch.Tensor:
    """The toy's prompt: ``[batch, text_len, text_dim]`` zeros (the toy world has no text; the cross-attention
    then adds a learned constant per layer)."""
    cfg = model.cfg
    return torch.zeros(batch, cfg.text_len, cfg.text_dim, dtype=model.dtype, device=model.device)


def nominal_steps(scheduler: FlowMatchScheduler, steps: int) -> list[int]:
    """``steps`` evenly spaced nominal steps ``round(N (steps - j) / steps)``, ``j < steps`` (``steps=4``: the
    released ``[1000, 750, 500, 250]``), the ``denoising_steps`` of a :class:`Pipeline`."""
    n = scheduler.num_train_timesteps
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be in [1, {n}], got {steps}")
    return [round(n * (steps - j) / steps) for j in range(steps)]


def sampling_timesteps(scheduler: FlowMatchScheduler, steps: int) -> torch.Tensor:
    """The float32 ``[steps]`` timesteps a sampler of ``steps`` steps uses: :func:`nominal_steps` warped through
    the scheduler's table (descending, every one a table entry)."""
    return scheduler.warp(nominal_steps(scheduler, steps))


@torch.no_grad()
def rollout(model: CausalWanModel, prefix: torch.Tensor, num_frames: int, steps: int = 16,
            sampler: str = "euler", mode: str = "native", position_mode: str = "window",
            scheduler: Optional[FlowMatchScheduler] = None, generator: Optional[torch.Generator] = None,
            noise: Optional[torch.Tensor] = None, retrieval=None, embed: Optional[Embedder] = None,
            callback=None):
    """Generation that continues a ground-truth prefix: :meth:`Pipeline.generate` with ``prefix``, the toy's null
    prompt, ``steps`` evenly spaced steps and ``sampler``.

    Args:
        prefix: ``[B, T0, C, H, W]`` clean frames, ``T0`` a multiple of ``frames_per_block`` (may be 0).
        num_frames: total frames (prefix included), a multiple of ``frames_per_block``, ``>= T0``.
        mode: ``"native"`` (sink + sliding window) or ``"rag"`` (with ``retrieval``, an
            :class:`lrag_ext.MemoryConfig`, and ``embed``, the frame embedder).
        position_mode: the RoPE position mode the model was trained with (``"window"`` for the toy).
        noise: ``[B, num_frames, C, H, W]`` initial noise (default: drawn from ``generator``).
        callback: called with each block's :class:`lrag.pipeline.BlockResult` (prefix blocks included).

    Returns:
        The :class:`lrag.pipeline.GenerationResult` (``latents`` ``[B, num_frames, C, H, W]``: the prefix, then
        the generated frames; ``memory_log`` in ``rag`` mode).
    """
    B, T0 = prefix.shape[:2]
    if num_frames < T0 or num_frames % model.cfg.frames_per_block or T0 % model.cfg.frames_per_block:
        raise ValueError(f"num_frames ({num_frames}) and the prefix ({T0} frames) must be multiples of "
                         f"{model.cfg.frames_per_block} with num_frames >= prefix")
    scheduler = scheduler or FlowMatchScheduler(5.0)
    pipe = Pipeline(model, nominal_steps(scheduler, steps), scheduler, retrieval=retrieval, embed=embed,
                    sampler=sampler)
    return pipe.generate(null_text(model, B), num_frames, generator=generator, mode=mode, noise=noise,
                         position_mode=position_mode, prefix=prefix if T0 else None, callback=callback)


def _unseen(meta: ClipMeta, frames: Sequence[int], context: Sequence[int], size: int) -> np.ndarray:
    """``[len(frames), H, W]`` bool: the pixels of ``frames`` whose world location none of the ``context`` frames
    shows (from the camera poses: the static scene; moving objects are not tracked)."""
    cam = meta.camera[meta.phase[list(frames)]]                          # [n, 2]
    ctx = meta.camera[meta.phase[list(context)]]                         # [m, 2]
    r = np.arange(size)
    y = cam[:, 0, None, None, None] + r[None, None, :, None] - ctx[None, :, 0, None, None]   # [n, m, H, 1]
    x = cam[:, 1, None, None, None] + r[None, None, None, :] - ctx[None, :, 1, None, None]   # [n, m, 1, W]
    seen = ((y >= 0) & (y < size)) & ((x >= 0) & (x < size))             # [n, m, H, W]
    return ~seen.any(axis=1)


@torch.no_grad()
def sink_probe(model: CausalWanModel, seeds: Sequence[int], steps: int = 16, sampler: str = "euler",
               world: WorldConfig = WorldConfig(), position_mode: str = "window", noise_seed: int = 0,
               scheduler: Optional[FlowMatchScheduler] = None) -> dict:
    """Does one-block generation copy a revisited place from the sink? A controlled, retrieval-free measurement.

    Per clip (``make_clip(seed)``, period ``P``) the block ``[s, s + F)`` that holds frame ``P`` (phase 0) is
    generated twice from the same noise, after the same ``window - sink - F`` local context frames
    ``[s - n, s)``, both teacher-forced with t = 0 reruns on a full window:

    - **matched**: the context starts at frame 0, so the sink *is* the view the block returns to;
    - **control**: the context starts at frame ``a ~ s - P / 2`` (``s - a`` a multiple of ``F``), so the sink
      shows the far side of the loop.

    Scored on the pixels none of the local context frames shows (camera poses; about a third of the block): the
    place that only the sink (matched) or nothing (control) has shown. ``matched`` well below ``control`` means
    the model copies from the sink; retrieved frames sit at the sink's position, so this is what retrieval will
    use.

    Returns:
        ``{"matched", "control", "mean_colour", "seen_matched", "seen_control", "clips", "pixels"}``: the MSE
        on the unseen pixels (pooled over clips), the MSE of predicting them with the local context's mean
        colour, the MSE on the pixels the local context shows (sanity: similar in both), the clips and unseen
        pixels scored.
    """
    cfg, F = model.cfg, model.cfg.frames_per_block
    n_local = cfg.window - cfg.sink - F
    gen = torch.Generator().manual_seed(noise_seed)
    sums = dict.fromkeys(("matched", "control", "mean_colour", "seen_matched", "seen_control"), 0.0)
    unseen_px = seen_px = clips = 0
    for seed in seeds:
        frames, meta = make_clip(int(seed), world.period[1] + F, world)
        P = meta.period
        s = P - P % F
        a = s - F * max(math.ceil(n_local / F), round(P / (2 * F)))
        truth = frames[s:s + F]
        block = list(range(s, s + F))
        mask = _unseen(meta, block, range(s - n_local, s), world.size)   # [F, H, W]
        if not mask.any():
            continue
        noise = torch.randn((1, F) + frames.shape[1:], generator=gen)
        out = {}
        for name, start in (("matched", 0), ("control", a)):
            context = torch.from_numpy(frames[start:s])[None]
            padded = torch.cat([torch.zeros_like(context), noise], dim=1)   # the block's noise, after the prefix
            res = rollout(model, context, s - start + F, steps, sampler, position_mode=position_mode,
                          scheduler=scheduler, generator=torch.Generator().manual_seed(noise_seed + 1), noise=padded)
            out[name] = res.latents[0, -F:].double().cpu().numpy()
        err = {k: ((v - truth) ** 2).mean(axis=1) for k, v in out.items()}           # [F, H, W]
        ctx_mean = frames[s - n_local:s].mean(axis=(0, 2, 3))
        colour_err = ((truth - ctx_mean[None, :, None, None]) ** 2).mean(axis=1)
        sums["matched"] += float(err["matched"][mask].sum())
        sums["control"] += float(err["control"][mask].sum())
        sums["mean_colour"] += float(colour_err[mask].sum())
        sums["seen_matched"] += float(err["matched"][~mask].sum())
        sums["seen_control"] += float(err["control"][~mask].sum())
        unseen_px += int(mask.sum())
        seen_px += int((~mask).sum())
        clips += 1
    res = {k: v / max(unseen_px if not k.startswith("seen") else seen_px, 1) for k, v in sums.items()}
    res.update(clips=clips, pixels=unseen_px)
    return res
