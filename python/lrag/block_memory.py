"""The retrieval side of block-autoregressive generation, shared by the generator loop (:class:`lrag.pipeline.
Pipeline`) and training with memory slots (:mod:`lrag.toy.train`): one :class:`lrag_ext.RetrievalMemory` stream
per batch element, queried before every block and fed with every committed block.

Per block of ``F`` frames starting at frame ``s``:

- :meth:`BlockMemory.retrieve` (before the block's forwards): query = the embedding of frame ``s - 1``, the last
  frame appended; :meth:`lrag_ext.RetrievalMemory.retrieve` selects up to K frames for all streams in one search
  and :meth:`~lrag_ext.RetrievalMemory.gather` writes their K/V straight into the cache's memory slots (or, with
  ``storage="latent"``, their K/V are recomputed from the stored latents), at the temporal RoPE positions of
  ``MemoryConfig.memory_position``;
- :meth:`BlockMemory.append` (after the context rerun committed the block): the block's clean frames are embedded
  and appended with their committed K/V (or latents) to the memory.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

import lrag_ext
from lrag.models.wan import CausalWanModel
from lrag_ext.positions import memory_positions, needs_ids

Embedder = Callable[[torch.Tensor], torch.Tensor]


def config_for_streams(config: lrag_ext.MemoryConfig, streams: int, frames: int) -> lrag_ext.MemoryConfig:
    """``config`` sized for ``streams`` streams of ``frames`` frames each, every frame on the device (embedding
    pages are per stream: each stream's count is rounded up to whole pages)."""
    page = config.page_size
    total = streams * -(-frames // page) * page
    return dataclasses.replace(config, max_frames=total, device_frames=total)


class BlockMemory:
    """The retrieval memory of one generation (or one training batch of windows).

    Args:
        model: the backbone whose cache the retrieved frames go into.
        config: a factory of the memory's complete :class:`lrag_ext.MemoryConfig` given the embedding size
            (called once, at the first :meth:`append`, when the embedder's output size is known).
        embed: ``[N, C, H, W] -> [N, D]`` frame embedder.

    The memory itself (:attr:`memory`) exists from the first :meth:`append` on, with :attr:`streams` (one per
    batch element).
    """

    def __init__(self, model: CausalWanModel, config: Callable[[int], lrag_ext.MemoryConfig], embed: Embedder):
        self.model, self._config, self.embed = model, config, embed
        self.memory: Optional[lrag_ext.RetrievalMemory] = None
        self.streams: list[int] = []
        # after a prompt switch with switch_memory="recompute": the generation's latents [B, T, C, H, W] and the
        # switch's block start; retrieved frames older than it get their K/V recomputed under the current text
        self.recompute_from: Optional[torch.Tensor] = None
        self.switch_frame = 0
        self.retrievals = 0          # retrieve calls on the memory: the index of each block's record in its log

    def retrieve(self, s: int, cache, hold: bool = False) -> Optional["lrag_ext.RetrievalPlan"]:
        """Retrieval for the block starting at ``s``: fills (or clears) the cache's memory slots; returns the plan,
        or ``None`` when nothing was retrieved. No host synchronisation unless a position policy needs the ids.

        ``hold``: no retrieval for this block; the memory slots keep what the last retrieval put there (the
        pipeline's ``retrieve_every``)."""
        if hold:
            return None
        cache.clear_memory()
        if s == 0 or self.memory is None:
            return None
        plan = self.memory.retrieve(self.streams)
        self.retrievals += 1
        # Streams can differ when a bounded host tier dropped frames (oldest first: stream 0's); the cache's
        # memory slots hold the same number m for every stream, so each attends to its m most similar frames.
        m = min(plan.counts)
        if m == 0:
            return None
        positions = self._positions(cache, plan, m)
        if self.memory.config.storage == "latent":
            k, v = self.model.recompute_kv(self.memory.latents(plan)[:, :m], cache)
            cache.set_memory(k, v, positions)
            return plan
        mem_k, mem_v = cache.memory_buffers()
        slots = torch.arange(plan.ids.shape[1], device=mem_k.device).expand(len(self.streams), -1)
        # K goes in un-roped (delta 0, not the config's memory_position): the model applies RoPE by position at
        # attention time, at the positions _positions gives the cache.
        self.memory.gather(plan, mem_k, mem_v, dst_frame=slots, positions="sink")
        cache.set_memory_positions(positions)
        if self.recompute_from is not None:
            self._recompute_older(plan, m, mem_k, mem_v, cache)
        return plan

    def _recompute_older(self, plan, m: int, mem_k: torch.Tensor, mem_v: torch.Tensor, cache) -> None:
        """After a prompt switch (``switch_memory="recompute"``): the selected frames generated before it get K/V
        recomputed from their latents under the cache's current text (the m frames run together at t = 0, as
        ``storage="latent"`` does), written over the gathered ones; frames from after the switch keep theirs."""
        ids = plan.ids[:, :m].to(self.recompute_from.device)
        older = ids < self.switch_frame                                    # [B, m]
        if not bool(older.any()):                                          # one read of m booleans
            return
        latents = self.recompute_from[torch.arange(len(self.streams), device=ids.device)[:, None], ids]
        k, v = self.model.recompute_kv(latents, cache)                    # [layers, B, m, T, H, d]
        mask = older.to(mem_k.device)[None, :, :, None, None, None]
        mem_k[:, :, :m] = torch.where(mask, k.to(mem_k.dtype), mem_k[:, :, :m])
        mem_v[:, :, :m] = torch.where(mask, v.to(mem_v.dtype), mem_v[:, :, :m])

    def after_switch(self, policy: str, s: int, latents: torch.Tensor) -> None:
        """A prompt switch at the block starting at ``s``: ``"recompute"``: from now on, retrieved frames older than
        ``s`` get K/V recomputed from ``latents`` (the generation's ``[B, T, C, H, W]`` output) under the cache's
        text; ``"forget"`` makes frames ``< s`` unretrievable (and frees their K/V); ``"keep"`` changes nothing."""
        if policy == "recompute":
            self.recompute_from, self.switch_frame = latents, s
        elif policy == "forget" and self.memory is not None:
            for stream in self.streams:
                self.memory.forget_before(stream, s)

    def append(self, x0: torch.Tensor, cache) -> None:
        """Appends the block just committed to ``cache`` (clean frames ``x0`` ``[B, F, C, H, W]``, their K/V
        :meth:`~lrag.models.wan.KVCache.block_kv`) to every stream, in one call (one write per segment)."""
        B, F = x0.shape[:2]
        embs = self.embed(x0.flatten(0, 1)).unflatten(0, (B, F))     # one embedder call for all streams
        if self.memory is None:
            self.memory = lrag_ext.RetrievalMemory(self._config(embs.shape[-1]))
            self.streams = [self.memory.add_stream() for _ in range(B)]
        if self.memory.config.storage == "kv":
            k, v = cache.block_kv()
            self.memory.append(self.streams, embs, k=k, v=v)
        else:
            self.memory.append(self.streams, embs, latents=x0)

    def record(self, b: int, s: int, positions: torch.Tensor, log_index: int, retrieval_s: float) -> dict:
        """Block ``b``'s log record (the reference's fields, one list per stream) from the memory's retrieval
        record ``log_index`` (``retrievals - 1`` right after the block's :meth:`retrieve`); reads the selection on
        the host. ``positions``: the cache's memory positions for the block."""
        logs = [self.memory.records(st, start=log_index)[0].to_dict() for st in self.streams]
        return {
            "block": b,
            "query_frame": s,                    # the reference logs the block start, not the query frame s-1
            "query_embedding_frame": s - 1,
            "num_evicted": logs[0]["num_evicted"],
            "num_candidates": logs[0]["num_eligible"],
            "selected_pool_indices": [rec["selected_pool_indices"] for rec in logs],
            "selected_global_frames": [rec["selected_global_frames"] for rec in logs],
            "selected_similarities": [rec["selected_similarities"] for rec in logs],
            "memory_positions": positions.tolist(),
            "retrieval_s": retrieval_s,
        }

    def _positions(self, cache, plan, m: int) -> torch.Tensor:
        """``[B, m]`` host temporal positions of the plan's first ``m`` selected frames under the configured policy
        (:func:`lrag_ext.positions.memory_positions`; the cache keeps them on the host: they size the keys)."""
        policy = self.memory.config.memory_position
        ids = plan.ids[:, :m].cpu() if needs_ids(policy) else torch.zeros((len(plan.streams), m), dtype=torch.long)
        first_local = int(cache.plan(self.model.cfg.frames_per_block).local_pos[0])
        return memory_positions(policy, ids, first_local)
