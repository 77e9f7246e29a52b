"""The retrieval memory interface the block loop calls, and a simple pure-tensor implementation.

The pipeline talks to one :class:`Memory` per stream (video) through three calls per block:

1. ``retrieve(query, num_frames)`` before denoising a block that starts at frame ``s = num_frames``, with the
   query = embedding of frame ``s - 1``. Candidates are the frames already evicted from the attention window
   minus the ``R`` most recently evicted (the recency guard), i.e. the global frames
   ``[sink, sink + max(0, n - window) - R)``; sink frames and frames still in the window never are. It returns
   the ``k = min(K, candidates)`` best by cosine similarity, in descending order (ties: lower frame first).
2. ``gather(selection)`` -> K, V ``[layers, m, T, H, d]`` (un-roped) of the selected frames, placed into the
   cache's memory slots once per block (reused by every forward and layer of the block).
3. ``append(block_kv, embeddings)`` after the block's context rerun: the block's clean un-roped K/V
   ``[layers, F, T, H, d]`` and its frames' embeddings ``[F, D]``. Frames are appended in order, so the logical
   id of an entry is its global frame index.

:class:`TensorMemory` keeps everything in growing tensors and searches with :func:`lrag_ext.cosine_topk`; the
paged, tiered :class:`lrag_ext.RetrievalMemory` implements the same protocol.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

import lrag_ext


@dataclass
class Selection:
    """Result of one retrieval: ``frames`` ``[m]`` int64 global frame ids and ``scores`` ``[m]`` float32 cosine
    similarities, sorted by similarity (descending); ``num_candidates`` eligible frames were searched."""

    frames: torch.Tensor
    scores: torch.Tensor
    num_candidates: int

    def __len__(self) -> int:
        return int(self.frames.numel())


def candidate_range(num_frames: int, sink: int, window: int, recent_exclude: int) -> tuple[int, int]:
    """Half-open global-frame range ``[lo, hi)`` of the retrieval candidates before the block starting at
    ``num_frames`` (``hi <= lo`` means none): ``lo = sink``, ``hi = sink + max(0, num_frames - window) - R``."""
    lo = sink
    return lo, max(lo, sink + max(0, num_frames - window) - recent_exclude)


@runtime_checkable
class Memory(Protocol):
    """What :class:`lrag.pipeline.Pipeline` needs from a retrieval memory (one instance per stream)."""

    def append(self, block_kv: tuple[torch.Tensor, torch.Tensor], embeddings: torch.Tensor) -> None:
        """Stores a finished block: K, V ``[layers, F, T, H, d]`` and embeddings ``[F, D]``."""

    def retrieve(self, query: torch.Tensor, num_frames: int) -> Selection:
        """Top-k eligible frames for the block starting at ``num_frames``, by cosine with ``query`` ``[D]``."""

    def gather(self, selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[layers, m, T, H, d]`` of the selected frames, in selection order."""

    def reset(self) -> None:
        """Forgets everything (a new video)."""


class TensorMemory:
    """A plain in-memory pool: every frame's K/V and embedding in growing tensors.

    Args:
        k: frames retrieved per block at most (K = 6).
        recent_exclude: the R most recently evicted frames are not candidates (R = 5).
        sink: sink frames of the attention window (never candidates).
        window: attention window in frames (frames older than the window are evicted to the pool).
        device: where K/V and embeddings are kept. The default, host memory, is what the reference does: the pool
            grows by one frame's K/V per frame (287.5 MB in bf16 for Wan 1.3B), which no GPU holds for long. Host
            pools are pinned when CUDA is available, so the per-block gather copies fast. ``None`` keeps them where
            the blocks come from.
    """

    def __init__(self, k: int = 6, recent_exclude: int = 5, sink: int = 1, window: int = 12, device="cpu"):
        if k < 1 or recent_exclude < 0 or sink < 0 or window <= sink:
            raise ValueError(f"need k >= 1, recent_exclude >= 0, 0 <= sink < window; got k={k}, "
                             f"recent_exclude={recent_exclude}, sink={sink}, window={window}")
        self.k, self.recent_exclude, self.sink, self.window = k, recent_exclude, sink, window
        self.device = device
        self.reset()

    def reset(self) -> None:
        self._k: torch.Tensor | None = None   # [layers, capacity, T, H, d]
        self._v: torch.Tensor | None = None
        self._emb: torch.Tensor | None = None  # [capacity, D] float32
        self.num_frames = 0

    def _grow(self, need: int, like_kv: torch.Tensor, like_emb: torch.Tensor) -> None:
        cap = 0 if self._k is None else self._k.shape[1]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 16)
        device = torch.device(self.device or like_kv.device)
        pin = device.type == "cpu" and torch.cuda.is_available()
        k = torch.zeros((like_kv.shape[0], new_cap, *like_kv.shape[2:]), dtype=like_kv.dtype, device=device,
                        pin_memory=pin)
        v = torch.zeros(k.shape, dtype=k.dtype, device=device, pin_memory=pin)
        emb = torch.zeros((new_cap, like_emb.shape[1]), dtype=torch.float32, device=device)
        if self._k is not None:
            k[:, :cap], v[:, :cap], emb[:cap] = self._k, self._v, self._emb
        self._k, self._v, self._emb = k, v, emb

    def append(self, block_kv: tuple[torch.Tensor, torch.Tensor], embeddings: torch.Tensor) -> None:
        k, v = block_kv
        if k.dim() != 5 or v.shape != k.shape:
            raise ValueError(f"block_kv must be two [layers, F, T, H, d] tensors, got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        if embeddings.dim() != 2 or embeddings.shape[0] != k.shape[1]:
            raise ValueError(f"embeddings must be [F={k.shape[1]}, D], got {tuple(embeddings.shape)}")
        if self._k is not None and (k.shape[0] != self._k.shape[0] or k.shape[2:] != self._k.shape[2:]
                                    or embeddings.shape[1] != self._emb.shape[1]):
            raise ValueError("block_kv / embeddings do not match the shapes already stored")
        n, f = self.num_frames, k.shape[1]
        self._grow(n + f, k, embeddings)
        self._k[:, n:n + f] = k.to(self._k.device)
        self._v[:, n:n + f] = v.to(self._v.device)
        self._emb[n:n + f] = embeddings.detach().float().to(self._emb.device)
        self.num_frames = n + f

    def retrieve(self, query: torch.Tensor, num_frames: int) -> Selection:
        lo, hi = candidate_range(num_frames, self.sink, self.window, self.recent_exclude)
        hi = min(hi, self.num_frames)
        n_cand = max(0, hi - lo)
        empty = Selection(torch.zeros(0, dtype=torch.long), torch.zeros(0), n_cand)
        if n_cand == 0:
            return empty
        pages = self._emb[None, :self.num_frames]                                    # one page, all frames
        dev = pages.device
        scores, ids = lrag_ext.cosine_topk(query.detach().float().reshape(1, -1).to(dev), pages,
                                           torch.zeros((1, 1), dtype=torch.int32, device=dev),
                                           torch.tensor([lo], device=dev), torch.tensor([hi], device=dev),
                                           min(self.k, n_cand))
        return Selection(ids[0].cpu(), scores[0].cpu(), n_cand)

    def gather(self, selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
        if len(selection) and (int(selection.frames.min()) < 0 or int(selection.frames.max()) >= self.num_frames):
            raise IndexError(f"selected frames {selection.frames.tolist()} outside [0, {self.num_frames})")
        idx = selection.frames.to(self._k.device)
        return self._k.index_select(1, idx), self._v.index_select(1, idx)
