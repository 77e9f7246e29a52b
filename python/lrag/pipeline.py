"""The block-autoregressive generation loop (Self-Forcing / LongLive inference, with LongLive-RAG retrieval).

Per block of ``F`` frames starting at frame ``s`` (see docs/generator.md):

1. ``rag`` mode: query = embedding of frame ``s - 1``; ``memory.retrieve`` -> up to K frames; their K/V go into
   the cache's memory slots (temporal RoPE positions by ``RetrievalConfig.memory_position``: 0, as the
   reference, by default).
2. Denoise: for each warped timestep ``t_j``: flow = model(x, t_j); x0 = x - sigma(t_j) flow (float64); unless
   last, x = (1 - sigma_{j+1}) x0 + sigma_{j+1} eps (float32, eps from ``renoise`` or the generator).
3. Context rerun: one more forward on the clean x0 at t = ``context_noise`` (0) commits the block's clean,
   un-roped K/V to the cache; ``rag`` mode then appends them with the frames' embeddings to the memory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from lrag.config import RetrievalConfig
from lrag.memory import Memory, TensorMemory
from lrag.models.wan import CausalWanModel
from lrag.scheduler import FlowMatchScheduler

Embedder = Callable[[torch.Tensor], torch.Tensor]


def mean_descriptor(latents: torch.Tensor) -> torch.Tensor:
    """Fallback embedder: spatial mean ``[N, C, H, W] -> [N, C]``."""
    return latents.float().mean(dim=(-2, -1))


@dataclass
class BlockResult:
    """One finished block, as handed to the callback."""

    index: int
    start_frame: int
    latents: torch.Tensor                  # [B, F, C, H, W]
    timings: dict                          # seconds: retrieval, denoise, rerun, memory, total
    memory_record: Optional[dict] = None   # the reference's log fields when a retrieval happened


@dataclass
class GenerationResult:
    latents: torch.Tensor                  # [B, num_frames, C, H, W]
    blocks: list = field(default_factory=list)       # BlockResult per block (latents dropped)
    memory_log: list = field(default_factory=list)   # one record per block with a retrieval
    x_in: Optional[torch.Tensor] = None    # trace: [blocks, steps + 1, B, F, C, H, W] input of every forward
    x0: Optional[torch.Tensor] = None      # trace: same shape, x0 of every forward (the rerun's included)


class Pipeline:
    """Generates latent videos block by block with a :class:`CausalWanModel`.

    Args:
        model: the backbone (eval mode, weights loaded).
        denoising_steps: nominal steps, warped through the scheduler table ([1000, 750, 500, 250]).
        scheduler: defaults to ``FlowMatchScheduler(shift=5.0)``.
        context_noise: timestep of the context rerun (0).
        retrieval: K, R and the memory frames' temporal position for ``rag`` mode.
        embed: ``[N, C, H, W] -> [N, D]`` frame embedder for retrieval (default: spatial mean).
        memory_factory: builds one :class:`~lrag.memory.Memory` per stream (default: :class:`TensorMemory`
            with K, R from ``retrieval`` and sink/window from the model config).
    """

    def __init__(self, model: CausalWanModel, denoising_steps: Sequence[int] = (1000, 750, 500, 250),
                 scheduler: FlowMatchScheduler | None = None, context_noise: float = 0.0,
                 retrieval: RetrievalConfig | None = None, embed: Embedder | None = None,
                 memory_factory: Callable[[], Memory] | None = None):
        self.model = model
        self.cfg = model.cfg
        self.scheduler = scheduler or FlowMatchScheduler(5.0)
        self.timesteps = self.scheduler.warp(list(denoising_steps))          # float32 [S]
        self.context_noise = float(context_noise)
        self.retrieval = retrieval or RetrievalConfig()
        self.embed = embed or mean_descriptor
        r, cfg = self.retrieval, self.cfg
        self.memory_factory = memory_factory or (lambda: TensorMemory(r.k, r.recent_exclude, cfg.sink, cfg.window))

    def _check(self, text, num_frames, mode, noise, renoise, B):
        cfg, F = self.cfg, self.cfg.frames_per_block
        if mode not in ("rag", "native"):
            raise ValueError(f"mode must be 'rag' or 'native', got {mode!r}")
        if num_frames < 1 or num_frames % F:
            raise ValueError(f"num_frames must be a positive multiple of frames_per_block={F}, got {num_frames}")
        shape = (B, num_frames, cfg.in_dim, cfg.latent_height, cfg.latent_width)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise must be {list(shape)}, got {list(noise.shape)}")
        if renoise is not None:
            need = (num_frames // F, len(self.timesteps) - 1)
            if tuple(renoise.shape[:2]) != need or renoise[0, 0].numel() != B * F * shape[2] * shape[3] * shape[4]:
                raise ValueError(f"renoise must be [{need[0]}, {need[1]}, ...] with B*F*C*H*W elements per entry, "
                                 f"got {list(renoise.shape)}")

    @torch.no_grad()
    def generate(self, text_embeddings: torch.Tensor, num_frames: int, generator: torch.Generator | None = None,
                 mode: str = "rag", noise: torch.Tensor | None = None, renoise: torch.Tensor | None = None,
                 position_mode: str | None = None, callback: Callable[[BlockResult], None] | None = None,
                 trace: bool = False) -> GenerationResult:
        """Generates ``num_frames`` latent frames.

        Args:
            text_embeddings: ``[B, L, text_dim]`` prompt embeddings (umT5 output for the real model).
            num_frames: a multiple of ``frames_per_block``.
            generator: source of the initial noise and the re-noise when they are not given.
            mode: ``"rag"`` (retrieval memory; window-relative RoPE, as the reference retrieval model) or
                ``"native"`` (sink + sliding window; absolute RoPE, as Self-Forcing / LongLive).
            noise: ``[B, num_frames, C, H, W]`` initial noise.
            renoise: ``[blocks, steps - 1, ...]``; entry ``[b, j]`` (``B*F*C*H*W`` values in ``[B, F, C, H, W]``
                order) is the noise added after denoising step ``j`` of block ``b``.
            position_mode: override the RoPE position mode (``"absolute"`` / ``"window"``).
            callback: called with a :class:`BlockResult` after every block.
            trace: also return the input and x0 of every forward.

        Returns:
            :class:`GenerationResult`.
        """
        model, cfg, sched = self.model, self.cfg, self.scheduler
        B, F = text_embeddings.shape[0], cfg.frames_per_block
        self._check(text_embeddings, num_frames, mode, noise, renoise, B)
        device, dtype = model.device, model.dtype
        shape = (B, num_frames, cfg.in_dim, cfg.latent_height, cfg.latent_width)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        noise = noise.to(device=device, dtype=dtype)
        rag = mode == "rag"
        cache = model.new_cache(B, position_mode or ("window" if rag else "absolute"),
                                memory_slots=self.retrieval.k if rag else 0)
        model.set_text(cache, text_embeddings)
        memories = [self.memory_factory() for _ in range(B)] if rag else []
        embeddings: list[list[torch.Tensor]] = [[] for _ in range(B)]   # per stream, per frame [D]
        out = torch.zeros(shape, dtype=dtype, device=device)
        steps = len(self.timesteps)
        result = GenerationResult(out)
        if trace:
            result.x_in = torch.zeros((num_frames // F, steps + 1, B, F, *shape[2:]), dtype=dtype)
            result.x0 = torch.zeros_like(result.x_in)

        for b in range(num_frames // F):
            s = b * F
            timings = {}
            t_block = time.perf_counter()
            record = self._retrieve(b, s, cache, memories, embeddings) if rag else None
            _sync(device)
            timings["retrieval"] = time.perf_counter() - t_block
            if record is not None:
                record["retrieval_s"] = timings["retrieval"]

            t0 = time.perf_counter()
            x = noise[:, s:s + F]
            for j in range(steps):
                t = torch.full((B, F), float(self.timesteps[j]), dtype=torch.float32, device=device)
                x0 = sched.to_x0(model(x, t, cache), x, t)
                if trace:
                    result.x_in[b, j], result.x0[b, j] = x.cpu(), x0.cpu()
                if j < steps - 1:
                    eps = (renoise[b, j].reshape(x0.shape).to(device=device, dtype=dtype) if renoise is not None
                           else torch.randn(x0.shape, generator=generator,
                                            device=generator.device if generator else "cpu").to(device, dtype))
                    t_next = torch.full((B, F), float(self.timesteps[j + 1]), dtype=torch.float32, device=device)
                    x = sched.add_noise(x0, eps, t_next)
            out[:, s:s + F] = x0
            _sync(device)
            timings["denoise"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            t_ctx = torch.full((B, F), self.context_noise, dtype=torch.float32, device=device)
            flow = model(x0, t_ctx, cache, update_cache=True)
            if trace:
                result.x_in[b, steps], result.x0[b, steps] = x0.cpu(), sched.to_x0(flow, x0, t_ctx).cpu()
            _sync(device)
            timings["rerun"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            if rag:
                k, v = cache.block_kv()
                for i, memory in enumerate(memories):
                    emb = self.embed(x0[i])
                    embeddings[i].extend(emb.float().unbind(0))
                    memory.append((k[:, i], v[:, i]), emb)
            _sync(device)
            timings["memory"] = time.perf_counter() - t0
            timings["total"] = time.perf_counter() - t_block

            block = BlockResult(b, s, x0, timings, record)
            if callback is not None:
                callback(block)
            result.blocks.append(BlockResult(b, s, None, timings, record))
            if record is not None:
                result.memory_log.append(record)
        return result

    def _retrieve(self, b: int, s: int, cache, memories, embeddings) -> Optional[dict]:
        """Retrieval for the block starting at ``s``: fills (or clears) the cache's memory slots and returns the
        log record (``None`` when nothing was retrieved)."""
        cache.clear_memory()
        if s == 0:
            return None
        selections = [memory.retrieve(embeddings[i][s - 1], s) for i, memory in enumerate(memories)]
        m = len(selections[0])
        if m == 0:
            return None
        kv = [memory.gather(sel) for memory, sel in zip(memories, selections)]
        k = torch.stack([k for k, _ in kv], dim=1)                 # [layers, B, m, T, H, d]
        v = torch.stack([v for _, v in kv], dim=1)
        positions = self._memory_positions(cache, torch.stack([sel.frames for sel in selections]))
        cache.set_memory(k, v, positions)
        sink = self.cfg.sink
        return {
            "block": b,
            "query_frame": s,                    # the reference logs the block start, not the query frame s-1
            "query_embedding_frame": s - 1,
            "num_evicted": max(0, s - self.cfg.window),
            "num_candidates": selections[0].num_candidates,
            "selected_pool_indices": [(sel.frames - sink).tolist() for sel in selections],
            "selected_global_frames": [sel.frames.tolist() for sel in selections],
            "selected_similarities": [sel.scores.tolist() for sel in selections],
            "memory_positions": positions.tolist(),
        }

    def _memory_positions(self, cache, frames: torch.Tensor) -> torch.Tensor:
        """``[B, m]`` temporal positions of the selected ``frames`` ``[B, m]`` under the configured policy."""
        policy = self.retrieval.memory_position
        if policy == "absolute":
            return frames.clone()
        if policy == "ordered":
            first_local = int(cache.plan(self.cfg.frames_per_block).local_pos[0])
            rank = frames.argsort(dim=1).argsort(dim=1)                  # 0 = the oldest selected frame
            return (first_local - frames.shape[1] + rank).clamp(min=0)
        return torch.full_like(frames, policy)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
