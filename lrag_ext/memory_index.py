"""The device-side index of a :class:`lrag_ext.RetrievalMemory`: everything ``retrieve`` and ``gather`` read
besides the stored data, kept in persistent tensors on the memory's device.

Each stream owns a row (rows are reused after ``remove_stream``):

- ``page_table [rows, num_pages]`` int32: logical page -> physical embedding page (what ``cosine_topk`` reads);
- ``ranges [rows, 2]`` int64: the eligible half-open frame range ``[lo, hi)`` of the stream's next block;
- ``query [rows]`` int64: the flat embedding index ``page * page_size + slot`` of the stream's last frame;
- ``codes [rows, cols]`` int64 (K/V storage only): frame -> K/V location ``segment << 32 | slot`` (-1: not
  stored); ``cols`` grows by doubling with the longest stream (up to the memory's capacity), so the table costs
  8 bytes per frame of history, not of capacity.

They are written where they change (``append``, eviction, ``reset``), with one small host->device copy per
table per call, so that in steady state a block's ``retrieve`` + ``gather`` issue their kernels and a few
``[B, K]``-sized index ops: no host->device copy, no synchronisation, and nothing whose size depends on the
history length. The host keeps the authoritative copy of every value (the memory's stream records); this is its
mirror. When the rows (streams) or columns (history) double, the tables are replaced: a CUDA graph captured
before reads the old ones and must be captured again.
"""
from __future__ import annotations

import torch


class DeviceIndex:
    """Persistent per-stream metadata tensors on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device, num_pages: int, page_size: int, with_codes: bool, rows: int = 4):
        self.device = device
        self.num_pages = num_pages
        self.page_size = page_size
        self.frames = num_pages * page_size          # frames one stream can hold at most
        self.cols = min(self.frames, 256) if with_codes else 0
        self._row: dict[int, int] = {}
        self._rows_cache: tuple[tuple, torch.Tensor] | None = None
        self._allocate(rows, self.cols)
        self._free_rows = list(range(rows - 1, -1, -1))

    def _allocate(self, rows: int, cols: int) -> None:
        self.page_table = torch.zeros((rows, self.num_pages), dtype=torch.int32, device=self.device)
        self.ranges = torch.zeros((rows, 2), dtype=torch.int64, device=self.device)
        self.query = torch.zeros((rows,), dtype=torch.int64, device=self.device)
        self.codes = torch.full((rows, cols), -1, dtype=torch.int64, device=self.device)

    def _tables(self) -> tuple[torch.Tensor, ...]:
        return self.page_table, self.ranges, self.query, self.codes

    def _resize(self, rows: int, cols: int) -> None:
        """New tables of ``rows`` x ``cols`` holding the old ones (the only allocations that copy old entries)."""
        old = self._tables()
        n, c = old[0].shape[0], self.cols
        self._allocate(rows, cols)
        for new, table in zip(self._tables()[:3], old[:3]):
            new[:n] = table
        self.codes[:n, :c] = old[3]
        self.cols = cols

    def _grow(self) -> None:
        """Doubles the rows (a stream beyond the current capacity)."""
        n = self.page_table.shape[0]
        self._resize(2 * n, self.cols)
        self._free_rows = list(range(2 * n - 1, n - 1, -1)) + self._free_rows

    def _ensure_cols(self, frames: int) -> None:
        """Room for frame ids below ``frames`` in the K/V location table (doubling, up to the capacity)."""
        if frames > self.cols:
            self._resize(self.page_table.shape[0], min(self.frames, max(2 * self.cols, frames)))

    # ------------------------------------------------------------------------------------------------- rows
    def add(self, stream: int) -> None:
        """Gives ``stream`` a cleared row."""
        if not self._free_rows:
            self._grow()
        row = self._free_rows.pop()
        self._row[stream] = row
        self._rows_cache = None
        self.clear(stream)

    def remove(self, stream: int) -> None:
        self._free_rows.append(self._row.pop(stream))
        self._rows_cache = None

    def clear(self, stream: int) -> None:
        """Forgets every frame of ``stream`` (reset)."""
        row = self._row[stream]
        self.ranges[row] = 0
        self.query[row] = 0
        if self.cols:
            self.codes[row] = -1

    def rows(self, streams: list[int]) -> torch.Tensor:
        """``[B]`` int64 device rows of ``streams``; the tensor of the last list asked for is reused, so a loop over
        the same streams copies it to the device once."""
        key = tuple(streams)
        if self._rows_cache is None or self._rows_cache[0] != key:
            rows = torch.tensor([self._row[s] for s in streams], dtype=torch.int64)
            self._rows_cache = (key, rows.to(self.device))
        return self._rows_cache[1]

    # ---------------------------------------------------------------------------------------------- updates
    def set_stream(self, streams: list[int], first_page: list[int], pages: list[list[int]],
                   ranges: list[tuple[int, int]], query: list[int]) -> None:
        """After an append: the streams' new physical pages (from logical page ``first_page[i]`` on), eligible
        ranges and query indices (flat embedding index of the last frame). One host->device copy per table."""
        rows = [self._row[s] for s in streams]
        flat = [r * self.num_pages + first + j for r, first, ps in zip(rows, first_page, pages) for j in range(len(ps))]
        if flat:
            new_pages = [p for ps in pages for p in ps]
            self.page_table.view(-1)[_dev(flat, self.device)] = _dev(new_pages, self.device, torch.int32)
        self.set_ranges(streams, ranges)
        self.query[_dev(rows, self.device)] = _dev(query, self.device)

    def set_ranges(self, streams: list[int], ranges: list[tuple[int, int]]) -> None:
        if streams:
            self.ranges[_dev([self._row[s] for s in streams], self.device)] = _dev(ranges, self.device)

    def set_codes(self, changes: list[tuple[int, int, int]]) -> None:
        """``(stream, frame, code)`` updates of K/V locations, in one scatter (later entries win)."""
        if not changes:
            return
        self._ensure_cols(max(f for _, f, _ in changes) + 1)
        last = {}
        for s, f, code in changes:
            last[self._row[s] * self.cols + f] = code
        self.codes.view(-1)[_dev(list(last), self.device)] = _dev(list(last.values()), self.device)

    # ------------------------------------------------------------------------------------------------ reads
    def table(self, rows: torch.Tensor) -> torch.Tensor:
        """``[B, num_pages]`` int32 page tables of the rows."""
        return self.page_table.index_select(0, rows)

    def lo_hi(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.ranges.index_select(0, rows)
        return r[:, 0].contiguous(), r[:, 1].contiguous()

    def query_index(self, rows: torch.Tensor) -> torch.Tensor:
        return self.query.index_select(0, rows)

    def codes_of(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` K/V location codes of the selected frame ids (-1 for padding), looked up on the device."""
        # Ids beyond the table (never stored) read as -1 too: an index past the table would be out of bounds.
        flat = rows[:, None] * self.cols + ids.clamp(0, max(self.cols - 1, 0))
        codes = self.codes.view(-1)[flat]
        return torch.where((ids < 0) | (ids >= self.cols), torch.full_like(codes, -1), codes)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``: itself on the CPU, else one pinned, non-blocking host->device copy."""
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


def _dev(values, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A small host list as a tensor on ``device``."""
    return to_device(torch.tensor(values, dtype=dtype), device)
