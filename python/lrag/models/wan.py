"""The causal Wan DiT (Wan2.1 layout) with per-frame timesteps and a ``[sink | memory | local]`` KV cache.

Module and parameter names follow the original Wan checkpoints (``patch_embedding``, ``text_embedding.{0,2}``,
``time_embedding.{0,2}``, ``time_projection.1``, ``blocks.N.{self_attn,cross_attn}.{q,k,v,o,norm_q,norm_k}``,
``blocks.N.{norm3,ffn.0,ffn.2,modulation}``, ``head.{head,modulation}``), so released Self-Forcing /
Causal-Forcing / LongLive generator weights load directly (see :mod:`lrag.checkpoint`).

One forward processes one block of ``F`` latent frames ``[B, F, C, H, W]`` with timesteps ``[B, F]`` and returns
the flow prediction. Self-attention attends, per layer,

``[sink frames | memory frames (retrieved) | the last `local_budget` frames of the window, incl. the block]``

where the *window* is the sink plus the most recent ``window - sink`` frames of (committed cache + this block).
K is cached **without** RoPE; RoPE is applied at attention time by frame position:

- ``"absolute"`` (Self-Forcing / LongLive native): the position of a frame is its global frame index. (The
  native code stores post-RoPE K at absolute positions; since RoPE is applied per token, roping the stored
  un-roped K at the same position at attention time gives the same numbers.)
- ``"window"`` (the LongLive-RAG retrieval model): a frame's position is its slot in the window (sink at 0, the
  current block at the last slots once the window is full); memory frames take the positions given with them
  (0, the sink's phase, in the reference).

With ``memory_slots = K > 0`` the local budget is ``window - sink - K`` frames from the start (the reference
reduces it even before anything is retrieved), otherwise ``window - sink``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lrag.config import WanConfig
from lrag.models.rope import Rope3D

POSITION_MODES = ("absolute", "window")


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """``[N, dim]`` float64 embedding of timesteps ``t`` ``[N]``: ``[cos(t w_j) | sin(t w_j)]``,
    ``w_j = 10000^(-j / (dim/2))``."""
    half = dim // 2
    t = t.to(torch.float64)
    angles = torch.outer(t, torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half)))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain attention over ``[B, L, H, d]`` tensors (no mask, scale ``1/sqrt(d)``); returns ``[B, Lq, H*d]``."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous().flatten(2)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim, normalised in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm that returns the input dtype (affine only where the checkpoint has weights)."""

    def __init__(self, dim: int, eps: float, affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).type_as(x)


