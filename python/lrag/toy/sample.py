"""Sampling the toy generator from a ground-truth prefix (docs/toy_training.md): teacher-forced context, Euler
or re-noise denoising of each block, the t = 0 context rerun, and the sink-revisit probe.

The toy generator is not distilled: it needs many more denoising steps than the released 4-step generators, and
a deterministic Euler (DDIM) sampler. :class:`lrag.pipeline.Pipeline` re-noises with fresh noise (the
few-step sampler of Self-Forcing) and starts from frame 0; :func:`rollout` here starts from a prefix and runs
native (sink + window) generation only. Retrieval (``rag``) rollouts belong in the Pipeline, once it can take a
prefix and an Euler sampler.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from lrag.models.wan import CausalWanModel, KVCache
from lrag.scheduler import FlowMatchScheduler
from lrag.toy.world import ClipMeta, WorldConfig, make_clip

SAMPLERS = ("euler", "renoise")


def null_text(model: CausalWanModel, batch: int) -> torch.Tensor:
    """The toy's prompt: ``[batch, text_len, text_dim]`` zeros (the toy world has no text; the cross-attention
    then adds a learned constant per layer)."""
    cfg = model.cfg
    return torch.zeros(batch, cfg.text_len, cfg.text_dim, dtype=model.dtype, device=model.device)


def sampling_timesteps(scheduler: FlowMatchScheduler, steps: int) -> torch.Tensor:
    """The ``steps`` timesteps of a sampler: nominal steps ``linspace(N, 0, steps + 1)[:-1]`` (rounded) warped
    through the scheduler's table (``steps=4`` gives the released ``[1000, 750, 500, 250]`` schedule).

    Returns:
        float32 ``[steps]``, descending, every one a table entry.
    """
    n = scheduler.num_train_timesteps
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be in [1, {n}], got {steps}")
    nominal = [round(n * (steps - j) / steps) for j in range(steps)]
    return scheduler.warp(nominal)


@torch.no_grad()
def commit_frames(model: CausalWanModel, cache: KVCache, frames: torch.Tensor) -> None:
    """Writes clean frames ``[B, T, C, H, W]`` (``T`` a multiple of ``frames_per_block``) into ``cache`` block by
    block with the t = 0 context rerun, exactly as generation commits its own blocks (teacher forcing)."""
    F = model.cfg.frames_per_block
    if frames.shape[1] % F:
        raise ValueError(f"frames must be whole blocks of {F}, got {frames.shape[1]} frames")
    frames = frames.to(device=model.device, dtype=model.dtype)
    zeros = torch.zeros(frames.shape[0], F, dtype=torch.float32, device=model.device)
    for s in range(0, frames.shape[1], F):
        model(frames[:, s:s + F], zeros, cache, update_cache=True)


@torch.no_grad()
def denoise_block(model: CausalWanModel, cache: KVCache, noise: torch.Tensor, timesteps: torch.Tensor,
                  scheduler: FlowMatchScheduler, sampler: str = "euler",
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Denoises one block ``noise`` ``[B, F, C, H, W]`` after the committed frames of ``cache`` (left unchanged).

    Per timestep ``t_j`` (sigma ``s_j``): ``flow = model(x, t_j)``; the last step returns
    ``x0 = x - s_j flow`` (:meth:`FlowMatchScheduler.to_x0`). Otherwise ``"euler"`` (deterministic, the ODE /
    DDIM step for a model trained with the flow-matching loss) sets ``x = x + (s_{j+1} - s_j) flow`` (float64,
    cast back); ``"renoise"`` (the Pipeline's few-step sampler, for distilled models) sets
    ``x = (1 - s_{j+1}) x0 + s_{j+1} eps`` with fresh ``eps`` from ``generator``.

    Returns:
        x0 ``[B, F, C, H, W]``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    x = noise.to(device=model.device, dtype=model.dtype)
    B, F = x.shape[:2]
    sigmas = scheduler.sigma(timesteps, torch.float64)
    for j in range(len(timesteps)):
        t = torch.full((B, F), float(timesteps[j]), dtype=torch.float32, device=model.device)
        flow = model(x, t, cache)
        if j == len(timesteps) - 1:
            return scheduler.to_x0(flow, x, t)
        t_next = torch.full_like(t, float(timesteps[j + 1]))
        if sampler == "euler":
            x = (x.double() + float(sigmas[j + 1] - sigmas[j]) * flow.double()).to(x.dtype)
        else:
            eps = torch.randn(x.shape, generator=generator, device=generator.device if generator else "cpu")
            x = scheduler.add_noise(scheduler.to_x0(flow, x, t), eps.to(x), t_next)
    raise ValueError("timesteps must not be empty")


@torch.no_grad()
def rollout(model: CausalWanModel, prefix: torch.Tensor, num_frames: int, steps: int = 16,
            sampler: str = "euler", position_mode: str = "window", scheduler: Optional[FlowMatchScheduler] = None,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Native (sink + sliding window, no retrieval) generation that continues a ground-truth prefix.

    The prefix is committed with t = 0 reruns (:func:`commit_frames`); each following block is denoised from
    noise drawn from ``generator`` (:func:`denoise_block`) and committed by its own t = 0 rerun, as in
    :meth:`lrag.pipeline.Pipeline.generate`.

    Args:
        prefix: ``[B, T0, C, H, W]`` clean frames, ``T0`` a multiple of ``frames_per_block`` (may be 0).
        num_frames: total frames returned (prefix included), a multiple of ``frames_per_block``, ``>= T0``.
        steps: denoising steps per block (:func:`sampling_timesteps`).
        position_mode: the RoPE position mode the model was trained with (``"window"`` for the toy).
    Returns:
        ``[B, num_frames, C, H, W]``: the prefix, then the generated frames.
    """
    cfg, F = model.cfg, model.cfg.frames_per_block
    B, T0 = prefix.shape[:2]
    if num_frames < T0 or num_frames % F or T0 % F:
        raise ValueError(f"num_frames ({num_frames}) and the prefix ({T0} frames) must be multiples of {F} with "
                         f"num_frames >= prefix")
    scheduler = scheduler or FlowMatchScheduler(5.0)
    timesteps = sampling_timesteps(scheduler, steps)
    cache = model.new_cache(B, position_mode, memory_slots=0)
    model.set_text(cache, null_text(model, B))
    out = torch.zeros((B, num_frames, cfg.in_dim, cfg.latent_height, cfg.latent_width), dtype=model.dtype,
                      device=model.device)
    out[:, :T0] = prefix.to(out)
    commit_frames(model, cache, out[:, :T0])
    for s in range(T0, num_frames, F):
        noise = torch.randn(out[:, s:s + F].shape, generator=generator,
                            device=generator.device if generator else "cpu")
        out[:, s:s + F] = denoise_block(model, cache, noise, timesteps, scheduler, sampler, generator)
        commit_frames(model, cache, out[:, s:s + F])
    return out


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
    scheduler = scheduler or FlowMatchScheduler(5.0)
    timesteps = sampling_timesteps(scheduler, steps)
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
            cache = model.new_cache(1, position_mode, memory_slots=0)
            model.set_text(cache, null_text(model, 1))
            commit_frames(model, cache, torch.from_numpy(frames[start:s])[None])
            out[name] = denoise_block(model, cache, noise, timesteps, scheduler, sampler,
                                      torch.Generator().manual_seed(noise_seed + 1))[0].double().cpu().numpy()
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
