"""RetrievalRecord, the typed log record of RetrievalMemory: its selection against a brute-force cosine top-k, lazy
reading (no host read at retrieve, one per record after), dict views and their round trip, save/load, reset, gather
timings, and the errors of bad records and of attempts to change one."""
from __future__ import annotations

import dataclasses
import gc
import copy
import json
import os
import pickle
import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode

import lrag_ext
from lrag_ext.memory import KVLayout, MemoryConfig, RetrievalMemory
from lrag_ext.memory_log import KEYS, RetrievalRecord

LAYOUT = KVLayout(num_layers=2, tokens_per_frame=3, num_heads=2, head_dim=8)
TOP_K, RECENT, SINK, WINDOW = 3, 2, 1, 5


def make_memory(device, storage="kv") -> RetrievalMemory:
    kv = dict(kv_layout=LAYOUT, device_frames=64, host_frames=None) if storage == "kv" else {}
    return RetrievalMemory(MemoryConfig(top_k=TOP_K, recent_exclude=RECENT, sink_frames=SINK, window_frames=WINDOW,
                                        embed_dim=6, storage=storage, device=device, dtype=torch.float32,
                                        max_frames=256, page_size=4, **kv))


def append_block(mem, s, emb, g):
    if mem.config.storage == "kv":
        L, T, H, Dh = LAYOUT.frame_shape
        k = torch.randn(L, emb.shape[0], T, H, Dh, generator=g)
        mem.append(s, emb.to(mem.device), k=k.to(mem.device), v=k.neg().to(mem.device))
    else:
        mem.append(s, emb.to(mem.device))


def brute_force(history: list[torch.Tensor]) -> dict:
    """The record retrieve must log for the next block after ``history`` (one embedding per frame), from first
    principles: the query is the last frame; eligible are the frames after the sink that have left the window, less
    the most recent ``RECENT`` of those; the top ``TOP_K`` by float64 cosine similarity."""
    n = len(history)
    evicted = max(0, n - WINDOW)
    eligible = range(SINK, SINK + max(0, evicted - RECENT))
    q = history[-1].double()
    sims = {i: float(q @ history[i].double() / (q.norm() * history[i].double().norm())) for i in eligible}
    chosen = sorted(sims, key=lambda i: -sims[i])[:TOP_K]
    return dict(query_frame=n, query_descriptor_frame=n - 1, num_evicted=evicted, num_eligible=len(eligible),
                k_sel=len(chosen), selected_global_frames=chosen, selected_pool_indices=[i - SINK for i in chosen],
                selected_similarities=[sims[i] for i in chosen])


def assert_matches(rec: RetrievalRecord, want: dict, block: int) -> None:
    assert rec.block == block
    for key in ("query_frame", "query_descriptor_frame", "num_evicted", "num_eligible", "k_sel"):
        assert getattr(rec, key) == want[key], key
    assert list(rec.selected_global_frames) == want["selected_global_frames"]
    assert list(rec.selected_pool_indices) == want["selected_pool_indices"]
    assert list(rec.selected_similarities) == pytest.approx(want["selected_similarities"], abs=1e-5)


def run_streams(mem, blocks=7, streams=2, seed=0):
    """Appends ``blocks`` blocks of 3 frames to ``streams`` streams, retrieving all streams in one call after each;
    returns the streams and, per stream, the brute-force record of each retrieval (in log order)."""
    g = torch.Generator().manual_seed(seed)
    ids = [mem.add_stream() for _ in range(streams)]
    history = {s: [] for s in ids}
    want = {s: [] for s in ids}
    for _ in range(blocks):
        for s in ids:
            emb = torch.randn(3, 6, generator=g)
            append_block(mem, s, emb, g)
            history[s].extend(emb)
        mem.retrieve(ids)
        for s in ids:
            want[s].append(brute_force(history[s]))
    return ids, want


# --- the selection against the brute force ------------------------------------------------------------------------

