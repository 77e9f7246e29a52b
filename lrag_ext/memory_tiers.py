"""The K/V tiers of a :class:`lrag_ext.RetrievalMemory`: storage segments, their slot allocators and the eviction
queues.

Segment 0 is the device tier (``device_frames`` slots on the memory's device); segments 1.. are host pools (pinned
when the memory is on a GPU) of doubling size (16, 16, 32, ...), at most ``host_frames`` slots in all, grown
lazily. A stored frame's location is one int64 code ``segment << 32 | slot``. New frames take device slots; when
none is free the oldest device frame (of any stream) moves to the host tier, and when that is full too the oldest
host frame is dropped. The tiers do not know the streams' records: every move or drop is reported through
``on_move(stream, frame, code)`` (``code`` -1: dropped), and ``code_of(stream, frame)`` reads a frame's location.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable

import torch

import lrag_ext
from lrag_ext import memory_format as fmt
from lrag_ext.memory_config import MemoryConfig

SEGMENT_SHIFT = fmt.SEGMENT_SHIFT
SLOT_MASK = fmt.SLOT_MASK


@dataclass
class Segment:
    """A K/V pool tensor, the allocator of its slots, and (float8 pools) the per-(slot, layer, K/V) scales."""

    pool: torch.Tensor
    allocator: object  # lrag_ext.SlotAllocator
    scale: torch.Tensor | None = None

    def frame(self, slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One slot's stored K/V (and scale)."""
        return self.pool[slot], (self.scale[slot] if self.scale is not None else None)

    def set_frame(self, slot: int, kv: torch.Tensor, scale: torch.Tensor | None) -> None:
        self.pool[slot].copy_(kv, non_blocking=True)
        if self.scale is not None:
            self.scale[slot].copy_(scale, non_blocking=True)


