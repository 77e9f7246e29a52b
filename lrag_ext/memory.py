"""RetrievalMemory: the per-block retrieval memory a generator imports (LongLive-RAG's, with production features).

One object serves many streams (videos). Each appended latent frame gets an entry: its embedding (always), and
depending on ``MemoryConfig.storage`` its K/V for all layers (``"kv"``, the reference's behaviour) or its latent
(``"latent"``, to recompute K/V with one t = 0 forward) or nothing more (``"embedding"``). Once per block the
generator calls :meth:`RetrievalMemory.retrieve` (one ``cosine_topk`` launch for all streams, no host
synchronisation) and, in ``"kv"`` mode, :meth:`RetrievalMemory.gather` (one ``gather_kv`` launch per storage
segment) to write the selected frames into its attention cache's memory slots.

Storage layout:
- embeddings (and latents) live in pages of ``page_size`` frames; each stream has a page table (logical frame id ->
  physical page), exactly what ``cosine_topk`` reads;
- K/V live in slots ``[layers, 2, tokens, heads, head_dim]`` of two tiers: up to ``device_frames`` on ``device``,
  older frames in pinned host memory (growing in segments of doubling size, at most ``host_frames``). When a new
  frame needs a device slot and none is free, the oldest device-resident frame (of any stream) moves to the host
  tier; when the host tier is full too, the oldest host-resident frame is dropped: its embedding stays, but it is
  no longer retrievable (its stream's eligible range starts after it). Sink frames (ids < ``sink_frames``) are
  never retrievable, so their K/V are not stored.

Thread safety: every public method holds one re-entrant lock, so streams may be appended to and retrieved from
several threads; results of device work are ordered by the CUDA stream of the calling thread.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import operator
import os
import shutil
import threading
import time
from dataclasses import dataclass, field

import torch

import lrag_ext
from lrag_ext import memory_format as fmt
from lrag_ext.memory_config import KVLayout, MemoryConfig
from lrag_ext.memory_index import DeviceIndex, to_device
from lrag_ext.memory_log import RetrievalRecord
from lrag_ext.memory_tiers import SEGMENT_SHIFT, SLOT_MASK, KVTiers
from lrag_ext.positions import memory_positions

# Re-exported here: the config classes and the log record.
__all__ = ["KVLayout", "MemoryConfig", "RetrievalMemory", "RetrievalPlan", "RetrievalRecord"]

_KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what write_kv takes as new K/V
_memory_tokens = itertools.count()  # identifies the memory a plan came from


@dataclass
class RetrievalPlan:
    """The result of one :meth:`RetrievalMemory.retrieve` call, for the streams it was asked about, in order.

    ``ids`` and ``scores`` stay on the memory's device (reading them on the host synchronises); everything else
    is host data known without synchronising.

    Attributes:
        streams: stream ids.
        start_frames: the frame each stream's next block starts at (= its frame count at retrieval time).
        counts: frames selected per stream, ``min(top_k, #eligible)``.
        ids: ``[B, top_k]`` int64 global frame ids, by descending similarity, ``-1`` padded.
        scores: ``[B, top_k]`` float32 cosine similarities, ``-inf`` padded.

    A plan is valid for the memory that made it, until one of its streams is reset or removed, or frames of its
    eligible range lose their K/V (host tier full) through a later ``append``; :meth:`RetrievalMemory.gather` and
    :meth:`RetrievalMemory.latents` refuse it after that (retrieve again).
    """

    streams: list[int]
    start_frames: list[int]
    counts: list[int]
    ids: torch.Tensor
    scores: torch.Tensor
    # Identity, checked by gather/latents: the memory, each stream's state object (replaced by reset) and the lowest
    # eligible frame at retrieval time (a later drop at or above it may have hit a selected frame).
    _memory_token: int = field(default=-1, repr=False, compare=False)
    _states: list = field(default_factory=list, repr=False, compare=False)
    _eligible_lo: list[int] = field(default_factory=list, repr=False, compare=False)
    _rows: torch.Tensor | None = field(default=None, repr=False, compare=False)  # the streams' device-index rows


@dataclass
class _Stream:
    num_frames: int = 0
    pages: list[int] = field(default_factory=list)          # logical page -> physical embedding page
    kv_code: list[int] = field(default_factory=list)        # frame -> segment << 32 | slot, or -1
    first_retrievable: int = 0                               # frames below: K/V lost to the host limit, or forgotten
    log: list[RetrievalRecord] = field(default_factory=list)


class RetrievalMemory:
    """Per-block retrieval memory over many streams (see the module docstring for layout and tiers).

    Typical use, once per block of a stream ``s``::

        plan = mem.retrieve([s])                          # query: the last appended frame's embedding
        mem.gather(plan, cache_k, cache_v)                # K/V of the selected frames into the memory slots
        ... denoise the block, context rerun ...
        mem.append(s, embeddings, k=block_k, v=block_v)   # the finished block's frames
    """

    def __init__(self, config: MemoryConfig):
        if not isinstance(config, MemoryConfig):
            raise TypeError(f"config must be a MemoryConfig, got {type(config).__name__}")
        config.check_complete()
        self.config = config
        self.policy = config.policy
        self.device = torch.device(config.device)
        self._lock = threading.RLock()
        self._token = next(_memory_tokens)
        n_pages = -(-config.max_frames // config.page_size)
        self._pages = torch.zeros((n_pages, config.page_size, config.embed_dim), dtype=config.embed_dtype,
                                  device=self.device)
        self._latents = None
        if config.storage == "latent":
            self._latents = torch.zeros((n_pages, config.page_size) + tuple(config.latent_shape), dtype=config.dtype,
                                        device=self.device)
        self._page_alloc = lrag_ext.SlotAllocator(n_pages)
        self._index = DeviceIndex(self.device, n_pages, config.page_size, with_codes=config.storage == "kv")
        self._code_changes: list[tuple[int, int, int]] = []  # K/V moves/drops not yet mirrored in the index
        self._range_changes: set[int] = set()                 # streams whose eligible range a drop changed
        self._streams: dict[int, _Stream] = {}
        self._next_stream = 0
        # K/V tiers: segment 0 is the device tier; segments 1.. are host segments of doubling size.
        self._tiers = KVTiers(config, self.device, self._moved, self._code_of) if config.storage == "kv" else None

    # ---------------------------------------------------------------------------------------------- streams
    def add_stream(self) -> int:
        """Registers a new stream (video) and returns its id."""
        with self._lock:
            s = self._next_stream
            self._index.add(s)
            self._next_stream += 1
            self._streams[s] = _Stream()
            return s

    def streams(self) -> list[int]:
        with self._lock:
            return sorted(self._streams)

    def num_frames(self, stream: int) -> int:
        with self._lock:
            return self._stream(stream).num_frames

    def reset(self, stream: int) -> None:
        """Forgets every frame and log record of ``stream`` (the id stays valid) and frees its storage."""
        with self._lock:
            st = self._stream(stream)
            self._release(stream, st)
            self._index.clear(stream)
            self._streams[stream] = _Stream()

    def forget_before(self, stream: int, frame: int) -> None:
        """Frames ``< frame`` of ``stream`` are never retrieved again, and their K/V are freed (their embeddings
        stay, as for frames a full host tier dropped): the eligible range of the stream's next blocks starts at
        ``frame`` or later. For a prompt switch, ``frame`` = the switch's block start forgets what was generated
        under the earlier prompts. Forgetting is permanent (a later call with a smaller ``frame`` changes nothing)
        and is saved by :meth:`save`.

        Raises:
            KeyError: unknown stream. TypeError / ValueError: ``frame`` not an int in ``[0, num_frames]``. Nothing
            changes then.
        """
        with self._lock:
            stream = _stream_id(stream)
            st = self._stream(stream)
            if isinstance(frame, bool) or not isinstance(frame, int):
                raise TypeError(f"frame must be an int, got {type(frame).__name__}")
            if not 0 <= frame <= st.num_frames:
                raise ValueError(f"frame must be in [0, num_frames={st.num_frames}] for stream {stream}, got {frame}")
            if self._tiers is not None:
                stored = [(f, st.kv_code[f]) for f in range(frame) if st.kv_code[f] >= 0]
                self._tiers.drop(stream, stored)
                for f, _ in stored:
                    self._set_code(stream, st, f, -1)
            self._drop_below(stream, st, frame)
            self._sync_index()

    def remove_stream(self, stream: int) -> None:
        """Frees the storage of ``stream`` and forgets the id."""
        with self._lock:
            st = self._stream(stream)
            self._release(stream, st)
            self._index.remove(stream)
            del self._streams[stream]

    # ----------------------------------------------------------------------------------------------- append
    def append(self, stream: int | list[int], embeddings: torch.Tensor, k: torch.Tensor | None = None,
               v: torch.Tensor | None = None, latents: torch.Tensor | None = None) -> None:
        """Appends the frames of a finished block to one stream, or to several streams at once, in order.

        Args:
            stream: a stream id from :meth:`add_stream`, or a list of ``B`` distinct ids (a block of every stream
                in one call: one embedding write and one ``write_kv`` per storage segment for all of them).
            embeddings: ``[n, embed_dim]`` (``[B, n, embed_dim]`` for a list) float; stored as given (cosine
                similarity ignores the norm).
            k, v: ``[num_layers, n, tokens_per_frame, num_heads, head_dim]`` (``[num_layers, B, n, ...]`` for a
                list), float32/float16/bfloat16, one dtype (``storage="kv"`` only), K without RoPE.
            latents: ``[n, C, H, W]`` (``[B, n, C, H, W]`` for a list; ``storage="latent"`` only).

        Raises:
            KeyError: unknown stream. ValueError / TypeError: wrong shapes, dtypes or devices, a missing or
            unexpected tensor for the storage mode, repeated streams, or no room left in the embedding pages.
            Nothing is changed when an error is raised.
        """
        with self._lock:
            streams, batched = _stream_ids(stream, "stream")
            if not streams or len(set(streams)) != len(streams):
                raise ValueError(f"stream must be an id or a non-empty list of distinct ids, got {streams}")
            states = [self._stream(s) for s in streams]
            # Stored as data: a caller's autograd graph must not be kept alive by the memory's tensors.
            embeddings, k, v, latents = (t.detach() if isinstance(t, torch.Tensor) else t
                                         for t in (embeddings, k, v, latents))
            if batched:
                n = self._check_append(embeddings, k, v, latents, batch=len(streams))
            else:
                n = self._check_append(embeddings, k, v, latents)
                embeddings = embeddings[None]
                k, v = (None, None) if k is None else (k[:, None], v[:, None])
                latents = None if latents is None else latents[None]
            ps = self.config.page_size
            new_pages = [-(-(st.num_frames + n) // ps) - len(st.pages) for st in states]
            if sum(new_pages) > self._page_alloc.num_free:
                raise ValueError(
                    f"memory is full: appending {n} frames to stream{'s' if batched else ''} "
                    f"{', '.join(map(str, streams))} needs {sum(new_pages)} more embedding pages but "
                    f"{self._page_alloc.num_free} are free (raise MemoryConfig.max_frames={self.config.max_frames})")
            kv_frames = [(b, f) for b, st in enumerate(states) for f in range(st.num_frames, st.num_frames + n)
                         if f >= self.policy.sink_frames]
            if self.config.storage == "kv" and kv_frames:
                self._tiers.reserve(len(kv_frames))  # the only allocation that can fail: before any change
            # Validation done: from here on the call succeeds.
            first_page = [len(st.pages) for st in states]
            for s, st, count in zip(streams, states, new_pages):
                if count:
                    st.pages += list(self._page_alloc.allocate(count, s))
            flat = torch.tensor([self._flat(st, f) for st in states for f in range(st.num_frames, st.num_frames + n)],
                                dtype=torch.int64)
            flat = self._to_device(flat)
            self._pages.view(-1, self.config.embed_dim)[flat] = embeddings.flatten(0, 1).to(
                self.device, self.config.embed_dtype)
            if self._latents is not None:
                self._latents.view((-1,) + tuple(self.config.latent_shape))[flat] = latents.flatten(0, 1).to(
                    self.device, self.config.dtype)
            for st in states:
                st.kv_code += [-1] * n
                st.num_frames += n
            if self.config.storage == "kv" and kv_frames:
                self._store_kv(streams, states, kv_frames, n, k, v)
            self._index.set_stream(streams, first_page, [st.pages[i:] for st, i in zip(states, first_page)],
                                   [self._eligible(st) for st in states],
                                   [self._flat(st, st.num_frames - 1) for st in states])
            self._sync_index()

    # --------------------------------------------------------------------------------------------- retrieve
    def retrieve(self, streams: list[int] | int, queries: torch.Tensor | None = None) -> RetrievalPlan:
        """Selects, for each stream, the top-k most similar eligible frames for its next block.

        The next block of a stream holding ``n`` frames starts at frame ``n``; eligible are the frames of
        :meth:`RetrievalPolicy.eligible_range` that still have their storage. One ``cosine_topk`` launch serves all
        streams; nothing is synchronised with the device.

        Args:
            streams: stream ids (or one id).
            queries: ``[B, embed_dim]`` query embeddings; ``None`` uses each stream's last appended frame (frame
                ``n - 1``, the last clean frame of the previous block, as the reference does).

        Returns:
            A :class:`RetrievalPlan`; a :class:`RetrievalRecord` per stream is added to the log (its selection
            read from the plan only when someone reads it: :meth:`log`, :meth:`records`).

        Raises:
            KeyError: unknown stream. ValueError: a stream with no frames when ``queries`` is None, a repeated
            stream, or ``queries`` of the wrong shape/device.
        """
        start = time.perf_counter()
        with self._lock:
            streams, _ = _stream_ids(streams, "streams")
            if not streams:
                raise ValueError("streams must name at least one stream")
            if len(set(streams)) != len(streams):
                raise ValueError(f"streams must be distinct, got {streams}")
            states = [self._stream(s) for s in streams]
            if queries is None:
                for s, st in zip(streams, states):
                    if st.num_frames == 0:
                        raise ValueError(f"stream {s} has no frames: nothing to query with (pass queries=...)")
            else:
                self._check_tensor(queries, "queries", (len(streams), self.config.embed_dim))
                queries = queries.to(self.config.embed_dtype)
            # Everything below reads the persistent device index: no host->device copy in steady state.
            rows = self._index.rows(streams)
            if queries is None:
                queries = self._pages.view(-1, self.config.embed_dim).index_select(0, self._index.query_index(rows))
            lo, hi = self._index.lo_hi(rows)
            scores, ids = lrag_ext.cosine_topk(queries, self._pages, self._index.table(rows), lo, hi,
                                               self.policy.top_k)
            ranges = [self._eligible(st) for st in states]  # the host's copy of what the index holds
            plan = RetrievalPlan(streams=streams, start_frames=[st.num_frames for st in states],
                                 counts=[min(self.policy.top_k, h - l) for l, h in ranges], ids=ids, scores=scores,
                                 _memory_token=self._token, _states=states, _eligible_lo=[r[0] for r in ranges],
                                 _rows=rows)
            elapsed_ms = (time.perf_counter() - start) * 1e3
            for b, st in enumerate(states):
                st.log.append(RetrievalRecord.from_plan(
                    plan, b, self.policy.sink_frames, block=len(st.log), query_frame=st.num_frames,
                    query_descriptor_frame=st.num_frames - 1, num_evicted=self.policy.num_evicted(st.num_frames),
                    num_eligible=ranges[b][1] - ranges[b][0], timings_ms=dict(retrieve=elapsed_ms)))
            return plan

    # ----------------------------------------------------------------------------------------------- gather
    def gather(self, plan: RetrievalPlan, dst_k: torch.Tensor, dst_v: torch.Tensor,
               dst_frame: torch.Tensor | None = None, positions: int | str | torch.Tensor | None = None,
               stream: "torch.cuda.Stream | None" = None) -> "torch.cuda.Event | None":
        """Writes the K/V of the plan's selected frames into the memory slots of an attention cache.

        For stream ``b`` of the plan and rank ``j < counts[b]``: ``dst_v[:, b, dst_frame[b, j]] = V`` of frame
        ``ids[b, j]`` and ``dst_k[:, b, dst_frame[b, j]] = R(position) K`` (temporal RoPE of ``position``; K is
        stored without RoPE). Cache frames of unselected ranks are left untouched.

        Args:
            plan: from :meth:`retrieve` (``storage="kv"``).
            dst_k, dst_v: ``[num_layers, B, cache_frames, tokens_per_frame, num_heads, head_dim]``.
            dst_frame: ``[B, top_k]`` int64 cache frame per rank, distinct within a stream and in
                ``[0, cache_frames)``; default ``sink_frames + j``. Checked before anything is written on CPU; on a
                GPU the values are not read back (no synchronisation) and follow :func:`lrag_ext.gather_kv`'s CUDA
                semantics (out-of-range entries skipped, repeated ones undefined).
            positions: the temporal position K is rotated to (its RoPE delta; K is stored un-roped), a policy of
                :mod:`lrag_ext.positions`: ``"sink"`` (= ``0``: un-roped K, for attention that applies RoPE by
                position itself, as the reference and our generator), an int, ``"absolute"`` (frame index),
                ``"ordered"`` (in temporal order just before the local window, which starts at
                ``sink + top_k``), or a ``[B, top_k]`` int64 tensor; ``None`` (the default):
                ``config.memory_position``.
            stream: a CUDA stream to run the copies on (prefetch). The call then returns an event recorded
                after the copies: the consumer must ``torch.cuda.current_stream().wait_event(event)`` before
                reading ``dst_k``/``dst_v``, and must not write the memory's storage from another stream meanwhile.

        Returns:
            The event when ``stream`` is given, else ``None``.
        """
        start = time.perf_counter()
        with self._lock:
            if self.config.storage != "kv":
                raise ValueError(f"gather needs storage='kv', this memory stores {self.config.storage!r}")
            states = self._check_plan(plan, need_kv=True)
            B, K = plan.ids.shape
            layout = self.config.kv_layout
            for name, t in (("dst_k", dst_k), ("dst_v", dst_v)):
                if not isinstance(t, torch.Tensor) or t.dim() != 6 or t.shape[0] != layout.num_layers or \
                        t.shape[1] != B or tuple(t.shape[3:]) != layout.frame_shape[1:]:
                    raise ValueError(
                        f"{name} must be [num_layers={layout.num_layers}, B={B}, cache_frames, "
                        f"{', '.join(map(str, layout.frame_shape[1:]))}], got "
                        f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
                if t.device != self.device:
                    raise ValueError(f"{name} must be on {self.device}, got {t.device}")
                if t.dtype not in _KV_DTYPES or t.dtype != dst_k.dtype:
                    raise ValueError(f"dst_k and dst_v must have one dtype among float32, float16, bfloat16, got "
                                     f"{dst_k.dtype} and {dst_v.dtype}")
                if t.stride(-1) != 1:
                    raise ValueError(f"{name} must be dense in its last dim (stride 1), got strides {t.stride()}")
            cache_frames = dst_k.shape[2]
            if dst_frame is None:
                if self.policy.sink_frames + K > cache_frames:
                    raise ValueError(f"the cache has {cache_frames} frames: too few for sink {self.policy.sink_frames} "
                                     f"+ top_k {K} memory slots; pass dst_frame")
                dst_frame = (self.policy.sink_frames + torch.arange(K, device=self.device)).expand(B, K)
            self._check_tensor(dst_frame, "dst_frame", (B, K), dtype=torch.int64)
            if dst_frame.device.type == "cpu":
                _check_cache_frames(dst_frame, cache_frames)
            delta = self._positions(plan, self.config.memory_position if positions is None else positions)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                # Locations are looked up now, not at retrieve time: appends in between may have moved frames.
                codes = self._index.codes_of(plan._rows, plan.ids)
                for seg_index, seg in enumerate(self._tiers.segments):
                    # Unstored frames (code -1) have segment -1, so they never match and stay -1 (skipped).
                    slots = torch.where((codes >> SEGMENT_SHIFT) == seg_index, codes & SLOT_MASK,
                                        torch.full_like(codes, -1))
                    lrag_ext.gather_kv(seg.pool, slots, dst_k, dst_v, dst_frame.contiguous(), delta,
                                       rope_temporal_pairs=layout.rope_temporal_pairs, rope_theta=layout.rope_theta,
                                       pool_scale=seg.scale)
                event = None
                if stream is not None:
                    event = torch.cuda.Event()
                    event.record(stream)
            elapsed_ms = (time.perf_counter() - start) * 1e3
            for st in states:
                if st.log and st.log[-1].belongs_to(plan):
                    st.log[-1]._set_timing("gather", elapsed_ms)
            return event

    def latents(self, plan: RetrievalPlan) -> torch.Tensor:
        """``[B, top_k, C, H, W]`` latents of the plan's selected frames (zeros where fewer were selected), for
        ``storage="latent"``: the generator recomputes their K/V with one t = 0 forward."""
        with self._lock:
            if self.config.storage != "latent":
                raise ValueError(f"latents needs storage='latent', this memory stores {self.config.storage!r}")
            self._check_plan(plan, need_kv=False)
            table = self._index.table(plan._rows)
            ids = plan.ids.clamp(min=0)
            page = table.gather(1, ids // self.config.page_size).long()
            out = self._latents[page, ids % self.config.page_size]
            return torch.where((plan.ids >= 0)[..., None, None, None], out, torch.zeros_like(out))

    # ------------------------------------------------------------------------------------------------- log
    def log(self, stream: int, start: int = 0) -> list[dict]:
        """Per-block retrieval records of ``stream`` as new plain dicts (:meth:`RetrievalRecord.to_dict`) with the
        reference's fields: ``query_frame`` (the block start s, as the reference logs it),
        ``query_descriptor_frame`` (s - 1, the frame actually used as the query), ``num_evicted``, ``num_eligible``,
        ``k_sel``, ``selected_pool_indices`` (frame - sink), ``selected_global_frames``, ``selected_similarities``,
        plus ``block`` and ``timings_ms``. ``start`` selects ``records[start:]`` (``-1``: the newest only). Reading
        a record copies its selection to the host (one synchronisation per record not read before); the dicts are
        the caller's (changing them does not change the log). :meth:`records` gives the typed records."""
        with self._lock:
            return [rec.to_dict() for rec in self.records(stream, start)]

    def records(self, stream: int, start: int = 0) -> list[RetrievalRecord]:
        """The log of ``stream`` as the memory's own (immutable) :class:`RetrievalRecord` objects, ``records[start:]``.
        Nothing is read from the device until a record's selection is (see :class:`RetrievalRecord`)."""
        with self._lock:
            return self._stream(stream).log[start:]

    # ------------------------------------------------------------------------------------------ save / load
    def save(self, path: str) -> None:
        """Writes the memory to the folder ``path`` (created; must not exist or be empty): ``tensors.safetensors``
        (embedding/latent pages, the K/V of every stored frame) and ``manifest.json`` (format version, config,
        streams with their page tables and K/V locations, the eviction queues, the materialised log, and the
        SHA-256 and size of the tensor file). Nothing is pickled. The folder is written under a temporary name and
        renamed, so a crash never leaves a half-written memory at ``path``."""
        with self._lock:
            if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
                raise FileExistsError(f"path {path!r} exists and is not an empty folder")
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            tensors = {"embedding_pages": self._pages.cpu().contiguous()}
            if self._latents is not None:
                tensors["latent_pages"] = self._latents.cpu().contiguous()
            streams = {}
            for sid, st in self._streams.items():
                streams[str(sid)] = dict(num_frames=st.num_frames, pages=list(st.pages), kv_code=list(st.kv_code),
                                         first_retrievable=st.first_retrievable, log=[r.to_dict() for r in st.log])
                stored = [self._tiers.frame(c) for c in st.kv_code if c >= 0]
                if stored:
                    tensors[f"kv/{sid}"] = torch.stack([kv.cpu() for kv, _ in stored])
                    if stored[0][1] is not None:
                        tensors[f"kv_scale/{sid}"] = torch.stack([scale.cpu() for _, scale in stored])
            manifest = dict(format=fmt.FORMAT, version=fmt.VERSION, config=self.config.to_dict(),
                            next_stream=self._next_stream, streams=streams,
                            segments=[seg.allocator.num_slots for seg in self._segments()],
                            fifo={tier: [list(x) for x in q] for tier, q in self._queues().items()})
            tmp = f"{path.rstrip(os.sep)}.tmp-{os.getpid()}-{threading.get_ident()}"
            os.makedirs(tmp)
            try:
                tensor_file = os.path.join(tmp, "tensors.safetensors")
                import safetensors.torch  # noqa: PLC0415 - only saving and loading need it
                safetensors.torch.save_file(tensors, tensor_file)
                manifest["files"] = {"tensors.safetensors": dict(sha256=fmt.sha256_file(tensor_file),
                                                                 bytes=os.path.getsize(tensor_file))}
                manifest["manifest_sha256"] = fmt.manifest_digest(manifest)
                with open(os.path.join(tmp, "manifest.json"), "w") as f:
                    json.dump(manifest, f, indent=1)
                if os.path.isdir(path):
                    os.rmdir(path)
                os.replace(tmp, path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    @classmethod
    def load(cls, path: str, device: str | torch.device | None = None) -> "RetrievalMemory":
        """Restores a memory written by :meth:`save` (optionally onto another ``device``). Retrieval results equal
        the saved memory's.

        Every field of the manifest is checked (its checksum, types, ranges, and consistency between page tables,
        frame counts, K/V locations, queues, segment sizes and tensor shapes) before anything is allocated, and only
        regular files are opened (see :mod:`lrag_ext.memory_format`).

        Raises:
            ValueError: naming the file and the field, for a missing, truncated, altered or inconsistent save, or
                one whose K/V tiers would not fit in the target device's memory.
        """
        manifest_file = os.path.join(path, "manifest.json")
        manifest = fmt.read_manifest(path)
        config = fmt.validate_manifest(manifest, manifest_file)
        if device is not None:
            try:
                config = dataclasses.replace(config, device=torch.device(device))
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"device {device!r} is not a valid device for the loaded memory: {err}") from None
        tensors = fmt.read_tensors(path, manifest, config)
        fmt.check_fits(config, manifest["segments"], manifest_file)
        mem = cls(config)
        for size in manifest["segments"][1:]:
            mem._tiers.add_host_segment(size)
        mem._next_stream = manifest["next_stream"]
        for sid_text, rec in manifest["streams"].items():
            sid = int(sid_text)
            st = _Stream(num_frames=rec["num_frames"], first_retrievable=rec["first_retrievable"],
                         log=[RetrievalRecord.from_dict(entry) for entry in rec["log"]])
            st.pages = list(mem._page_alloc.allocate(len(rec["pages"]), sid))
            # Physical pages and slots are reassigned; logical ids (what retrieval returns) are unchanged.
            if rec["pages"]:
                mem._pages[torch.tensor(st.pages)] = tensors["embedding_pages"][torch.tensor(rec["pages"])].to(mem.device)
                if mem._latents is not None:
                    mem._latents[torch.tensor(st.pages)] = tensors["latent_pages"][torch.tensor(rec["pages"])].to(mem.device)
            st.kv_code = [-1] * len(rec["kv_code"])
            stored = [(f, c) for f, c in enumerate(rec["kv_code"]) if c >= 0]
            scales = tensors.get(f"kv_scale/{sid}")
            for row, (f, c) in enumerate(stored):
                st.kv_code[f] = mem._tiers.place(sid, c, tensors[f"kv/{sid}"][row],
                                                 scales[row] if scales is not None else None)
            mem._streams[sid] = st
            mem._index.add(sid)
            mem._index.set_stream([sid], [0], [st.pages], [mem._eligible(st)],
                                  [mem._flat(st, st.num_frames - 1) if st.num_frames else 0])
            mem._index.set_codes([(sid, f, c) for f, c in enumerate(st.kv_code) if c >= 0])
        if mem._tiers is not None:
            mem._tiers.fifo = {tier: collections.deque(tuple(x) for x in manifest["fifo"][tier])
                               for tier in ("device", "host")}
        return mem

    # ----------------------------------------------------------------------------------------------- helpers
    def _stream(self, stream: int) -> _Stream:
        stream = _stream_id(stream)
        try:
            return self._streams[stream]
        except KeyError:
            raise KeyError(f"unknown stream {stream!r} (known: {sorted(self._streams)})") from None

    def _check_plan(self, plan, need_kv: bool) -> list[_Stream]:
        """The plan's stream states, after checking the plan is this memory's and still valid (see RetrievalPlan)."""
        if not isinstance(plan, RetrievalPlan):
            raise TypeError(f"plan must be a RetrievalPlan returned by retrieve(), got {type(plan).__name__}")
        if plan._memory_token != self._token:
            raise ValueError("plan was made by another RetrievalMemory (or before a save/load): retrieve from this one")
        states = []
        for s, st, lo in zip(plan.streams, plan._states, plan._eligible_lo):
            if self._streams.get(s) is not st:
                raise ValueError(f"plan is stale: stream {s} was reset or removed after retrieve(); retrieve again")
            # frames below first_retrievable lost their K/V (host tier full) or were forgotten (forget_before,
            # which also applies to stored latents)
            if (need_kv or self.config.storage == "latent") and st.first_retrievable > lo:
                raise ValueError(f"plan is stale: frames of stream {s} that it may have selected lost their K/V (host "
                                 f"tier full) or were forgotten after retrieve(); retrieve again")
            states.append(st)
        return states

    def _flat(self, st: _Stream, frame: int) -> int:
        """Row of ``frame`` of a stream in the embedding pages viewed as ``[pages * page_size, D]``."""
        ps = self.config.page_size
        return st.pages[frame // ps] * ps + frame % ps

    def _eligible(self, st: _Stream) -> tuple[int, int]:
        lo, hi = self.policy.eligible_range(st.num_frames)
        lo = max(lo, st.first_retrievable)
        return lo, max(lo, hi)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return to_device(t, self.device)

    def _positions(self, plan: RetrievalPlan, positions) -> torch.Tensor:
        """RoPE deltas of the plan's frames: their positions under ``positions`` (:mod:`lrag_ext.positions`), the
        local window starting after the sink and ``top_k`` memory slots."""
        if isinstance(positions, torch.Tensor):
            self._check_tensor(positions, "positions", tuple(plan.ids.shape), dtype=torch.int64)
            return positions.contiguous()
        return memory_positions(positions, plan.ids, first_local=self.policy.sink_frames + self.policy.top_k)

    def _check_tensor(self, t, name: str, shape: tuple, dtype: torch.dtype | None = None) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
        if dtype is None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != self.device:
            raise ValueError(f"{name} must be on {self.device}, got {t.device}")

    def _check_append(self, embeddings, k, v, latents, batch: int | None = None) -> int:
        """Checks append's tensors (``batch``: the number of streams of a batched append, whose tensors carry a
        stream dim: embeddings/latents first, K/V second); returns the frames per stream ``n``."""
        lead = () if batch is None else (batch,)
        want_dims = 2 + len(lead)
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != want_dims:
            got = list(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise ValueError(f"embeddings must be [{'B, ' if lead else ''}n, embed_dim={self.config.embed_dim}], "
                             f"got {got}")
        n = embeddings.shape[-2]
        if n < 1:
            raise ValueError("embeddings must hold at least one frame")
        self._check_tensor(embeddings, "embeddings", lead + (n, self.config.embed_dim))
        storage = self.config.storage
        if storage == "kv":
            if k is None or v is None:
                raise ValueError("storage='kv' needs k and v: [num_layers, n, tokens_per_frame, num_heads, head_dim]")
            L, T, H, Dh = self.config.kv_layout.frame_shape
            self._check_tensor(k, "k", (L,) + lead + (n, T, H, Dh))
            self._check_tensor(v, "v", (L,) + lead + (n, T, H, Dh))
            if k.dtype not in _KV_DTYPES or v.dtype != k.dtype:
                raise ValueError(f"k and v must have one dtype among float32, float16, bfloat16 (cast to the memory's "
                                 f"{self.config.dtype} on write), got {k.dtype} and {v.dtype}")
        elif k is not None or v is not None:
            raise ValueError(f"k/v given but storage={storage!r} does not keep K/V")
        if storage == "latent":
            if latents is None:
                raise ValueError(f"storage='latent' needs latents: [n, {', '.join(map(str, self.config.latent_shape))}]")
            self._check_tensor(latents, "latents", lead + (n,) + tuple(self.config.latent_shape))
        elif latents is not None:
            raise ValueError(f"latents given but storage={storage!r} does not keep latents")
        return n

    # K/V tiers (lrag_ext/memory_tiers.py) -----------------------------------------------------------------
    def _segments(self) -> list:
        return self._tiers.segments if self._tiers is not None else []

    def _queues(self) -> dict:
        return self._tiers.fifo if self._tiers is not None else {"device": [], "host": []}

    def _code_of(self, stream: int, frame: int) -> int:
        return self._streams[stream].kv_code[frame]

    def _moved(self, stream: int, frame: int, code: int) -> None:
        """The tiers moved a stored frame to ``code``, or dropped it (-1) to make room."""
        st = self._streams[stream]
        self._set_code(stream, st, frame, code)
        if code < 0:
            self._drop_below(stream, st, frame + 1)

    def _set_code(self, stream: int, st: _Stream, frame: int, code: int) -> None:
        """Moves a frame's K/V location (host record now, device index at the end of the call)."""
        st.kv_code[frame] = code
        self._code_changes.append((stream, frame, code))

    def _drop_below(self, stream: int, st: _Stream, frame: int) -> None:
        """Frames of ``stream`` below ``frame`` lost their K/V: its eligible range starts at ``frame`` now."""
        if frame > st.first_retrievable:
            st.first_retrievable = frame
            self._range_changes.add(stream)

    def _sync_index(self) -> None:
        """Mirrors the K/V moves and drops of this call into the device index (one scatter per table)."""
        self._index.set_codes(self._code_changes)
        live = [s for s in self._range_changes if s in self._streams]
        self._index.set_ranges(live, [self._eligible(self._streams[s]) for s in live])
        self._code_changes, self._range_changes = [], set()

    def _store_kv(self, streams: list[int], states: list[_Stream], frames: list[tuple[int, int]], n: int,
                  k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores the new frames ``(stream index b, frame)`` of all streams, in order (stream after stream), from
        ``k``/``v`` ``[L, B, n, ...]``: slots from the tiers (making room), then one write_kv per segment. More new
        frames than the tiers hold: the oldest are dropped right away."""
        limit = self._tiers.limit()
        if limit is not None and len(frames) > limit:
            for b, f in frames[:-limit]:
                self._drop_below(streams[b], states[b], f + 1)
            frames = frames[-limit:]
        codes = self._tiers.allocate([(streams[b], f) for b, f in frames])
        for (b, f), code in zip(frames, codes):
            self._set_code(streams[b], states[b], f, code)
        # Row of each frame in k.flatten(1, 2) ([L, B * n, ...]): b * n + (f - first frame of the block).
        first = [st.num_frames - n for st in states]
        self._tiers.write(codes, [b * n + f - first[b] for b, f in frames], len(states) * n, k.flatten(1, 2),
                          v.flatten(1, 2), self._to_device)

    def _release(self, stream: int, st: _Stream) -> None:
        if st.pages:
            self._page_alloc.free(st.pages)
        if self._tiers is not None:
            self._tiers.release(stream, st.kv_code)


def _stream_id(value) -> int:
    """``value`` as a plain int stream id (Python and numpy ints, 0-d integer tensors); bools are refused (True == 1
    as a dict key). Every method converts ids once, at entry, and uses only the converted value."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"a stream id must be an int, got {value!r}")
    if isinstance(value, torch.Tensor) and value.dim() != 0:  # a 1-element tensor is a list of one id
        raise TypeError(f"a stream id must be an int, got a {value.dim()}-d tensor")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"a stream id must be an int, got {type(value).__name__}") from None


def _stream_ids(value, name: str) -> tuple[list[int], bool]:
    """``(ids, batched)``: one id, or an iterable of ids (a list, a tuple, a 1-d tensor), as plain ints."""
    if isinstance(value, bool):
        _stream_id(value)  # raises, naming the bool
    try:
        return [_stream_id(value)], False
    except TypeError:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise TypeError(f"{name} must be a stream id or a list of ids, got {type(value).__name__}") from None
    return [_stream_id(v) for v in value], True


def _check_cache_frames(dst_frame: torch.Tensor, cache_frames: int) -> None:
    """Every destination in ``[0, cache_frames)`` and distinct within its stream, checked once for the whole plan:
    ``gather`` issues one ``gather_kv`` per storage segment, and each call sees only its own segment's entries, so a
    bad or repeated destination would otherwise be found after earlier segments were written, or not at all (two
    entries in different segments)."""
    bad = (dst_frame < 0) | (dst_frame >= cache_frames)
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"dst_frame[{b}, {j}] = {int(dst_frame[b, j])} is outside the cache: expected a frame in "
                         f"[0, {cache_frames})")
    ordered = dst_frame.sort(dim=1).values
    repeated = ordered[:, 1:] == ordered[:, :-1]
    if bool(repeated.any()):
        b, j = (int(x) for x in repeated.nonzero()[0])
        raise ValueError(f"dst_frame[{b}] names cache frame {int(ordered[b, j])} twice: each rank needs its own frame")

