"""Test helper: the whole observable state of a RetrievalMemory, for asserting that a failed call changed nothing.

``snapshot(mem)`` captures host metadata (streams, counts, page tables, K/V location codes, retrievable ranges,
queues, log lengths, allocator fill) and the bytes of every storage tensor (embedding and latent pages, K/V pools and
scales); two snapshots compare equal exactly when nothing observable differs. Bytes are compared (not values), so
NaN payloads and uninitialised free slots compare equal to themselves.
"""
from __future__ import annotations

import torch


def _bytes(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.detach().cpu().contiguous().view(torch.uint8).clone()


class MemorySnapshot:
    def __init__(self, mem):
        with mem._lock:
            self.meta = dict(
                next_stream=mem._next_stream,
                streams={s: (st.num_frames, list(st.pages), list(st.kv_code), st.first_retrievable, len(st.log),
                             id(st))
                         for s, st in mem._streams.items()},
                page_free=mem._page_alloc.num_free,
                segments=[(seg.allocator.num_slots, seg.allocator.num_free) for seg in mem._segments()],
                fifo={tier: list(q) for tier, q in mem._queues().items()},
            )
            self.tensors = dict(pages=_bytes(mem._pages), latents=_bytes(mem._latents))
            for i, seg in enumerate(mem._segments()):
                self.tensors[f"pool{i}"] = _bytes(seg.pool)
                self.tensors[f"scale{i}"] = _bytes(seg.scale)

    def diff(self, other: "MemorySnapshot") -> list[str]:
        """Names of what differs (empty when equal)."""
        out = [k for k in self.meta if self.meta[k] != other.meta[k]]
        for name in sorted(set(self.tensors) | set(other.tensors)):
            a, b = self.tensors.get(name), other.tensors.get(name)
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                out.append(name)
        return out

    def __eq__(self, other) -> bool:
        return isinstance(other, MemorySnapshot) and not self.diff(other)


def snapshot(mem) -> MemorySnapshot:
    return MemorySnapshot(mem)


def assert_unchanged(before: MemorySnapshot, mem) -> None:
    changed = before.diff(snapshot(mem))
    assert not changed, f"a failed call changed the memory: {changed}"