@pytest.mark.parametrize("storage", ["kv", "embedding"])
def test_records_match_brute_force(device, storage):
    mem = make_memory(device, storage)
    streams, want = run_streams(mem)
    for s in streams:
        records = mem.records(s)
        assert len(records) == len(want[s])
        assert any(rec.k_sel == TOP_K for rec in records) and records[0].k_sel == 0
        for block, (rec, w) in enumerate(zip(records, want[s])):
            assert_matches(rec, w, block)
        assert mem.log(s) == [rec.to_dict() for rec in records]


def test_records_read_late_hold_what_retrieve_selected(device):
    """Records left unread while the memory keeps appending and retrieving read the selection of their own block."""
    mem = make_memory(device)
    s = mem.add_stream()
    g = torch.Generator().manual_seed(5)
    history, want = [], []
    for _ in range(8):
        emb = torch.randn(3, 6, generator=g)
        append_block(mem, s, emb, g)
        history.extend(emb)
        mem.retrieve(s)
        want.append(brute_force(history))
    assert not any(rec.materialised for rec in mem.records(s))
    for block, (rec, w) in enumerate(zip(mem.records(s), want)):
        assert_matches(rec, w, block)


# --- lazy reading -------------------------------------------------------------------------------------------------

HOST_READS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}


class HostReads(TorchFunctionMode):
    """Counts tensor calls that copy device data to the host (a synchronisation on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_retrieve_reads_nothing_and_each_record_reads_once(device):
    mem = make_memory(device)
    streams, want = run_streams(mem, blocks=4)
    with HostReads() as reads:
        plan = mem.retrieve(streams)
    assert reads.count == 0
    records = [mem.records(s, -1)[0] for s in streams]
    assert all(not rec.materialised and rec.belongs_to(plan) and rec.k_sel > 0 for rec in records)
    for rec in records:
        with HostReads() as reads:
            rec.selected_global_frames
        assert reads.count == 1 and rec.materialised
        with HostReads() as reads:
            rec.to_dict(), rec.selected_similarities, rec.selected_pool_indices
        assert reads.count == 0
    # A record with nothing selected needs no read at all.
    empty = mem.records(streams[0], 0)[0]
    assert empty.k_sel == 0
    with HostReads() as reads:
        assert empty.to_dict()["selected_similarities"] == []
    assert reads.count == 0


def test_reading_drops_the_plan():
    """Unread records keep their plan (and its tensors) alive; once read, nothing does."""
    mem = make_memory("cpu")
    streams, _ = run_streams(mem, blocks=4)
    plan = mem.retrieve(streams)
    plan_ref, ids_ref = weakref.ref(plan), weakref.ref(plan.ids)
    del plan
    gc.collect()
    assert plan_ref() is not None and ids_ref() is not None
    for s in streams:
        mem.log(s, -1)
    gc.collect()
    assert plan_ref() is None and ids_ref() is None
    assert all(rec.materialised for s in streams for rec in mem.records(s, -1))


# --- reset, remove ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("forget", ["reset", "remove_stream"])
def test_a_record_outlives_its_stream(device, forget):
    """Documented choice: a record read after its stream was reset or removed (and the memory reused) still reads
    the selection of its retrieval; the memory's log of a reset stream is empty."""
    mem = make_memory(device)
    streams, want = run_streams(mem, blocks=6)
    kept = mem.records(streams[0])
    assert not any(rec.materialised for rec in kept)
    getattr(mem, forget)(streams[0])
    run_streams(mem, blocks=6, seed=1)  # the freed pages and slots are reused
    if forget == "reset":
        assert mem.records(streams[0]) == [] and mem.log(streams[0]) == []
    for block, (rec, w) in enumerate(zip(kept, want[streams[0]])):
        assert_matches(rec, w, block)


# --- dict views, round trip, errors -------------------------------------------------------------------------------

