"""The typed per-block log record of a :class:`lrag_ext.RetrievalMemory`: :class:`RetrievalRecord`.

:meth:`RetrievalMemory.retrieve` adds one record per stream and block. The record's selection (which frames were
selected, with their similarities) stays in the plan's device tensors until someone reads it: a record made by
``retrieve`` never synchronises with the device. The first read copies the selection to the host (one
device->host copy per record) and drops the record's reference to the plan, so old plans and their tensors are
freed.

Why two views. :meth:`RetrievalMemory.log` keeps returning plain dicts (:meth:`RetrievalRecord.to_dict`, with
exactly the keys, order and value types it always had): callers index them, compare them with dicts, dump them
as JSON and may modify their copies without touching the memory. :meth:`RetrievalMemory.records` returns the
typed, read-only records themselves (attribute access, no copy, selection read on first access). A record is not
a mapping, so no caller can confuse the two: ``record["k_sel"]`` raises a ``TypeError`` naming ``to_dict()``.
"""
from __future__ import annotations

import sys
import types
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from lrag_ext.memory import RetrievalPlan

__all__ = ["KEYS", "RetrievalRecord"]

# The keys of RetrievalRecord.to_dict(), in its order (the order of the saved manifest's log records).
KEYS = ("block", "query_frame", "query_descriptor_frame", "num_evicted", "num_eligible", "k_sel", "timings_ms",
        "selected_global_frames", "selected_pool_indices", "selected_similarities")
_INT_KEYS = KEYS[:6]
_FRAME_LIST_KEYS = ("selected_global_frames", "selected_pool_indices")


class _Selection(NamedTuple):
    global_frames: tuple[int, ...]
    pool_indices: tuple[int, ...]
    similarities: tuple[float, ...]


class _Pending(NamedTuple):
    """Where an unread selection is: row ``row`` of ``plan``; pool index = frame - ``sink_frames``."""
    plan: "RetrievalPlan"
    row: int
    sink_frames: int