@dataclass
class TextContext:
    """Per-layer cross-attention keys/values of the text, computed once per prompt: ``k[l], v[l]``
    ``[B, text_len, heads, head_dim]``."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]


@dataclass(frozen=True)
class _Plan:
    """Which frames one forward attends to, shared by all layers (indices into committed + new frames)."""

    n_committed: int
    n_sink: int            # sink frames: full[:, :n_sink]
    local_start: int       # local frames: full[:, local_start:]
    sink_pos: torch.Tensor
    local_pos: torch.Tensor
    query_pos: torch.Tensor
    keep_ids: list[int]    # the window after a commit: full[:, :n_sink] + the last window - sink frames


def _long(values: list[int]) -> torch.Tensor:
    """A host int64 tensor of positions."""
    return torch.tensor(values, dtype=torch.long)


@dataclass(frozen=True)
class _RecachePlan:
    """A re-cache forward (LongLive's prompt switch, :meth:`CausalWanModel.recache`): the last
    ``num_new = min(window, s)`` frames ``first .. s - 1`` run again as one forward. Their queries attend, all of
    them, to the whole window ``[sink | rest]`` at once (no causal order inside it): the sink's committed K/V when
    the re-run starts after frame 0 (``old_sink`` frames, kept as they were: LongLive's ``global_sink``), else its
    new K/V, then the new K/V of every other frame of the window, ``new[:, write_from:]``. Those are the K/V the
    re-cache writes; re-run frames before them (already out of the window) are queries only."""

    first: int
    num_new: int
    old_sink: int
    write_from: int
    key_pos: torch.Tensor      # [sink | written] positions
    query_pos: torch.Tensor


class KVCache:
    """Self-attention cache of one generation (all layers), plus the memory slots and the text context.

    Layout (per layer, un-roped K and V), chosen so that nothing is shifted or re-copied as the window slides:

    - ``k[l]``, ``v[l]`` ``[B, ring + sink, T, H, d]``: every committed frame ``g`` at ring slot ``g % ring``,
      ``ring = ceil((window - sink) / F) * F`` (``F`` = frames per block), and the sink frames also at
      ``[ring, ring + sink)``, where they stay.
      A commit writes only the block's own frames; the frames of the window (``frame_ids``, in slot order
      ``[sink | most recent]``) are read in that order from the sink slots and at most two ring runs. A block of
      ``F`` frames starting at a multiple of ``F`` occupies consecutive ring slots, so :meth:`block_kv` is a view.
    - memory slots ``mem_k[l]`` ``[B, memory_slots, T, H, d]`` holding ``mem_count`` retrieved frames at temporal
      ``mem_positions``.
    - per layer, the keys (roped) and values attention reads, ``[B, sink + memory_slots + window, T, H, d]`` in
      the order ``[sink | memory | local]`` (the order of the reference, which fixes the float sums of
      attention): written once per block for the committed part, and per forward for the block's own frames.

    Created by :meth:`CausalWanModel.new_cache`.
    """

    def __init__(self, cfg: WanConfig, batch: int, dtype: torch.dtype, device, position_mode: str,
                 memory_slots: int):
        if position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {position_mode!r}")
        if memory_slots < 0 or cfg.window - cfg.sink - memory_slots < 1:
            raise ValueError(f"memory_slots must be in [0, window - sink - 1] = [0, {cfg.window - cfg.sink - 1}], "
                             f"got {memory_slots}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.cfg = cfg
        self.position_mode = position_mode
        self.memory_slots = memory_slots
        self.local_budget = cfg.window - cfg.sink - memory_slots if memory_slots else cfg.window - cfg.sink
        self.ring = -(-(cfg.window - cfg.sink) // cfg.frames_per_block) * cfg.frames_per_block
        shape = (cfg.num_layers, batch, self.ring + cfg.sink, cfg.tokens_per_frame, cfg.num_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        mshape = (cfg.num_layers, batch, memory_slots, cfg.tokens_per_frame, cfg.num_heads, cfg.head_dim)
        self.mem_k = torch.zeros(mshape, dtype=dtype, device=device)
        self.mem_v = torch.zeros(mshape, dtype=dtype, device=device)
        self.mem_positions = torch.zeros((batch, 0), dtype=torch.long)   # [B, m] on the host: it sizes the keys
        self.frame_ids: list[int] = []
        self.num_frames = 0
        self.text: TextContext | None = None
        self._last_block: tuple[int, int] | None = None   # (first frame, frames) of the last commit
        self._mem_version = 0                    # bumped by set_memory / clear_memory
        self._prefix: dict = {}                  # layer -> keys of the current block's prefix in its buffers
        self._plan_cache: tuple | None = None    # ((num_frames, num_new), _Plan) of the current block
        self._attn: dict = {}                    # layer -> (roped keys, values) buffers attention reads
        self._prefix_key: tuple | None = None

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def mem_count(self) -> int:
        return int(self.mem_positions.shape[1])

    def set_memory(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | int = 0) -> None:
        """Places ``m`` retrieved frames into the memory slots (once per block, before its forwards).

        Args:
            k, v: ``[layers, m, T, H, d]`` (batch 1) or ``[layers, B, m, T, H, d]``, un-roped.
            positions: temporal RoPE positions: one int for all (0 = the sink's phase, as the reference), ``[m]``
                for every stream, or ``[B, m]`` per stream.

        Raises:
            ValueError: wrong shapes, ``m > memory_slots``, or positions of the wrong length. The cache is unchanged.
        """
        if k.dim() == 5:
            k, v = k.unsqueeze(1), v.unsqueeze(1)
        L, B, _, T, H, d = self.mem_k.shape
        if k.dim() != 6 or k.shape != v.shape or k.shape[:2] != (L, B) or k.shape[3:] != (T, H, d):
            raise ValueError(f"memory k/v must be [{L}, {B}, m, {T}, {H}, {d}] (or without the batch dim for B=1), "
                             f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
        m = k.shape[2]
        if m > self.memory_slots:
            raise ValueError(f"{m} memory frames exceed the cache's memory_slots={self.memory_slots}")
        positions = self._check_positions(positions, m)
        self.mem_k[:, :, :m] = k.to(self.mem_k.dtype)
        self.mem_v[:, :, :m] = v.to(self.mem_v.dtype)
        self.set_memory_positions(positions)

    def memory_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory slots ``mem_k, mem_v`` ``[layers, B, memory_slots, T, H, d]`` (un-roped), for a retrieval
        memory to write into directly (``lrag_ext.RetrievalMemory.gather``); then call
        :meth:`set_memory_positions` to declare how many slots are filled."""
        return self.mem_k, self.mem_v

    def set_memory_positions(self, positions: torch.Tensor) -> None:
        """Declares that the first ``m`` memory slots hold retrieved frames at temporal ``positions`` ``[B, m]``."""
        if not isinstance(positions, torch.Tensor) or positions.dim() != 2:
            raise ValueError(f"positions must be a [B={self.batch}, m] tensor, got {positions!r}")
        positions = self._check_positions(positions, positions.shape[1])
        if positions.shape[1] > self.memory_slots:
            raise ValueError(f"{positions.shape[1]} memory frames exceed the cache's memory_slots={self.memory_slots}")
        self.mem_positions = positions.clone()
        self._mem_version += 1

    def _check_positions(self, positions, m: int) -> torch.Tensor:
        B = self.batch
        positions = torch.as_tensor(positions, dtype=torch.long).cpu()
        if positions.dim() == 0:
            positions = positions.expand(m)
        if positions.dim() == 1:
            positions = positions[None].expand(B, -1)
        if positions.shape != (B, m):
            raise ValueError(f"positions must be an int, [m={m}] or [B={B}, m={m}], got {list(positions.shape)}")
        if positions.numel() and int(positions.min()) < 0:
            raise ValueError(f"positions must be >= 0, got {positions.tolist()}")
        return positions

    def clear_memory(self) -> None:
        self.mem_positions = self.mem_positions[:, :0]
        self._mem_version += 1

    def block_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[layers, B, F, T, H, d]`` (un-roped) of the last committed block (its t = 0 context rerun).

        Views of the cache when the block's ring slots are consecutive (always for blocks of ``frames_per_block``
        frames), a copy otherwise: read them (e.g. ``RetrievalMemory.append`` copies them) before the next commit,
        and never write into them (that would change the cache's window)."""
        if self._last_block is None:
            raise RuntimeError("no block has been committed to this cache yet")
        first, n = self._last_block
        runs = self._ring_runs(first, n)
        if len(runs) == 1:
            slot = runs[0][0]
            return self.k[:, :, slot:slot + n], self.v[:, :, slot:slot + n]
        return tuple(torch.cat([store[:, :, slot:slot + length] for slot, _, length in runs], dim=2)
                     for store in (self.k, self.v))

    def _ring_runs(self, first: int, count: int) -> list[tuple[int, int, int]]:
        """``(cache slot, offset, length)`` runs of consecutive slots holding frames ``first .. first + count - 1``
        in the ring (one run, or two where the ring wraps)."""
        runs, offset = [], 0
        while offset < count:
            start = (first + offset) % self.ring
            length = min(count - offset, self.ring - start)
            runs.append((start, offset, length))
            offset += length
        return runs

    def _committed(self, store: torch.Tensor, layer: int, start: int, stop: int) -> list[torch.Tensor]:
        """Views ``[B, n, T, H, d]`` of committed frames ``frame_ids[start:stop]`` of ``layer``, in slot order (sink
        frames from their slots, the rest from at most two ring runs)."""
        n_sink = min(self.cfg.sink, len(self.frame_ids))
        parts = []
        if start < n_sink:
            parts.append(store[layer, :, self.ring + start:self.ring + min(stop, n_sink)])
            start = n_sink
        if start < stop:
            parts += [store[layer, :, slot:slot + length]
                      for slot, _, length in self._ring_runs(self.frame_ids[start], stop - start)]
        return parts

    def plan(self, num_new: int) -> _Plan:
        """Frames attended by a block of ``num_new`` frames following the committed ones (made once per block and
        size: every forward of a block uses the same plan, until the next commit)."""
        cfg = self.cfg
        if not 1 <= num_new <= cfg.window - cfg.sink:
            raise ValueError(f"a block must have 1..{cfg.window - cfg.sink} frames, got {num_new}")
        key = (self.num_frames, num_new)
        if self._plan_cache is None or self._plan_cache[0] != key:
            self._plan_cache = (key, self._make_plan(num_new))
        return self._plan_cache[1]

    def _make_plan(self, num_new: int) -> _Plan:
        cfg = self.cfg
        n_c = len(self.frame_ids)
        total = n_c + num_new
        ids = self.frame_ids + list(range(self.num_frames, self.num_frames + num_new))
        n_sink = min(cfg.sink, total)
        keep_rest = min(total - n_sink, cfg.window - cfg.sink)
        keep_start = total - keep_rest
        n_local = min(keep_rest, self.local_budget)
        local_start = total - n_local
        if self.position_mode == "absolute":
            pos = ids
        else:  # slot index in the window [sink | kept rest]
            pos = list(range(n_sink)) + [None] * (keep_start - n_sink) + list(range(n_sink, n_sink + keep_rest))
        return _Plan(n_committed=n_c, n_sink=n_sink, local_start=local_start, sink_pos=_long(pos[:n_sink]),
                     local_pos=_long(pos[local_start:]), query_pos=_long(pos[total - num_new:]),
                     keep_ids=ids[:n_sink] + ids[keep_start:])

    def recache_plan(self) -> _RecachePlan:
        """The plan of a re-cache forward over the last ``min(window, num_frames)`` frames (see
        :class:`_RecachePlan`).

        Raises:
            ValueError: no frame has been committed.
        """
        cfg, s = self.cfg, self.num_frames
        if s == 0:
            raise ValueError("nothing to re-cache: no frame has been committed to this cache")
        n = min(cfg.window, s)
        first = s - n
        n_sink = min(cfg.sink, len(self.frame_ids))
        rest = self.frame_ids[n_sink:]                   # the window's other frames, consecutive up to s - 1
        old_sink = n_sink if first > 0 else 0
        write_from = n - len(rest) if first > 0 else 0
        if self.position_mode == "absolute":
            key_pos, query_pos = self.frame_ids, list(range(first, s))
        else:  # slot index in the window [sink | rest]; re-run frames already out of it are queries only
            key_pos = list(range(len(self.frame_ids)))
            query_pos = [self.frame_ids.index(f) if f in self.frame_ids else 0 for f in range(first, s)]
        return _RecachePlan(first=first, num_new=n, old_sink=old_sink, write_from=write_from,
                            key_pos=_long(key_pos), query_pos=_long(query_pos))

    def _recache_kv(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, plan: _RecachePlan, rope: Rope3D):
        """Roped keys and values ``[sink | written]`` of a re-cache forward (no memory frames)."""
        sink = slice(self.ring, self.ring + plan.old_sink)
        keys, vals = k_new[:, plan.write_from:], v_new[:, plan.write_from:]
        if plan.old_sink:
            keys = torch.cat([self.k[layer, :, sink], keys], dim=1)
            vals = torch.cat([self.v[layer, :, sink], vals], dim=1)
        return rope.apply(keys, plan.key_pos), vals

    def commit_recache(self, new_k: list[torch.Tensor], new_v: list[torch.Tensor], plan: _RecachePlan) -> None:
        """Writes the re-cache forward's K/V of the window's frames (``new[:, write_from:]``) into their ring slots,
        and into the sink slots too when the re-run started at frame 0. The window's frames stay the same."""
        n_sink = min(self.cfg.sink, plan.num_new) if plan.first == 0 else 0    # the sink re-run too
        self._write_frames(plan.first + plan.write_from, [k[:, plan.write_from:] for k in new_k],
                           [v[:, plan.write_from:] for v in new_v], n_sink)
        self._prefix_key = None          # the committed keys changed: the per-block roped prefix is stale

    def _write_frames(self, first: int, new_k: list[torch.Tensor], new_v: list[torch.Tensor], n_sink: int) -> None:
        """Writes frames ``first ..`` (one ``[B, n, T, H, d]`` K and V per layer) into their ring slots, and the
        first ``n_sink`` of them into the sink slots ``first ..`` too."""
        runs = self._ring_runs(first, new_k[0].shape[1])
        for layer, (k_new, v_new) in enumerate(zip(new_k, new_v)):
            for store, new in ((self.k, k_new), (self.v, v_new)):
                for slot, offset, length in runs:
                    store[layer, :, slot:slot + length] = new[:, offset:offset + length]
                if n_sink:
                    store[layer, :, self.ring + first:self.ring + first + n_sink] = new[:, :n_sink]

    def attention_kv(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, plan: _Plan):
        """Un-roped keys, values ``[B, Nk, T, H, d]`` and key positions ``[B, Nk]`` for ``layer`` (copies: the
        general path, for blocks that overlap the sink; :meth:`roped_attention_kv` is the per-block one)."""
        n_c, m = plan.n_committed, self.mem_count
        out = []
        for store, mem, new in ((self.k, self.mem_k, k_new), (self.v, self.mem_v, v_new)):
            full = torch.cat(self._committed(store, layer, 0, n_c) + [new], dim=1)
            out.append(torch.cat([full[:, :plan.n_sink], mem[layer, :, :m], full[:, plan.local_start:]], dim=1))
        return out[0], out[1], self._positions(plan, plan.local_pos)

    def _positions(self, plan: _Plan, local_pos: torch.Tensor) -> torch.Tensor:
        """``[B, n_sink + m + len(local_pos)]`` positions of ``[sink | memory | local]`` keys."""
        B = self.batch
        return torch.cat([plan.sink_pos.expand(B, -1), self.mem_positions, local_pos.expand(B, -1)], dim=1)

    def roped_attention_kv(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, plan: _Plan,
                           rope: Rope3D):
        """Roped keys and values ``[B, Nk, T, H, d]`` for ``layer``.

        The committed part of the key set (sink, memory, committed local frames) and its positions do not change
        between the forwards of one block, so it is roped once per block and reused; only the block's own frames
        are roped per forward. RoPE acts per token, so the result equals roping the whole key set at once.

        A forward that records gradients (training) takes the general path too: the attention buffers are
        written in place and reused by the next forward, so they cannot carry an autograd graph.
        """
        if isinstance(plan, _RecachePlan):
            return self._recache_kv(layer, k_new, v_new, plan, rope)
        if plan.n_sink > plan.n_committed or plan.local_start > plan.n_committed or (
                torch.is_grad_enabled() and (k_new.requires_grad or v_new.requires_grad)):
            # the block overlaps the sink (first block), is not wholly attended, or is differentiated: rope
            # everything
            keys, vals, pos = self.attention_kv(layer, k_new, v_new, plan)
            return rope.apply(keys, pos), vals
        n_c, F = plan.n_committed, k_new.shape[1]
        key = (self.num_frames, F, self._mem_version)
        if self._prefix_key != key:
            self._prefix, self._prefix_key = {}, key
        buf_k, buf_v = self._attention_buffers(layer, k_new, v_new)
        if layer not in self._prefix:
            # [sink | memory | committed local]: roped keys and values written part by part (no concatenation)
            # once per block into the layer's attention buffers; every forward of the block then writes only its
            # own frames behind them.
            offset = 0
            for k, v, positions in self._prefix_parts(layer, plan):
                n = k.shape[1]
                rope.apply(k, positions, out=buf_k[:, offset:offset + n])
                buf_v[:, offset:offset + n] = v
                offset += n
            self._prefix[layer] = offset
        P = self._prefix[layer]
        rope.apply(k_new, plan.local_pos[n_c - plan.local_start:], out=buf_k[:, P:P + F])
        buf_v[:, P:P + F] = v_new
        return buf_k[:, :P + F], buf_v[:, :P + F]

    def _prefix_parts(self, layer: int, plan: _Plan) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(k, v, positions)`` views of the committed keys ``[sink | memory | committed local]`` of ``layer`` in
        attention order (empty parts left out), for a plan whose sink and local frames are all committed."""
        n_c, m, start = plan.n_committed, self.mem_count, plan.local_start
        sink = slice(self.ring, self.ring + plan.n_sink)
        parts = [(self.k[layer, :, sink], self.v[layer, :, sink], plan.sink_pos),
                 (self.mem_k[layer, :, :m], self.mem_v[layer, :, :m], self.mem_positions)]
        if n_c > start:
            local = plan.local_pos[:n_c - start]
            parts += [(self.k[layer, :, slot:slot + n], self.v[layer, :, slot:slot + n], local[offset:offset + n])
                      for slot, offset, n in self._ring_runs(self.frame_ids[start], n_c - start)]
        return [part for part in parts if part[0].shape[1]]

    def _attention_buffers(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        """The layer's preallocated ``[B, sink + memory_slots + window, T, H, d]`` roped-key and value buffers that
        attention reads (allocated at the first forward, in the activations' dtype)."""
        bufs = self._attn.get(layer)
        if bufs is None or bufs[0].dtype != k_new.dtype or bufs[1].dtype != v_new.dtype:
            cfg = self.cfg
            shape = (self.batch, cfg.sink + self.memory_slots + cfg.window) + tuple(k_new.shape[2:])
            bufs = self._attn[layer] = (k_new.new_empty(shape), v_new.new_empty(shape))
            self._prefix.pop(layer, None)  # a new buffer holds no prefix yet
        return bufs

    def commit(self, new_k: list[torch.Tensor], new_v: list[torch.Tensor], plan: _Plan) -> None:
        """Writes the block's K/V (one ``[B, F, T, H, d]`` per layer, from :meth:`plan` of this state) into its
        ring slots, and frames ``< sink`` also in the sink slots. Frames leaving the window are dropped from
        ``frame_ids`` only: nothing else is moved or copied."""
        L, B, _, T, H, d = self.k.shape
        if not len(new_k) == len(new_v) == L:
            raise ValueError(f"commit needs one K and one V per layer ({L}), got {len(new_k)} and {len(new_v)}")
        first, n = self.num_frames, new_k[0].shape[1]
        if any(tuple(t.shape) != (B, n, T, H, d) for t in (*new_k, *new_v)):
            raise ValueError(f"commit needs K/V of [B={B}, n={n}, T={T}, H={H}, d={d}] in every layer, got "
                             f"{sorted({tuple(t.shape) for t in (*new_k, *new_v)})}")
        if plan.n_committed != len(self.frame_ids) or plan.keep_ids[-1] != first + n - 1:
            raise ValueError("commit needs the plan of this cache's current state and the block it was made for")
        self._write_frames(first, new_k, new_v, max(0, min(self.cfg.sink - first, n)))
        self.frame_ids = plan.keep_ids
        self.num_frames += n
        self._last_block = (first, n)


class _AttentionProjections(nn.Module):
    """The q, k, v, o projections and q/k RMSNorms of a Wan attention layer (checkpoint names ``q``, ``k``,
    ``v``, ``o``, ``norm_q``, ``norm_k``), shared by self- and cross-attention."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()


class SelfAttention(_AttentionProjections):
    def forward(self, x: torch.Tensor, frames: int, cache: KVCache, layer: int, plan: _Plan, rope: Rope3D):
        """``x`` ``[B, F*T, dim]`` -> (output ``[B, F*T, dim]``, this block's un-roped k, v ``[B, F, T, H, d]``)."""
        B = x.shape[0]
        shape = (B, frames, -1, self.heads, self.head_dim)
        q = self.norm_q(self.q(x)).view(shape)
        k = self.norm_k(self.k(x)).view(shape)
        v = self.v(x).view(shape)
        keys, vals = cache.roped_attention_kv(layer, k, v, plan, rope)
        q_r = rope.apply(q, plan.query_pos).flatten(1, 2)
        return self.o(_sdpa(q_r, keys.flatten(1, 2), vals.flatten(1, 2))), (k, v)


class CrossAttention(_AttentionProjections):
    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = context.shape[0]
        k = self.norm_k(self.k(context)).view(B, -1, self.heads, self.head_dim)
        return k, self.v(context).view(B, -1, self.heads, self.head_dim)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(self.q(x)).view(x.shape[0], -1, self.heads, self.head_dim)
        return self.o(_sdpa(q, k, v))


class AttentionBlock(nn.Module):
    """``x += SA(LN(x)(1+e1)+e0) e2; x += CA(LN_affine(x), text); x += FFN(LN(x)(1+e4)+e3) e5``, with the six
    modulation vectors ``e = modulation + time_projection(t)`` per frame."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, cfg.eps)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = LayerNorm(cfg.dim, cfg.eps, affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm(cfg.dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e0, text_k, text_v, cache: KVCache, layer: int, plan: _Plan, rope: Rope3D):
        """``x`` ``[B, F*T, dim]``, ``e0`` ``[B, F, 6, dim]``."""
        frames = e0.shape[1]
        per_frame = lambda t: t.unflatten(1, (frames, -1))  # noqa: E731  [B, F*T, C] -> [B, F, T, C]
        e = (self.modulation.unsqueeze(1) + e0).chunk(6, dim=2)   # each [B, F, 1, dim]
        y, kv = self.self_attn((per_frame(self.norm1(x)) * (1 + e[1]) + e[0]).flatten(1, 2), frames, cache, layer,
                               plan, rope)
        x = x + (per_frame(y) * e[2]).flatten(1, 2)
        x = x + self.cross_attn(self.norm3(x), text_k, text_v)
        y = self.ffn((per_frame(self.norm2(x)) * (1 + e[4]) + e[3]).flatten(1, 2))
        x = x + (per_frame(y) * e[5]).flatten(1, 2)
        return x, kv


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, F*T, dim]``, ``e`` ``[B, F, 1, dim]`` -> ``[B, F, T, prod(patch) * out_dim]``."""
        e = (self.modulation.unsqueeze(1) + e).chunk(2, dim=2)
        return self.head(self.norm(x).unflatten(1, (e[0].shape[1], -1)) * (1 + e[1]) + e[0])


class CausalWanModel(nn.Module):
    """The block-causal Wan DiT. See the module docstring for the cache layout and the position modes.

    Typical use::

        cache = model.new_cache(batch=1, position_mode="window", memory_slots=6)
        model.set_text(cache, text_embeddings)            # [B, L <= text_len, text_dim]
        flow = model(x_t, t, cache)                       # a denoising step: cache untouched
        model(x0, torch.zeros_like(t), cache, update_cache=True)   # context rerun: commits the block
        k, v = cache.block_kv()                           # [layers, B, F, T, H, d], for the memory
    """

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(AttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.rope = Rope3D(cfg.head_dim, cfg.grid, cfg.rope_max_positions, cfg.rope_theta)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def new_cache(self, batch: int = 1, position_mode: str = "absolute", memory_slots: int = 0,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache; ``memory_slots`` > 0 reserves retrieved-frame slots and shortens the local window."""
        return KVCache(self.cfg, batch, dtype or self.dtype, self.device, position_mode, memory_slots)

    def set_text(self, cache: KVCache, text: torch.Tensor) -> None:
        """Embeds the prompt ``[B, L, text_dim]`` (zero-padded to ``text_len``) and stores every layer's
        cross-attention K/V in ``cache`` (computed once per generation)."""
        cfg = self.cfg
        if text.dim() != 3 or text.shape[0] != cache.batch or text.shape[2] != cfg.text_dim \
                or text.shape[1] > cfg.text_len:
            raise ValueError(f"text must be [{cache.batch}, L <= {cfg.text_len}, {cfg.text_dim}], "
                             f"got {tuple(text.shape)}")
        text = text.to(device=self.device, dtype=self.dtype)
        text = torch.cat([text, text.new_zeros(text.shape[0], cfg.text_len - text.shape[1], text.shape[2])], dim=1)
        context = self.text_embedding(text)
        kv = [blk.cross_attn.text_kv(context) for blk in self.blocks]
        cache.text = TextContext([k for k, _ in kv], [v for _, v in kv])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cache: KVCache, update_cache: bool = False):
        """Flow prediction for the block following the committed frames of ``cache``.

        Args:
            x: ``[B, F, C, H, W]`` noisy latents of the block (model dtype).
            timestep: ``[B, F]`` per-frame timesteps (0 for the context rerun).
            cache: from :meth:`new_cache`, with :meth:`set_text` done.
            update_cache: commit this forward's K/V as the block's clean context (the t = 0 rerun).

        Returns:
            flow ``[B, F, C, H, W]``.
        """
        cfg = self.cfg
        if cache.text is None:
            raise RuntimeError("call set_text(cache, text_embeddings) before the first forward")
        B, frames = x.shape[:2]
        if x.dim() != 5 or B != cache.batch or x.shape[2:] != (cfg.in_dim, cfg.latent_height, cfg.latent_width):
            raise ValueError(f"x must be [{cache.batch}, F, {cfg.in_dim}, {cfg.latent_height}, {cfg.latent_width}], "
                             f"got {tuple(x.shape)}")
        if timestep.shape != (B, frames):
            raise ValueError(f"timestep must be [{B}, {frames}], got {tuple(timestep.shape)}")
        plan = cache.plan(frames)
        flow, new_k, new_v = self._run(x, timestep, cache, plan)
        if update_cache:
            cache.commit(new_k, new_v, plan)
        return flow

    def _run(self, x: torch.Tensor, timestep: torch.Tensor, cache: KVCache, plan):
        """The forward for ``plan``: (flow ``[B, F, C, H, W]``, this forward's un-roped K and V per layer)."""
        cfg = self.cfg
        B, frames = x.shape[:2]
        # [B, F*T, dim], made contiguous once here: in the conv's layout every LayerNorm would copy it (3 a layer)
        tokens = self.patch_embedding(x.permute(0, 2, 1, 3, 4)).flatten(2).transpose(1, 2).contiguous()
        e = self.time_embedding(sinusoidal_embedding(cfg.freq_dim, timestep.flatten()).to(tokens.dtype))
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim)).unflatten(0, (B, frames))   # [B, F, 6, dim]
        new_k, new_v = [], []
        for layer, block in enumerate(self.blocks):
            tokens, (k, v) = block(tokens, e0, cache.text.k[layer], cache.text.v[layer], cache, layer, plan, self.rope)
            new_k.append(k)
            new_v.append(v)
        out = self.head(tokens, e.unflatten(0, (B, frames)).unsqueeze(2))
        return self.unpatchify(out), new_k, new_v

    def recache(self, latents: torch.Tensor, cache: KVCache, timestep: float = 0.0) -> torch.Tensor:
        """LongLive's re-cache after a prompt switch: the last ``n = min(window, s)`` clean frames run again, as one
        forward at ``t = timestep`` (the context noise, 0) under the cache's current text (set the new prompt with
        :meth:`set_text` first), and their new K/V replace the window's (the sink's only when the re-run starts at
        frame 0). See :class:`_RecachePlan` for what the re-run frames attend to.

        Args:
            latents: ``[B, n, C, H, W]``: frames ``s - n .. s - 1`` as generated.
            cache: the generation's cache, ``s = cache.num_frames`` frames committed.

        Returns:
            the re-run's flow ``[B, n, C, H, W]`` (LongLive discards it; for checks).

        Raises:
            ValueError: nothing committed yet, or ``latents`` of the wrong shape.
        """
        cfg = self.cfg
        plan = cache.recache_plan()
        want = (cache.batch, plan.num_new, cfg.in_dim, cfg.latent_height, cfg.latent_width)
        if tuple(latents.shape) != want:
            raise ValueError(f"latents must be the last {plan.num_new} frames {list(want)}, got {list(latents.shape)}")
        t = torch.full(want[:2], float(timestep), dtype=torch.float32, device=self.device)
        flow, new_k, new_v = self._run(latents.to(device=self.device, dtype=self.dtype), t, cache, plan)
        cache.commit_recache(new_k, new_v, plan)
        return flow

    def recompute_kv(self, latents: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean, un-roped K/V of stored latent frames, recomputed by one t = 0 forward (for the retrieval memory;
        :meth:`recache` is LongLive's re-cache of the window).

        The ``m`` frames are run as one block on a fresh window-relative cache with ``cache``'s text context, so
        they attend to each other only. Used by the ``"latent"`` memory mode, which keeps 200 KB latents per
        frame instead of their K/V (287.5 MB for Wan 1.3B).

        Args:
            latents: ``[B, m, C, H, W]``, ``1 <= m <= window - sink``.
            cache: the generation's cache (for its batch size and text context).

        Returns:
            K, V ``[layers, B, m, T, H, d]``.
        """
        scratch = self.new_cache(cache.batch, "window", memory_slots=0, dtype=cache.k.dtype)
        scratch.text = cache.text
        t0 = torch.zeros(latents.shape[:2], dtype=torch.float32, device=latents.device)
        self(latents.to(device=self.device, dtype=self.dtype), t0, scratch, update_cache=True)
        return scratch.block_kv()

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, F, T, pt*ph*pw*C]`` -> ``[B, F, C, H, W]``."""
        cfg = self.cfg
        B, frames = x.shape[:2]
        (h, w), (_, ph, pw) = cfg.grid, cfg.patch_size
        x = x.reshape(B, frames, h, w, ph, pw, cfg.out_dim)
        return x.permute(0, 1, 6, 2, 4, 3, 5).reshape(B, frames, cfg.out_dim, h * ph, w * pw)