def test_log_returns_plain_dicts_that_are_the_callers():
    mem = make_memory("cpu")
    streams, _ = run_streams(mem)
    log = mem.log(streams[0])
    rec = log[-1]
    assert type(rec) is dict and list(rec) == list(KEYS) and rec["k_sel"] == TOP_K
    assert all(type(v) is int for k, v in rec.items() if k in KEYS[:6])
    assert all(type(x) is int for x in rec["selected_global_frames"] + rec["selected_pool_indices"])
    assert all(type(x) is float for x in rec["selected_similarities"] + list(rec["timings_ms"].values()))
    assert json.loads(json.dumps(log)) == log
    assert mem.log(streams[0], start=-1) == [rec] and mem.log(streams[0], start=2) == log[2:]
    # Changing the caller's copies changes nothing in the memory.
    rec["k_sel"] = 99
    rec["timings_ms"]["retrieve"] = -1.0
    rec["selected_global_frames"].append(1000)
    assert mem.log(streams[0]) != log and mem.log(streams[0])[:-1] == log[:-1]


def test_to_dict_from_dict_round_trip():
    mem = make_memory("cpu")
    streams, _ = run_streams(mem)
    for rec in mem.records(streams[1]):
        d = rec.to_dict()
        back = RetrievalRecord.from_dict(json.loads(json.dumps(d)))
        assert back == rec and back.to_dict() == d and list(back.to_dict()) == list(KEYS)
        assert back.materialised and not back.belongs_to(None)
        for twin in (pickle.loads(pickle.dumps(rec)), copy.deepcopy(rec), copy.copy(rec)):
            assert twin == rec and twin.materialised
    assert mem.records(streams[0])[-1] != mem.records(streams[1])[-1]


def bad(**changes):
    d = dict(block=2, query_frame=9, query_descriptor_frame=8, num_evicted=4, num_eligible=2, k_sel=2,
             timings_ms={"retrieve": 0.5}, selected_global_frames=[2, 1], selected_pool_indices=[1, 0],
             selected_similarities=[0.5, -0.25])
    d.update(changes)
    return {k: v for k, v in d.items() if v is not ...}


@pytest.mark.parametrize("d, error, match", [
    (bad(), None, None),
    ([1, 2], ValueError, "must be a mapping"),
    (bad(k_sel=...), ValueError, r"missing \['k_sel'\]"),
    (bad(extra=1), ValueError, r"unknown \['extra'\]"),
    (bad(block=True), TypeError, "field block must be an int"),
    (bad(num_eligible=2.0), TypeError, "field num_eligible must be an int"),
    (bad(k_sel=3), ValueError, "field selected_global_frames has 2 entries, k_sel is 3"),
    (bad(selected_global_frames=(2, "1")), TypeError, r"field selected_global_frames\[1\] must be an int"),
    (bad(selected_similarities=[0.5, None]), TypeError, r"field selected_similarities\[1\] must be a number"),
    (bad(selected_pool_indices="10"), TypeError, "field selected_pool_indices must be a list"),
    (bad(timings_ms=[0.5]), TypeError, "field timings_ms must map names"),
    (bad(timings_ms={"retrieve": "0.5"}), TypeError, r"field timings_ms\['retrieve'\] must be a number"),
])
def test_from_dict_refuses_what_to_dict_never_writes(d, error, match):
    if error is None:
        assert RetrievalRecord.from_dict(d).to_dict() == d
    else:
        with pytest.raises(error, match=match):
            RetrievalRecord.from_dict(d)


def test_records_cannot_be_changed_or_indexed():
    rec = RetrievalRecord.from_dict(bad())
    with pytest.raises(dataclasses.FrozenInstanceError, match="k_sel"):
        rec.k_sel = 3
    with pytest.raises(TypeError):
        rec.timings_ms["gather"] = 1.0
    with pytest.raises(AttributeError):
        rec.selected_global_frames = (1,)
    assert isinstance(rec.selected_global_frames, tuple)
    with pytest.raises(TypeError, match=r"not a mapping.*record\.k_sel.*to_dict\(\)\['k_sel'\]"):
        rec["k_sel"]
    with pytest.raises(TypeError, match=r"not a mapping: use its attributes or record\.to_dict\(\)"):
        rec[0]
    with pytest.raises(TypeError, match="not iterable"):
        list(rec)
    with pytest.raises(TypeError, match="from_dict"):
        RetrievalRecord(block=0, query_frame=3, query_descriptor_frame=2, num_evicted=0, num_eligible=0, k_sel=0,
                        timings_ms={})
    with pytest.raises(TypeError, match="unhashable"):
        hash(rec)
    assert lrag_ext.RetrievalRecord is RetrievalRecord