@dataclass(frozen=True, eq=False, repr=False)
class RetrievalRecord:
    """One stream's retrieval for one block, with the reference's fields (immutable).

    Attributes:
        block: the record's index in its stream's log (0 for the stream's first retrieval).
        query_frame: the first frame ``s`` of the block retrieved for (= the stream's frame count at retrieval),
            as the reference logs it.
        query_descriptor_frame: ``s - 1``, the frame whose embedding is the query (the last clean frame of the
            previous block).
        num_evicted: frames that left the local window before ``s`` (:meth:`RetrievalPolicy.num_evicted`).
        num_eligible: frames retrieval chose from (the eligible range, less frames whose K/V were dropped).
        k_sel: frames selected, ``min(top_k, num_eligible)``.
        timings_ms: read-only ``{"retrieve": ms}`` host time of the ``retrieve`` call, plus ``"gather": ms`` once
            the plan was gathered.
        selected_global_frames: the selected frame ids, by descending similarity (``k_sel`` ints).
        selected_pool_indices: the same frames as indices of the reference's memory pool, ``frame - sink_frames``.
        selected_similarities: their cosine similarities to the query (``k_sel`` floats, float32 values).

    The three ``selected_*`` fields are tuples, read from the plan on first access (of any of them, or of
    :meth:`to_dict`): one device->host copy, after which the record no longer references the plan. A record keeps
    reading correctly after its stream was reset or removed, or the memory appended and retrieved again: the plan's
    ``ids``/``scores`` are the plan's own tensors, so the record reads what ``retrieve`` selected.

    Build records with :meth:`from_dict` (a saved record) or :meth:`from_plan` (what ``retrieve`` does). Records
    compare equal when their :meth:`to_dict` are equal.
    """

    block: int
    query_frame: int
    query_descriptor_frame: int
    num_evicted: int
    num_eligible: int
    k_sel: int
    timings_ms: Mapping[str, float]
    # Private state, set by from_plan / from_dict: exactly one of _selection / _pending; reading the selection
    # turns _pending into _selection.
    _selection: _Selection | None = field(default=None, kw_only=True)
    _pending: _Pending | None = field(default=None, kw_only=True)
    # Which plan made the record (gather adds its timing to the record of its plan); weak, so it never keeps the
    # plan alive. None for a loaded record.
    _plan_ref: weakref.ref | None = field(default=None, kw_only=True)

    def __post_init__(self):
        if (self._selection is None) == (self._pending is None):
            raise TypeError("build a RetrievalRecord with RetrievalRecord.from_dict() or RetrievalRecord.from_plan()")
        object.__setattr__(self, "timings_ms", types.MappingProxyType(dict(self.timings_ms)))

    # ------------------------------------------------------------------------------------------ constructors
    @classmethod
    def from_plan(cls, plan: "RetrievalPlan", row: int, sink_frames: int, *, block: int, query_frame: int,
                  query_descriptor_frame: int, num_evicted: int, num_eligible: int,
                  timings_ms: Mapping[str, float]) -> "RetrievalRecord":
        """The record of row ``row`` of ``plan`` (``k_sel = plan.counts[row]``), its selection not yet read."""
        return cls(block=block, query_frame=query_frame, query_descriptor_frame=query_descriptor_frame,
                   num_evicted=num_evicted, num_eligible=num_eligible, k_sel=plan.counts[row], timings_ms=timings_ms,
                   _pending=_Pending(plan, row, sink_frames), _plan_ref=weakref.ref(plan))

    @classmethod
    def from_dict(cls, d: Mapping) -> "RetrievalRecord":
        """The record ``d`` describes, as :meth:`to_dict` (or a saved manifest) writes it.

        Raises:
            ValueError: ``d`` is not a mapping with exactly the keys of :meth:`to_dict`, or a ``selected_*`` list
                does not hold ``k_sel`` entries. TypeError: a value of the wrong type (ints must be ints, not
                bools; timings and similarities numbers).
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"a retrieval record must be a mapping with the keys {list(KEYS)}, got {type(d).__name__}")
        missing, unknown = [k for k in KEYS if k not in d], sorted(map(str, set(d) - set(KEYS)))
        if missing or unknown:
            raise ValueError(f"a retrieval record has the keys {list(KEYS)}: "
                             + "; ".join(f"{what} {keys}" for what, keys in (("missing", missing),
                                                                             ("unknown", unknown)) if keys))
        for key in _INT_KEYS:
            _check(key, d[key], _is_int, "an int")
        timings = d["timings_ms"]
        if not isinstance(timings, Mapping) or not all(isinstance(name, str) for name in timings):
            raise TypeError(f"retrieval record field timings_ms must map names to milliseconds, got {timings!r}")
        for name, ms in timings.items():
            _check(f"timings_ms[{name!r}]", ms, _is_number, "a number")
        for key in KEYS[7:]:
            values = d[key]
            if not isinstance(values, (list, tuple)):
                raise TypeError(f"retrieval record field {key} must be a list, got {type(values).__name__}")
            if len(values) != d["k_sel"]:
                raise ValueError(f"retrieval record field {key} has {len(values)} entries, k_sel is {d['k_sel']}")
            is_ok, what = (_is_int, "an int") if key in _FRAME_LIST_KEYS else (_is_number, "a number")
            for i, value in enumerate(values):
                _check(f"{key}[{i}]", value, is_ok, what)
        selection = _Selection(tuple(d["selected_global_frames"]), tuple(d["selected_pool_indices"]),
                               tuple(float(x) for x in d["selected_similarities"]))
        return cls(**{key: d[key] for key in _INT_KEYS},
                   timings_ms={name: float(ms) for name, ms in timings.items()}, _selection=selection)

    # ------------------------------------------------------------------------------------------- selection
    @property
    def selected_global_frames(self) -> tuple[int, ...]:
        return self._read().global_frames

    @property
    def selected_pool_indices(self) -> tuple[int, ...]:
        return self._read().pool_indices

    @property
    def selected_similarities(self) -> tuple[float, ...]:
        return self._read().similarities

    @property
    def materialised(self) -> bool:
        """Whether the selection was read to the host (the record no longer references its plan)."""
        return self._selection is not None

    def belongs_to(self, plan: "RetrievalPlan") -> bool:
        """Whether ``plan`` is the one :meth:`RetrievalMemory.retrieve` made this record for (read or not)."""
        return self._plan_ref is not None and self._plan_ref() is plan

    def _read(self) -> _Selection:
        """The selection, copied from the plan on first use (one device->host copy). Thread-safe without a lock:
        ``_selection`` is set before ``_pending`` is cleared, and two first reads at once just copy twice."""
        selection = self._selection
        if selection is None:
            pending = self._pending
            if pending is None:  # another thread has just read it
                return self._selection
            plan, row, sink = pending
            ids, sims = [], []
            if self.k_sel:
                # Ids and scores in one copy: float64 holds both exactly (ids < 2**53, float32 scores).
                ids, sims = torch.stack((plan.ids[row, :self.k_sel].double(),
                                         plan.scores[row, :self.k_sel].double())).tolist()
            ids = tuple(int(i) for i in ids)
            selection = _Selection(ids, tuple(i - sink for i in ids), tuple(sims))
            object.__setattr__(self, "_selection", selection)
            object.__setattr__(self, "_pending", None)
        return selection

    def _set_timing(self, name: str, ms: float) -> None:
        """Adds a timing (the memory's bookkeeping: ``gather`` of the record's plan); callers see a read-only view."""
        object.__setattr__(self, "timings_ms", types.MappingProxyType({**self.timings_ms, name: ms}))

    # ---------------------------------------------------------------------------------------------- views
    def to_dict(self) -> dict:
        """A new plain dict of the record: :data:`KEYS` in order, ``timings_ms`` a dict, the ``selected_*`` lists of
        Python ints / floats (what :meth:`RetrievalMemory.log` returns and a saved manifest holds)."""
        sel = self._read()
        return dict(block=self.block, query_frame=self.query_frame, query_descriptor_frame=self.query_descriptor_frame,
                    num_evicted=self.num_evicted, num_eligible=self.num_eligible, k_sel=self.k_sel,
                    timings_ms=dict(self.timings_ms), selected_global_frames=list(sel.global_frames),
                    selected_pool_indices=list(sel.pool_indices), selected_similarities=list(sel.similarities))

    def __getitem__(self, key):
        use = f"record.{key} or record.to_dict()[{key!r}]" if key in KEYS else "its attributes or record.to_dict()"
        raise TypeError(f"a RetrievalRecord is not a mapping: use {use} (RetrievalMemory.log() returns dicts)")

    def __reduce__(self):  # pickle / copy: the record as to_dict() (the plan and its tensors stay behind)
        return RetrievalRecord.from_dict, (self.to_dict(),)

    def __eq__(self, other):
        if not isinstance(other, RetrievalRecord):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # equality reads the (lazily copied) selection
    __iter__ = None  # not a sequence either (__getitem__ only explains the error)

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={getattr(self, key)!r}" for key in _INT_KEYS)
        selection = (f"selected_global_frames={list(self._selection.global_frames)}, "
                     f"selected_similarities={list(self._selection.similarities)}") if self.materialised \
            else "selection not read yet"
        return f"RetrievalRecord({fields}, timings_ms={dict(self.timings_ms)}, {selection})"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """An int or float (not a bool) that float() can hold: a JSON integer beyond ~1.8e308 would overflow."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, float) or abs(value) <= _FLOAT_MAX


_FLOAT_MAX = int(sys.float_info.max)


def _check(name: str, value, is_ok, what: str) -> None:
    if not is_ok(value):
        raise TypeError(f"retrieval record field {name} must be {what}, got {value!r}")