class KVTiers:
    """Segments, allocators and eviction queues (see the module docstring)."""

    def __init__(self, config: MemoryConfig, device: torch.device, on_move: Callable[[int, int, int], None],
                 code_of: Callable[[int, int], int]):
        self.config = config
        self.device = device
        self._on_move = on_move
        self._code_of = code_of
        self.segments: list[Segment] = [self._new_segment(config.device_frames, device, pin=False)]
        self.fifo: dict[str, collections.deque] = {"device": collections.deque(), "host": collections.deque()}

    # ------------------------------------------------------------------------------------------------ layout
    def _new_segment(self, slots: int, device: torch.device, pin: bool) -> Segment:
        layout = self.config.kv_layout
        pool = lrag_ext.kv_pool_empty(slots, layout.num_layers, layout.tokens_per_frame, layout.num_heads,
                                      layout.head_dim, dtype=self.config.dtype, device=device, pin_memory=pin)
        scale = lrag_ext.kv_pool_scale_empty(pool) if pool.dtype == torch.float8_e4m3fn else None
        return Segment(pool=pool, allocator=lrag_ext.SlotAllocator(slots), scale=scale)

    def _new_host_segment(self, slots: int) -> Segment:
        return self._new_segment(slots, torch.device("cpu"), self.config.pin_host and self.device.type == "cuda")

    def add_host_segment(self, slots: int) -> None:
        self.segments.append(self._new_host_segment(slots))

    def limit(self) -> int | None:
        """Frames the tiers can hold in all (None: unbounded)."""
        if self.config.host_frames is None:
            return None
        return self.config.device_frames + self.config.host_frames

    def frame(self, code: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stored K/V (and scale) at location ``code``."""
        return self.segments[code >> SEGMENT_SHIFT].frame(code & SLOT_MASK)

    def place(self, stream: int, code: int, kv: torch.Tensor, scale: torch.Tensor | None) -> int:
        """Stores a frame in a free slot of ``code``'s segment (restoring a save); returns its new code."""
        seg_index = code >> SEGMENT_SHIFT
        seg = self.segments[seg_index]
        slot = seg.allocator.allocate(1, stream)[0]
        seg.set_frame(slot, kv, scale)
        return (seg_index << SEGMENT_SHIFT) | slot

    # ---------------------------------------------------------------------------------------------- growth
    def _next_host_size(self, count: int) -> int | None:
        """Slots of the host segment that would follow ``count`` segments (the device one included), or None when
        the host tier is at its limit."""
        sizes = fmt.host_segment_sizes(self.config.host_frames, count)
        return sizes[-1] if len(sizes) == count else None

    def grow_host(self) -> bool:
        """Adds a host segment (doubling size, capped by host_frames); False when the host tier is at its limit."""
        size = self._next_host_size(len(self.segments))
        if size is not None:
            self.add_host_segment(size)
        return size is not None

    def reserve(self, n_new: int) -> None:
        """Grows the host tier now (allowed by its limit) to the free slots storing ``n_new`` frames may need, so
        that storing them allocates nothing: a failed allocation then happens before the memory changes."""
        n_device = min(n_new, self.config.device_frames)
        moves = max(0, n_device - self.segments[0].allocator.num_free)  # device frames displaced to the host
        need = (n_new - n_device) + moves - sum(seg.allocator.num_free for seg in self.segments[1:])
        new = []
        while need > 0 and (size := self._next_host_size(len(self.segments) + len(new))) is not None:
            new.append(self._new_host_segment(size))
            need -= size
        self.segments += new  # all allocated, or none added

    # ------------------------------------------------------------------------------------------ allocation
    def _take_free(self, tier: str, stream: int) -> int | None:
        """A free slot code in ``tier`` without evicting anything (growing the host tier if allowed), or None."""
        segments = [0] if tier == "device" else list(range(1, len(self.segments)))
        for i in segments:
            if self.segments[i].allocator.num_free:
                return (i << SEGMENT_SHIFT) | self.segments[i].allocator.allocate(1, stream)[0]
        if tier == "host" and self.grow_host():
            return self._take_free(tier, stream)
        return None

    def _alloc_in(self, tier: str, stream: int) -> int | None:
        """A free slot code in ``tier``, making room first, oldest frame first: a device frame moves to the host
        tier (or is dropped when the host tier has no room), a host frame is dropped. None if nothing can go."""
        code = self._take_free(tier, stream)
        if code is not None or not self.fifo[tier]:
            return code
        old_stream, frame = self.fifo[tier].popleft()
        old = self._code_of(old_stream, frame)
        host = self._alloc_in("host", old_stream) if tier == "device" else None
        if host is not None:
            # Stream-ordered copy: it is enqueued before anything can overwrite the freed device slot.
            self.segments[host >> SEGMENT_SHIFT].set_frame(host & SLOT_MASK, *self.frame(old))
            self._on_move(old_stream, frame, host)
            self.fifo["host"].append((old_stream, frame))
        else:  # dropped: its embedding stays, but it can no longer be retrieved
            self._on_move(old_stream, frame, -1)
        self.free(old)
        return self._take_free(tier, stream)

    def allocate(self, frames: list[tuple[int, int]]) -> list[int]:
        """Slot codes for new frames ``(stream, frame)``, oldest first (at most :meth:`limit` of them): the newest
        ``device_frames`` go to the device tier, older ones to the host tier, making room as needed. The frames
        join the eviction queues after all are placed, so making room only moves or drops frames of earlier
        calls, whose data is already written."""
        n_device = min(len(frames), self.config.device_frames)
        tiers = ["host"] * (len(frames) - n_device) + ["device"] * n_device
        codes = [self._alloc_in(tier, stream) for tier, (stream, _) in zip(tiers, frames)]
        if any(code is None for code in codes):  # cannot happen: at most `limit` new frames, older ones give way
            raise RuntimeError("internal error: no K/V slot could be made free")
        for entry, tier in zip(frames, tiers):
            self.fifo[tier].append(entry)
        return codes

    def write(self, codes: list[int], rows: list[int], num_rows: int, k: torch.Tensor, v: torch.Tensor,
              to_device: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Writes row ``rows[i]`` of ``k``/``v`` ``[L, num_rows, ...]`` to location ``codes[i]``: one ``write_kv``
        per segment that receives frames (other rows skipped with slot -1)."""
        codes_t = torch.tensor(codes, dtype=torch.int64)
        rows_t = torch.tensor(rows, dtype=torch.int64)
        for seg_index, seg in enumerate(self.segments):
            mine = (codes_t >> SEGMENT_SHIFT) == seg_index
            if not bool(mine.any()):
                continue
            slots = torch.full((num_rows,), -1, dtype=torch.int64)
            slots[rows_t[mine]] = codes_t[mine] & SLOT_MASK
            # On a GPU the host segments are pinned: write_kv writes the device frames straight into them.
            lrag_ext.write_kv(seg.pool, k, v, to_device(slots), pool_scale=seg.scale)

    def free(self, code: int) -> None:
        self.segments[code >> SEGMENT_SHIFT].allocator.free([code & SLOT_MASK])

    def drop(self, stream: int, frames: list[tuple[int, int]]) -> None:
        """Frees the slots of some stored frames ``(frame, code)`` of ``stream`` and takes them out of the queues."""
        for _, code in frames:
            self.free(code)
        gone = {(stream, frame) for frame, _ in frames}
        for tier in self.fifo:
            self.fifo[tier] = collections.deque(x for x in self.fifo[tier] if x not in gone)

    def release(self, stream: int, codes: list[int]) -> None:
        """Frees a stream's stored frames and takes them out of the queues."""
        for code in codes:
            if code >= 0:
                self.free(code)
        for tier in self.fifo:
            self.fifo[tier] = collections.deque(x for x in self.fifo[tier] if x[0] != stream)