# --- gather timings -------------------------------------------------------------------------------------------------

def test_gather_times_the_record_of_its_plan():
    mem = make_memory("cpu")
    streams, _ = run_streams(mem, blocks=4)
    L, T, H, Dh = LAYOUT.frame_shape
    dst = torch.zeros(L, len(streams), SINK + TOP_K, T, H, Dh)
    plan = mem.retrieve(streams)
    before = mem.log(streams[0], -1)[0]  # read before the gather: the record still knows its plan
    mem.gather(plan, dst, dst.clone())
    for s in streams:
        assert set(mem.records(s, -1)[0].timings_ms) == {"retrieve", "gather"}
    assert set(before["timings_ms"]) == {"retrieve"}
    mem.retrieve(streams)
    mem.gather(plan, dst, dst.clone())  # an older plan: the newest records are not its own
    assert all(set(mem.records(s, -1)[0].timings_ms) == {"retrieve"} for s in streams)


# --- save / load ------------------------------------------------------------------------------------------------------

def test_save_load_preserves_the_log(tmp_path):
    mem = make_memory("cpu")
    streams, _ = run_streams(mem)
    L, T, H, Dh = LAYOUT.frame_shape
    dst = torch.zeros(L, len(streams), SINK + TOP_K, T, H, Dh)
    mem.gather(mem.retrieve(streams), dst, dst.clone())
    mem.retrieve(streams)  # unread records are read for the save
    path = str(tmp_path / "mem")
    mem.save(path)
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    back = RetrievalMemory.load(path)
    for s in streams:
        saved = manifest["streams"][str(s)]["log"]
        assert saved == mem.log(s) and [list(rec) for rec in saved] == [list(KEYS)] * len(saved)
        assert back.log(s) == mem.log(s) and back.records(s) == mem.records(s)
    back.save(str(tmp_path / "again"))  # a loaded log is saved as it was loaded, to the byte
    again = json.load(open(os.path.join(tmp_path, "again", "manifest.json")))
    for s in streams:
        assert json.dumps(again["streams"][str(s)]["log"]) == json.dumps(manifest["streams"][str(s)]["log"])


def rewrite(path, manifest, version):
    manifest["version"] = version
    manifest.pop("manifest_sha256", None)
    if version >= 2:
        from lrag_ext import memory_format  # noqa: PLC0415
        manifest["manifest_sha256"] = memory_format.manifest_digest(manifest)
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("edit, match", [
    (None, None),
    (lambda log: log[1].pop("timings_ms"), r"log\[1\] is invalid: .*missing \['timings_ms'\]"),
    (lambda log: log[3].update(k_sel=True), r"log\[3\] is invalid: .*field k_sel must be an int"),
    (lambda log: log[4]["selected_global_frames"].pop(), r"log\[4\] is invalid: .*has 2 entries, k_sel is 3"),
    (lambda log: log.append("record"), r"log\[7\] is invalid: .*must be a mapping"),
])
def test_saved_logs_load_or_are_refused_by_field(tmp_path, version, edit, match):
    """Both readable versions: an untouched log loads exactly; an edited one (re-checksummed) is refused naming the
    record."""
    mem = make_memory("cpu")
    streams, _ = run_streams(mem)
    path = str(tmp_path / "mem")
    mem.save(path)
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    if edit is not None:
        edit(manifest["streams"]["1"]["log"])
    rewrite(path, manifest, version)
    if match is None:
        back = RetrievalMemory.load(path)
        assert [back.log(s) for s in streams] == [mem.log(s) for s in streams]
    else:
        with pytest.raises(ValueError, match=r"manifest\.json: field streams\['1'\]\." + match):
            RetrievalMemory.load(path)
