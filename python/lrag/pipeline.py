"""The block-autoregressive generation loop (Self-Forcing / LongLive inference, with LongLive-RAG retrieval).

Per block of ``F`` frames starting at frame ``s`` (see docs/generator.md):

1. ``rag`` mode (:class:`lrag.block_memory.BlockMemory`): query = embedding of frame ``s - 1`` (the last frame
   appended to the memory); :meth:`lrag_ext.RetrievalMemory.retrieve` selects up to K frames for all streams in
   one search, and :meth:`~lrag_ext.RetrievalMemory.gather` writes their K/V straight into the cache's memory
   slots, once per block (temporal RoPE positions by ``MemoryConfig.memory_position``: 0, as the reference, by
   default; the model applies RoPE by position at attention time).
2. Denoise: for each warped timestep ``t_j``: flow = model(x, t_j); x0 = x - sigma(t_j) flow (float64); unless
   last, x = (1 - sigma_{j+1}) x0 + sigma_{j+1} eps (float32, eps from ``renoise`` or the generator).
3. Context rerun: one more forward on the clean x0 at t = ``context_noise`` (0) commits the block's clean,
   un-roped K/V to the cache; ``rag`` mode then appends them with the frames' embeddings to the memory (one
   memory stream per batch element).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

import lrag_ext
from lrag_ext.reference import mean_descriptor  # the fallback embedder: spatial mean [N, C, H, W] -> [N, C]
from lrag.block_memory import BlockMemory, Embedder
from lrag.config import memory_config_for
from lrag.models.wan import CausalWanModel
from lrag.scheduler import FlowMatchScheduler

SAMPLERS = ("renoise", "euler")
# What the retrieval memory does with frames generated under an earlier prompt, after a prompt switch
SWITCH_MEMORY = ("recompute", "keep", "forget")


def switch_starts(frames: Sequence[int], num_frames: int, frames_per_block: int,
                  names: Sequence[str] | None = None) -> list[int]:
    """The block start frame at which each prompt switch happens: the first block starting at or after its frame
    (LongLive's interactive pipeline), checked so that every switch does happen, each in its own block.

    Raises:
        ValueError: a frame that is not an int, not after the previous one's block, or after the last block's start
            (it would never happen); the message names the switch as ``names[i]`` (default ``switches[i]``).
    """
    F, starts = frames_per_block, []
    last_start = (num_frames - 1) // F * F
    for i, frame in enumerate(frames):
        name = names[i] if names is not None else f"switches[{i}]"
        if isinstance(frame, bool) or not isinstance(frame, int):
            raise ValueError(f"{name}: the frame must be an int, got {frame!r}")
        low = starts[-1] + 1 if starts else 1
        if not low <= frame <= last_start:
            raise ValueError(f"{name}: frame {frame} must be in [{low}, {last_start}]: after the previous switch's "
                             f"block (one switch per block of {F} frames) and at most the last block's start (a later "
                             f"one would never happen)")
        starts.append(-(-frame // F) * F)
    return starts


class _Lazy:
    """A value computed on first use (a block's memory record reads the selection back from the device)."""

    def __init__(self, make: Callable[[], dict]):
        self._make, self._value = make, None

    def get(self) -> dict:
        if self._make is not None:
            self._value, self._make = self._make(), None
        return self._value


@dataclass
class BlockResult:
    """One finished block, as handed to the callback."""

    index: int
    start_frame: int
    latents: torch.Tensor                  # [B, F, C, H, W]
    timings: dict                          # seconds: retrieval, denoise, rerun, memory, total
    _record: Optional[_Lazy] = field(default=None, repr=False)

    @property
    def memory_record(self) -> Optional[dict]:
        """The reference's log fields when a retrieval happened, else None. Reading it copies the block's selection
        to the host (one synchronisation), so a loop that never looks never waits for the device."""
        return self._record.get() if self._record is not None else None


@dataclass
class GenerationResult:
    latents: torch.Tensor                  # [B, num_frames, C, H, W]
    blocks: list = field(default_factory=list)       # BlockResult per block (latents dropped)
    memory_log: list = field(default_factory=list)   # one record per block with a retrieval
    x_in: Optional[torch.Tensor] = None    # trace: [blocks, steps + 1, B, F, C, H, W] input of every forward
    x0: Optional[torch.Tensor] = None      # trace: same shape, x0 of every forward (the rerun's included)
    switches: list = field(default_factory=list)     # {"frame", "block", "start_frame"} per prompt switch applied


class Pipeline:
    """Generates latent videos block by block with a :class:`CausalWanModel`.

    Args:
        model: the backbone (eval mode, weights loaded).
        denoising_steps: nominal steps, warped through the scheduler table ([1000, 750, 500, 250]).
        first_block_steps: nominal steps for block 0 only (Causal-Forcing's ``denoising_step_list_first_chunk``:
            its 1- and 2-step frame-wise models denoise the first frame in 4 steps); ``None``: block 0 uses
            ``denoising_steps`` like every other block.
        switch_memory: after a prompt switch (``generate(switches=...)``), what ``rag`` mode does with retrieved
            frames: ``"recompute"`` (default) their K/V from their latents under the current prompt, by one t = 0
            forward per retrieval as ``storage="latent"`` does; ``"keep"``: their K/V as computed under the prompt
            of their time; ``"forget"``: frames before the switch are never retrieved again
            (:meth:`lrag_ext.RetrievalMemory.forget_before`, which also frees their K/V). LongLive's re-cache
            recomputes the window's frames under the new prompt; recomputing the retrieved ones treats the memory
            like the window, which is why it is the default (no measurement chose it: docs/generator.md).
        retrieve_every: ``rag`` mode retrieves at blocks ``0, N, 2N, ...`` only; the blocks in between keep the
            frames the last retrieval put in the cache's memory slots (at the same positions). 1 (default):
            every block, as the reference. A frame-wise model (1 frame per block) pays one retrieval per frame, so
            ``N = 3`` gives it the retrieval rate of a 3-frame chunk-wise model.
        scheduler: defaults to ``FlowMatchScheduler(shift=5.0)``.
        context_noise: timestep of the context rerun (0).
        retrieval: the retrieval memory's :class:`lrag_ext.MemoryConfig` for ``rag`` mode (default
            ``MemoryConfig()``): ``top_k``, ``recent_exclude``, ``memory_position``, ``storage`` (``"kv"`` or
            ``"latent"``), the tiers (``device_frames``, ``host_frames``, ``max_frames``, ...). The fields the
            backbone determines (``sink_frames``, ``window_frames``, ``kv_layout``, ``latent_shape``, ``device``,
            ``dtype``, and ``embed_dim`` from the embedder) are filled in by :func:`lrag.config.memory_config_for`:
            leave them at their defaults; a non-default value that disagrees with the model is a ``ValueError``.
        embed: ``[N, C, H, W] -> [N, D]`` frame embedder for retrieval (default: spatial mean).
        sampler: between denoising steps, ``"renoise"`` (the released few-step generators': re-noise ``x0`` to
            the next timestep with fresh noise, ``renoise`` or the generator's) or ``"euler"`` (the deterministic
            flow-ODE step :meth:`FlowMatchScheduler.euler_step`, for models that are not distilled, such as the
            toy generator; it uses no re-noise).

    :attr:`retrieval` holds the config with the backbone's geometry filled in (``sink_frames``,
    ``window_frames``, ``kv_layout``, ``latent_shape``); ``device``, ``dtype`` and ``embed_dim`` stay as given and
    are taken from the model and the embedder when a ``rag`` generation builds its memory (so the model may be
    moved or cast after the pipeline is built; a conflicting non-default value is refused when ``generate``
    starts, before any block). ``rag`` mode keeps its retrieval memory (an
    :class:`lrag_ext.RetrievalMemory`, one memory stream per batch element; its ``config`` is complete) in
    :attr:`memory` after :meth:`generate`, for inspection or :meth:`~lrag_ext.RetrievalMemory.save`.

    Raises:
        TypeError, ValueError: as :func:`lrag.config.memory_config_for` (``storage="embedding"``, a field that
            conflicts with the backbone).
    """

    def __init__(self, model: CausalWanModel, denoising_steps: Sequence[int] = (1000, 750, 500, 250),
                 scheduler: FlowMatchScheduler | None = None, context_noise: float = 0.0,
                 retrieval: lrag_ext.MemoryConfig | None = None, embed: Embedder | None = None,
                 sampler: str = "renoise", first_block_steps: Sequence[int] | None = None,
                 retrieve_every: int = 1, switch_memory: str = "recompute"):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if isinstance(retrieve_every, bool) or not isinstance(retrieve_every, int) or retrieve_every < 1:
            raise ValueError(f"retrieve_every must be an int >= 1, got {retrieve_every!r}")
        self.retrieve_every = retrieve_every
        if switch_memory not in SWITCH_MEMORY:
            raise ValueError(f"switch_memory must be one of {SWITCH_MEMORY}, got {switch_memory!r}")
        self.switch_memory = switch_memory
        self.sampler = sampler
        self.model = model
        self.cfg = model.cfg
        self.scheduler = scheduler or FlowMatchScheduler(5.0)
        self.timesteps = self._warp("denoising_steps", denoising_steps)                      # float32 [S]
        self.first_timesteps = (None if first_block_steps is None
                                else self._warp("first_block_steps", first_block_steps))   # float32 [S0] or None
        self.context_noise = float(context_noise)
        self.retrieval = memory_config_for(self.cfg, retrieval)
        self.embed = embed or mean_descriptor
        self.memory: lrag_ext.RetrievalMemory | None = None

    def _warp(self, name: str, steps: Sequence[int]) -> torch.Tensor:
        try:
            return self.scheduler.warp(list(steps))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: {e}") from None

    def block_timesteps(self, block: int) -> torch.Tensor:
        """The warped timesteps block ``block`` is denoised with (float32 ``[S_b]``)."""
        return self.first_timesteps if block == 0 and self.first_timesteps is not None else self.timesteps

    @property
    def max_steps(self) -> int:
        """The most denoising steps any block takes (the trace's and ``renoise``'s step extent)."""
        return max(len(self.timesteps), 0 if self.first_timesteps is None else len(self.first_timesteps))

    def _memory_config(self, embed_dim: int | None = None) -> lrag_ext.MemoryConfig:
        """:attr:`retrieval` completed from the model as it is now (device, dtype) and the embedder's size."""
        return memory_config_for(self.cfg, self.retrieval, embed_dim, self.model.device, self.model.dtype)

    def _check_switches(self, switches, num_frames: int, text: torch.Tensor
                        ) -> tuple[list[tuple[int, torch.Tensor]], list[int]]:
        """``([(block start, text [B, L, text_dim])], requested frames)`` of ``switches``, checked: each text shaped
        like the first prompt's batch, the frames by :func:`switch_starts`."""
        out = []
        for i, item in enumerate(switches or ()):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"switches[{i}] must be a (frame, text_embeddings) pair, got {item!r}")
            emb = item[1]
            if not isinstance(emb, torch.Tensor) or emb.dim() != 3 or emb.shape[0] != text.shape[0] \
                    or emb.shape[2] != text.shape[2] or not 1 <= emb.shape[1] <= self.cfg.text_len:
                raise ValueError(f"switches[{i}]: text embeddings must be [{text.shape[0]}, L <= {self.cfg.text_len}, "
                                 f"{text.shape[2]}], got "
                                 f"{list(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__}")
            out.append(tuple(item))
        starts = switch_starts([frame for frame, _ in out], num_frames, self.cfg.frames_per_block)
        return [(start, emb) for start, (_, emb) in zip(starts, out)], [frame for frame, _ in out]

    def _check(self, text, num_frames, mode, noise, renoise, B, prefix=None):
        cfg, F = self.cfg, self.cfg.frames_per_block
        if mode not in ("rag", "native"):
            raise ValueError(f"mode must be 'rag' or 'native', got {mode!r}")
        if num_frames < 1 or num_frames % F:
            raise ValueError(f"num_frames must be a positive multiple of frames_per_block={F}, got {num_frames}")
        shape = (B, num_frames, cfg.in_dim, cfg.latent_height, cfg.latent_width)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise must be {list(shape)}, got {list(noise.shape)}")
        if prefix is not None:
            if (not isinstance(prefix, torch.Tensor) or prefix.dim() != 5 or prefix.shape[0] != B
                    or tuple(prefix.shape[2:]) != shape[2:] or prefix.shape[1] % F or prefix.shape[1] > num_frames
                    or not prefix.is_floating_point()):
                raise ValueError(f"prefix must be a float [B={B}, P, {shape[2]}, {shape[3]}, {shape[4]}] tensor with P a "
                                 f"multiple of {F} and <= num_frames={num_frames}, got "
                                 f"{list(prefix.shape) if isinstance(prefix, torch.Tensor) else type(prefix).__name__}")
        if renoise is not None:
            need = (num_frames // F, self.max_steps - 1)
            if tuple(renoise.shape[:2]) != need or renoise[0, 0].numel() != B * F * shape[2] * shape[3] * shape[4]:
                raise ValueError(f"renoise must be [{need[0]}, {need[1]}, ...] with B*F*C*H*W elements per entry, "
                                 f"got {list(renoise.shape)}")

    @torch.no_grad()
    def generate(self, text_embeddings: torch.Tensor, num_frames: int, generator: torch.Generator | None = None,
                 mode: str = "rag", noise: torch.Tensor | None = None, renoise: torch.Tensor | None = None,
                 position_mode: str | None = None, callback: Callable[[BlockResult], None] | None = None,
                 trace: bool = False, profile: bool = False, prefix: torch.Tensor | None = None,
                 switches: Sequence[tuple[int, torch.Tensor]] = ()) -> GenerationResult:
        """Generates ``num_frames`` latent frames.

        Args:
            text_embeddings: ``[B, L, text_dim]`` prompt embeddings (umT5 output for the real model).
            num_frames: a multiple of ``frames_per_block``.
            generator: source of the initial noise and the re-noise when they are not given.
            mode: ``"rag"`` (retrieval memory; window-relative RoPE, as the reference retrieval model) or
                ``"native"`` (sink + sliding window; absolute RoPE, as Self-Forcing / LongLive).
            noise: ``[B, num_frames, C, H, W]`` initial noise.
            renoise: ``[blocks, max_steps - 1, ...]``; entry ``[b, j]`` (``B*F*C*H*W`` values in ``[B, F, C, H, W]``
                order) is the noise added after denoising step ``j`` of block ``b`` (a block with fewer steps than
                :attr:`max_steps` reads only its first ``S_b - 1`` entries).
            position_mode: override the RoPE position mode (``"absolute"`` / ``"window"``).
            callback: called with a :class:`BlockResult` after every block.
            trace: also return the input and x0 of every forward: ``[b, j]`` for denoising step ``j`` of block
                ``b``, ``[b, max_steps]`` for its context rerun; zeros for the steps a block does not take and for
                the denoising steps of prefix blocks.
            prefix: ``[B, P, C, H, W]`` clean latents of the first ``P`` frames (a multiple of
                ``frames_per_block``), e.g. a ground-truth start to continue from: their blocks are not denoised
                (nor do they use ``noise[:, :P]``, ``renoise[:P // F]`` or the generator) but go through everything
                else as generated blocks do (retrieval, the context rerun that commits their K/V, the memory), and
                they are the first ``P`` frames of the result. A run given its own first ``P`` generated frames as
                ``prefix`` (and the same ``noise`` / ``renoise``) reproduces itself exactly.
            switches: prompt switches ``(frame, text_embeddings [B, L, text_dim])``, frames strictly increasing,
                as LongLive's interactive pipeline: at the first block starting at or after ``frame`` (one switch
                per block) the prompt changes and the cache is re-cached (:meth:`CausalWanModel.recache`: the last
                ``min(window, s)`` frames re-run at t = ``context_noise`` under the new prompt; the sink keeps its
                K/V unless the re-run starts at frame 0). ``rag`` mode treats the retrieved frames as
                ``switch_memory`` says. The blocks where a switch happened are in ``GenerationResult.switches``.
            profile: synchronise the device after each phase of a block, so that ``timings`` measure device time.
                Off (the default), the loop never waits for the device: on a GPU ``timings`` then measure the
                host's enqueue time; on the CPU they are the same either way. Memory records are read from the
                device only when used (``BlockResult.memory_record``, ``GenerationResult.memory_log``).

        Returns:
            :class:`GenerationResult`.
        """
        model, cfg, sched = self.model, self.cfg, self.scheduler
        B, F = text_embeddings.shape[0], cfg.frames_per_block
        self._check(text_embeddings, num_frames, mode, noise, renoise, B, prefix)
        switches, switch_frames = self._check_switches(switches, num_frames, text_embeddings)
        n_prefix = 0 if prefix is None else prefix.shape[1]
        device, dtype = model.device, model.dtype
        shape = (B, num_frames, cfg.in_dim, cfg.latent_height, cfg.latent_width)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        noise = noise.to(device=device, dtype=dtype)
        rag = mode == "rag"
        if rag:
            self._memory_config()   # a device/dtype conflict is refused now, not after the first block
        cache = model.new_cache(B, position_mode or ("window" if rag else "absolute"),
                                memory_slots=self.retrieval.top_k if rag else 0)
        model.set_text(cache, text_embeddings)
        self.memory = None          # created at the first append, when the embedding size is known
        memory = BlockMemory(model, self._memory_config, self.embed) if rag else None
        out = torch.zeros(shape, dtype=dtype, device=device)
        steps = self.max_steps                      # the trace's slot of the context rerun
        result = GenerationResult(out)
        if trace:
            result.x_in = torch.zeros((num_frames // F, steps + 1, B, F, *shape[2:]), dtype=dtype)
            result.x0 = torch.zeros_like(result.x_in)

        next_switch = 0
        for b in range(num_frames // F):
            s = b * F
            timings = {}
            t_block = time.perf_counter()
            switched = next_switch < len(switches) and s == switches[next_switch][0]
            if switched:
                # LongLive's interactive pipeline: at the first block starting at or after the switch's frame
                model.set_text(cache, switches[next_switch][1])
                model.recache(out[:, s - min(cfg.window, s):s], cache, self.context_noise)
                if rag:
                    memory.after_switch(self.switch_memory, s, out)
                result.switches.append({"frame": switch_frames[next_switch], "block": b, "start_frame": s})
                next_switch += 1
            # a switch block always retrieves afresh: held slots would carry the old prompt's frames over
            hold = b % self.retrieve_every != 0 and not switched
            plan = memory.retrieve(s, cache, hold=hold) if rag else None
            _sync(device, profile)
            timings["retrieval"] = time.perf_counter() - t_block

            t0 = time.perf_counter()
            if s < n_prefix:       # a given clean block: nothing to denoise
                x0 = prefix[:, s:s + F].to(device=device, dtype=dtype)
            else:
                x = noise[:, s:s + F]
                timesteps = self.block_timesteps(b)
                for j in range(len(timesteps)):
                    t = torch.full((B, F), float(timesteps[j]), dtype=torch.float32, device=device)
                    flow = model(x, t, cache)
                    x0 = sched.to_x0(flow, x, t)
                    if trace:
                        result.x_in[b, j], result.x0[b, j] = x.cpu(), x0.cpu()
                    if j == len(timesteps) - 1:
                        break
                    t_next = torch.full((B, F), float(timesteps[j + 1]), dtype=torch.float32, device=device)
                    if self.sampler == "euler":
                        x = sched.euler_step(x, flow, t, t_next)
                        continue
                    eps = (renoise[b, j].reshape(x0.shape).to(device=device, dtype=dtype) if renoise is not None
                           else torch.randn(x0.shape, generator=generator,
                                            device=generator.device if generator else "cpu").to(device, dtype))
                    x = sched.add_noise(x0, eps, t_next)
            out[:, s:s + F] = x0
            _sync(device, profile)
            timings["denoise"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            t_ctx = torch.full((B, F), self.context_noise, dtype=torch.float32, device=device)
            flow = model(x0, t_ctx, cache, update_cache=True)
            if trace:
                result.x_in[b, steps], result.x0[b, steps] = x0.cpu(), sched.to_x0(flow, x0, t_ctx).cpu()
            _sync(device, profile)
            timings["rerun"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            if rag:
                memory.append(x0, cache)
                self.memory = memory.memory
            _sync(device, profile)
            timings["memory"] = time.perf_counter() - t0
            timings["total"] = time.perf_counter() - t_block
            record = None
            if plan is not None:
                record = _Lazy(functools.partial(memory.record, b, s, cache.mem_positions.clone(),
                                                 memory.retrievals - 1, timings["retrieval"]))
            if callback is not None:
                callback(BlockResult(b, s, x0, timings, record))
            result.blocks.append(BlockResult(b, s, None, timings, record))
        result.memory_log = [blk.memory_record for blk in result.blocks if blk._record is not None]
        return result


def _sync(device: torch.device, profile: bool) -> None:
    """Waits for the device only when profiling (timings of device time)."""
    if profile and device.type == "cuda":
        torch.cuda.synchronize(device)
