"""RetrievalMemory: the official trace, brute-force equivalence across tiers, save/restore, threads, errors."""
from __future__ import annotations

import json
import os
import random
import threading

import pytest
import torch
from safetensors.torch import load_file

import lrag_ext
from lrag_ext import reference
from lrag_ext.memory import KVLayout, MemoryConfig, RetrievalMemory

from conftest import fixture_path
from memory_state import assert_unchanged, snapshot

LAYOUT = KVLayout(num_layers=2, tokens_per_frame=3, num_heads=2, head_dim=8)


def kv_config(device="cpu", **kw) -> MemoryConfig:
    base = dict(top_k=3, recent_exclude=2, sink_frames=1, window_frames=5, embed_dim=6, storage="kv",
                kv_layout=LAYOUT, device=device, dtype=torch.float32, max_frames=512, page_size=4,
                device_frames=4, host_frames=None)
    base.update(kw)
    return MemoryConfig(**base)


# --- the official trace ---------------------------------------------------------------------------------------

def test_reproduces_official_trace_and_log(device):
    with open(fixture_path("retrieval_trace.json")) as f:
        trace = json.load(f)
    desc = load_file(fixture_path("retrieval_descriptors.safetensors"))["descriptors"].to(device)
    kw = trace["resolved_config"]["model_kwargs"]
    mem = RetrievalMemory(MemoryConfig(top_k=kw["memory_size"], recent_exclude=kw["recent_exclude"],
                                       sink_frames=kw["sink_size"], window_frames=kw["local_attn_size"],
                                       embed_dim=desc.shape[1], storage="embedding", device=device, page_size=5))
    s = mem.add_stream()
    per_block = trace["num_frame_per_block"]
    for block in trace["blocks"]:
        start = block["start_frame"]
        if start > 0:
            mem.retrieve(s)
        mem.append(s, desc[start:start + per_block])
    log = mem.log(s)
    assert len(log) == len(trace["blocks"]) - 1
    for rec, block in zip(log, trace["blocks"][1:]):
        assert rec["query_frame"] == block["start_frame"]
        assert rec["num_evicted"] == block["pool_size_at_block_start"]
        assert rec["num_eligible"] == block["num_eligible"]
        want = block["retrieval"]
        if want is None:
            assert rec["k_sel"] == 0 and rec["selected_global_frames"] == []
            continue
        for key in ("query_descriptor_frame", "k_sel", "selected_pool_indices", "selected_global_frames"):
            assert rec[key] == want[key], (block["block"], key)
        assert rec["selected_similarities"] == pytest.approx(want["selected_similarities"], abs=1e-6)
        assert set(rec["timings_ms"]) == {"retrieve"}


# --- brute-force oracle ------------------------------------------------------------------------------------------

class Oracle:
    """Everything the memory was given, kept in plain Python: the independent answer to retrieve and gather."""

    def __init__(self, config: MemoryConfig):
        self.cfg = config
        self.emb: dict[int, list[torch.Tensor]] = {}
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def append(self, s, emb, k, v):
        self.emb.setdefault(s, []).extend(emb.cpu())
        self.kv.setdefault(s, []).extend((k[:, i].cpu(), v[:, i].cpu()) for i in range(emb.shape[0]))

    def eligible(self, s, first_retrievable=0):
        n = len(self.emb.get(s, []))
        lo, hi = self.cfg.policy.eligible_range(n)
        lo = max(lo, first_retrievable)
        return list(range(lo, max(lo, hi)))

    def retrieve(self, s, first_retrievable=0):
        emb = self.emb[s]
        q = emb[-1].double()
        rows = []
        for i in self.eligible(s, first_retrievable):
            e = emb[i].double()
            rows.append((-float(q @ e / ((q.norm() + 1e-8) * (e.norm() + 1e-8))), i))
        rows.sort()
        return [i for _, i in rows[:self.cfg.top_k]]


def random_block(g, cfg, n):
    L, T, H, Dh = cfg.kv_layout.frame_shape
    return (torch.randn(n, cfg.embed_dim, generator=g), torch.randn(L, n, T, H, Dh, generator=g),
            torch.randn(L, n, T, H, Dh, generator=g))


def first_retrievable(mem, s):
    return mem._streams[s].first_retrievable


@pytest.mark.parametrize("device_frames, host_frames", [(64, None), (4, None), (3, 6), (0, 10), (2, 0)])
def test_matches_brute_force_across_tiers(device, device_frames, host_frames):
    cfg = kv_config(device, device_frames=device_frames, host_frames=host_frames)
    mem, oracle = RetrievalMemory(cfg), Oracle(cfg)
    g = torch.Generator().manual_seed(device_frames * 7 + (host_frames or 0))
    streams = [mem.add_stream() for _ in range(3)]
    cache = cfg.sink_frames + cfg.top_k + 2
    for step in range(12):
        for s in streams:
            if mem.num_frames(s) > 0:
                plan = mem.retrieve(s)
                want = oracle.retrieve(s, first_retrievable(mem, s))
                got = plan.ids[0, :plan.counts[0]].tolist()
                assert got == want, (step, s)
                # Gather: cache slots sink..sink+k-1 get the selected frames; positions "sink" = plain copy.
                L, T, H, Dh = LAYOUT.frame_shape
                dst_k = torch.zeros(L, 1, cache, T, H, Dh, device=device)
                dst_v = torch.zeros_like(dst_k)
                mem.gather(plan, dst_k, dst_v)
                for j, frame in enumerate(got):
                    k_ref, v_ref = oracle.kv[s][frame]
                    assert torch.equal(dst_k[:, 0, cfg.sink_frames + j].cpu(), k_ref), (step, s, frame)
                    assert torch.equal(dst_v[:, 0, cfg.sink_frames + j].cpu(), v_ref)
                untouched = [f for f in range(cache) if not cfg.sink_frames <= f < cfg.sink_frames + len(got)]
                assert (dst_k[:, 0, untouched] == 0).all()
            n = random.Random(step * 10 + s).randint(1, 3)
            emb, k, v = random_block(g, cfg, n)
            mem.append(s, emb.to(device), k=k.to(device), v=v.to(device))
            oracle.append(s, emb, k, v)
    # Tier accounting: every stored frame holds exactly one slot, no slot is shared.
    codes = [c for s in streams for c in mem._streams[s].kv_code if c >= 0]
    assert len(codes) == len(set(codes))
    used = sum(seg.allocator.num_slots - seg.allocator.num_free for seg in mem._segments())
    assert used == len(codes)
    if host_frames is not None:
        assert sum(seg.allocator.num_slots for seg in mem._segments()[1:]) <= host_frames


def fp8_round_trip(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a float8 pool gives back for one frame's K, V ``[layers, T, H, d]``: the reference write + gather."""
    pool = lrag_ext.kv_pool_empty(1, *LAYOUT.frame_shape, dtype=torch.float8_e4m3fn)
    scale = lrag_ext.kv_pool_scale_empty(pool)
    reference.write_kv(pool, k[:, None], v[:, None], torch.tensor([0]), pool_scale=scale)
    dst_k = torch.zeros(LAYOUT.num_layers, 1, 1, *LAYOUT.frame_shape[1:])
    dst_v = torch.zeros_like(dst_k)
    reference.gather_kv(pool, torch.tensor([[0]]), dst_k, dst_v, torch.tensor([[0]]), torch.tensor([[0]]),
                        reference.wan_temporal_pairs(LAYOUT.head_dim), pool_scale=scale)
    return dst_k[:, 0, 0], dst_v[:, 0, 0]


@pytest.mark.parametrize("device_frames, host_frames", [(64, None), (2, None)])
def test_float8_storage_gathers_what_the_reference_quantises(device, device_frames, host_frames):
    cfg = kv_config(device, dtype=torch.float8_e4m3fn, device_frames=device_frames, host_frames=host_frames)
    mem, oracle = RetrievalMemory(cfg), Oracle(cfg)
    g = torch.Generator().manual_seed(11)
    s = mem.add_stream()
    for _ in range(8):
        emb, k, v = random_block(g, cfg, 2)
        mem.append(s, emb.to(device), k=k.to(device), v=v.to(device))
        oracle.append(s, emb, k, v)
    plan = mem.retrieve(s)
    got = plan.ids[0, :plan.counts[0]].tolist()
    assert got == oracle.retrieve(s) and len(got) == cfg.top_k
    L, T, H, Dh = LAYOUT.frame_shape
    dst_k = torch.zeros(L, 1, 8, T, H, Dh, device=device)
    dst_v = torch.zeros_like(dst_k)
    mem.gather(plan, dst_k, dst_v)
    for j, frame in enumerate(got):
        want_k, want_v = fp8_round_trip(*oracle.kv[s][frame])
        assert torch.equal(dst_k[:, 0, 1 + j].cpu(), want_k) and torch.equal(dst_v[:, 0, 1 + j].cpu(), want_v)
        assert not torch.equal(want_k, oracle.kv[s][frame][0])   # it really was quantised


def test_several_streams_in_one_call_match_single_calls(device):
    cfg = kv_config(device)
    mem = RetrievalMemory(cfg)
    g = torch.Generator().manual_seed(5)
    streams = [mem.add_stream() for _ in range(4)]
    for s in streams:
        for _ in range(5 + s):
            emb, k, v = random_block(g, cfg, 2)
            mem.append(s, emb.to(device), k=k.to(device), v=v.to(device))
    joint = mem.retrieve(streams)
    for b, s in enumerate(streams):
        single = mem.retrieve([s])
        assert torch.equal(joint.ids[b], single.ids[0]) and torch.equal(joint.scores[b], single.scores[0])


def test_positions_rotate_k_like_reference(device):
    cfg = kv_config(device, top_k=2, recent_exclude=0, window_frames=3)
    mem = RetrievalMemory(cfg)
    g = torch.Generator().manual_seed(1)
    s = mem.add_stream()
    emb, k, v = random_block(g, cfg, 8)
    mem.append(s, emb.to(device), k=k.to(device), v=v.to(device))
    plan = mem.retrieve(s)
    assert plan.counts == [2]
    ids = plan.ids[0].tolist()
    L, T, H, Dh = LAYOUT.frame_shape
    ordered = [1 + sorted(ids).index(i) for i in ids]  # by frame id, ending just before the local window (1 + 2)
    for positions, want_pos in [("ordered", ordered), (torch.tensor([[5, 9]], device=device), [5, 9]),
                                ("absolute", ids), (3, [3, 3]), ("sink", [0, 0])]:
        dst_k = torch.zeros(L, 1, 4, T, H, Dh, device=device)
        dst_v = torch.zeros_like(dst_k)
        mem.gather(plan, dst_k, dst_v, positions=positions)
        for j, frame in enumerate(ids):
            rotated = reference.rope_rotate_temporal(k[:, frame], torch.tensor(want_pos[j]),
                                                     reference.wan_temporal_pairs(Dh)).float()
            torch.testing.assert_close(dst_k[:, 0, 1 + j].cpu(), rotated, atol=1e-5, rtol=1e-5)
            assert torch.equal(dst_v[:, 0, 1 + j].cpu(), v[:, frame])


def test_latent_mode_returns_selected_latents(device):
    cfg = MemoryConfig(top_k=3, recent_exclude=0, sink_frames=1, window_frames=3, embed_dim=5, storage="latent",
                       latent_shape=(2, 3, 4), device=device, dtype=torch.float32, page_size=3)
    mem = RetrievalMemory(cfg)
    s = mem.add_stream()
    emb, lat = torch.randn(9, 5), torch.randn(9, 2, 3, 4)
    mem.append(s, emb.to(device), latents=lat.to(device))
    plan = mem.retrieve(s)
    out = mem.latents(plan)
    assert out.shape == (1, 3, 2, 3, 4)
    for j, frame in enumerate(plan.ids[0].tolist()):
        assert torch.equal(out[0, j].cpu(), lat[frame])
    assert torch.equal(mem.latents(plan), out)  # deterministic


def test_reset_and_remove_free_everything():
    cfg = kv_config(device_frames=3)
    mem = RetrievalMemory(cfg)
    g = torch.Generator().manual_seed(2)
    a, b = mem.add_stream(), mem.add_stream()
    for s in (a, b):
        emb, k, v = random_block(g, cfg, 9)
        mem.append(s, emb, k=k, v=v)
    mem.reset(a)
    assert mem.num_frames(a) == 0 and mem.log(a) == []
    mem.remove_stream(b)
    assert mem.streams() == [a]
    assert mem._page_alloc.num_free == mem._page_alloc.num_slots
    assert all(seg.allocator.num_free == seg.allocator.num_slots for seg in mem._segments())
    with pytest.raises(KeyError, match="unknown stream 1"):
        mem.num_frames(b)


@pytest.mark.parametrize("device_frames, host_frames", [(4, None), (2, 3), (0, None)])
def test_forget_before_frees_and_excludes_the_older_frames(tmp_path, device_frames, host_frames):
    cfg = kv_config(device_frames=device_frames, host_frames=host_frames, recent_exclude=0, top_k=4)
    mem = RetrievalMemory(cfg)
    g = torch.Generator().manual_seed(5)
    a, b = mem.add_stream(), mem.add_stream()
    for s in (a, b):
        for _ in range(4):
            emb, k, v = random_block(g, cfg, 3)
            mem.append(s, emb, k=k, v=v)
    b_before = mem.retrieve(b).ids[0].tolist()
    free = sum(seg.allocator.num_free for seg in mem._segments())
    stored = [f for f in range(7) if mem._code_of(a, f) >= 0]
    mem.forget_before(a, 7)
    assert all(mem._code_of(a, f) == -1 for f in range(7))
    assert sum(seg.allocator.num_free for seg in mem._segments()) == free + len(stored)     # their slots freed
    assert all(x[0] != a or x[1] >= 7 for q in mem._queues().values() for x in q)
    ids = mem.retrieve([a, b]).ids
    assert all(f < 0 or f >= 7 for f in ids[0].tolist())          # stream a: only frames >= 7 (if any eligible)
    assert ids[1].tolist() == b_before                             # stream b untouched
    mem.forget_before(a, 2)                                        # permanent: a smaller frame changes nothing
    assert mem.retrieve(a).ids[0].tolist() == ids[0].tolist()
    # still consistent for save / load, and for more appends
    mem.save(str(tmp_path / "m"))
    back = RetrievalMemory.load(str(tmp_path / "m"))
    assert torch.equal(back.retrieve(a).ids, mem.retrieve(a).ids)
    for m in (mem, back):
        emb, k, v = random_block(torch.Generator().manual_seed(6), cfg, 3)
        m.append(a, emb, k=k, v=v)
    assert torch.equal(back.retrieve(a).ids, mem.retrieve(a).ids)


def test_a_latent_plan_from_before_forget_before_is_stale():
    cfg = kv_config(storage="latent", kv_layout=None, latent_shape=(2, 3, 3), recent_exclude=0)
    mem = RetrievalMemory(cfg)
    g = torch.Generator().manual_seed(8)
    s = mem.add_stream()
    mem.append(s, torch.randn(12, cfg.embed_dim, generator=g), latents=torch.randn(12, 2, 3, 3, generator=g))
    plan = mem.retrieve(s)
    assert int(plan.ids[0, 0]) >= 1
    mem.forget_before(s, 12)
    with pytest.raises(ValueError, match="plan is stale: .* or were forgotten"):
        mem.latents(plan)
    assert (mem.retrieve(s).ids < 0).all()


# --- save / restore --------------------------------------------------------------------------------------------

def filled_memory(device="cpu", dtype=torch.float32):
    cfg = kv_config(device, device_frames=3, host_frames=None, dtype=dtype)
    mem = RetrievalMemory(cfg)
    g = torch.Generator().manual_seed(9)
    for _ in range(2):
        s = mem.add_stream()
        for _ in range(6):
            emb, k, v = random_block(g, cfg, 3)
            mem.append(s, emb.to(device), k=k.to(device), v=v.to(device))
            mem.retrieve(s)
    return mem


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_save_load_round_trip(tmp_path, device, dtype):
    mem = filled_memory(device, dtype)
    path = str(tmp_path / "mem")
    mem.save(path)
    assert sorted(os.listdir(path)) == ["manifest.json", "tensors.safetensors"]
    back = RetrievalMemory.load(path)
    assert back.streams() == mem.streams() and back.config == mem.config
    L, T, H, Dh = LAYOUT.frame_shape
    for s in mem.streams():
        assert back.log(s) == mem.log(s)
        p1, p2 = mem.retrieve(s), back.retrieve(s)
        assert torch.equal(p1.ids, p2.ids) and torch.equal(p1.scores, p2.scores)
        outs = []
        for m, p in ((mem, p1), (back, p2)):
            dk = torch.zeros(L, 1, 6, T, H, Dh, device=device)
            dv = torch.zeros_like(dk)
            m.gather(p, dk, dv, positions="ordered")
            outs.append((dk, dv))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    # appending continues identically after a restore
    g = torch.Generator().manual_seed(4)
    emb, k, v = random_block(g, mem.config, 2)
    for m in (mem, back):
        m.append(0, emb.to(device), k=k.to(device), v=v.to(device))
    assert torch.equal(mem.retrieve(0).ids, back.retrieve(0).ids)


def test_save_refuses_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    with pytest.raises(FileExistsError, match="exists and is not an empty folder"):
        filled_memory().save(str(tmp_path / "x"))


@pytest.mark.parametrize("damage, match", [
    ("truncate", "truncated or altered"),
    ("flip", "does not match its SHA-256"),
    ("manifest", "not valid JSON"),
    ("missing", "is missing"),
    ("version", "unsupported format"),
])
def test_corrupted_save_is_refused(tmp_path, damage, match):
    path = str(tmp_path / "mem")
    filled_memory().save(path)
    tensors, manifest = os.path.join(path, "tensors.safetensors"), os.path.join(path, "manifest.json")
    if damage == "truncate":
        with open(tensors, "r+b") as f:
            f.truncate(os.path.getsize(tensors) - 7)
    elif damage == "flip":
        with open(tensors, "r+b") as f:
            f.seek(os.path.getsize(tensors) - 3)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "manifest":
        with open(manifest, "r+") as f:
            f.truncate(100)
    elif damage == "missing":
        os.remove(tensors)
    elif damage == "version":
        data = json.load(open(manifest))
        data["version"] = 99
        json.dump(data, open(manifest, "w"))
    with pytest.raises(ValueError, match=match):
        RetrievalMemory.load(path)


# --- threads ----------------------------------------------------------------------------------------------------

def test_threads_never_lose_or_share_a_slot():
    cfg = kv_config(device_frames=8, host_frames=40, max_frames=2048)
    mem = RetrievalMemory(cfg)
    errors = []

    def worker(seed):
        try:
            rng = random.Random(seed)
            g = torch.Generator().manual_seed(seed)
            s = mem.add_stream()
            for step in range(40):
                emb, k, v = random_block(g, cfg, rng.randint(1, 3))
                mem.append(s, emb, k=k, v=v)
                mem.retrieve(s)
                if rng.random() < 0.1:
                    mem.reset(s)
                if rng.random() < 0.05:
                    mem.remove_stream(s)
                    s = mem.add_stream()
        except Exception as err:  # noqa: BLE001 - surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    streams = mem.streams()
    pages = [p for s in streams for p in mem._streams[s].pages]
    assert len(pages) == len(set(pages))
    assert mem._page_alloc.num_slots - mem._page_alloc.num_free == len(pages)
    codes = [c for s in streams for c in mem._streams[s].kv_code if c >= 0]
    assert len(codes) == len(set(codes))
    assert sum(seg.allocator.num_slots - seg.allocator.num_free for seg in mem._segments()) == len(codes)
    fifo = [x for q in mem._queues().values() for x in q]
    assert sorted(fifo) == sorted((s, f) for s in streams for f, c in enumerate(mem._streams[s].kv_code) if c >= 0)


# --- errors leave the memory unchanged ---------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, match", [
    (lambda m, e, k, v, plan: m.append(7, e, k=k, v=v), KeyError, "unknown stream 7"),
    (lambda m, e, k, v, plan: m.append(0, e[:, :5], k=k, v=v), ValueError, r"embeddings must have shape \[2, 6\]"),
    (lambda m, e, k, v, plan: m.append(0, e.long(), k=k, v=v), ValueError, "embeddings must be a floating-point tensor"),
    (lambda m, e, k, v, plan: m.append(0, e.to("meta"), k=k, v=v), ValueError, "embeddings must be on cpu"),
    (lambda m, e, k, v, plan: m.append(0, e, k=k[:, :, :2], v=v), ValueError, r"k must have shape \[2, 2, 3, 2, 8\]"),
    (lambda m, e, k, v, plan: m.append(0, e, k=k), ValueError, "storage='kv' needs k and v"),
    (lambda m, e, k, v, plan: m.append(0, e, k=k, v=v, latents=e), ValueError, "latents given but storage='kv'"),
    (lambda m, e, k, v, plan: m.append(0, e[:0], k=k, v=v), ValueError, "at least one frame"),
    # float64 K/V passed the shape checks and failed inside write_kv after the slots were taken (issue 11)
    (lambda m, e, k, v, plan: m.append(0, e, k=k.double(), v=v.double()), ValueError,
     "k and v must have one dtype among float32, float16, bfloat16"),
    (lambda m, e, k, v, plan: m.append(0, e, k=k, v=v.half()), ValueError, "got torch.float32 and torch.float16"),
    (lambda m, e, k, v, plan: m.append(True, e, k=k, v=v), TypeError, "a stream id must be an int, got True"),
    (lambda m, e, k, v, plan: m.retrieve(True), TypeError, "a stream id must be an int, got True"),
    (lambda m, e, k, v, plan: m.gather(plan, k[:, None].double(), v[:, None].double(), dst_frame=plan.ids.clamp(min=0)),
     ValueError, "dst_k and dst_v must have one dtype"),
    (lambda m, e, k, v, plan: m.retrieve(1), ValueError, "stream 1 has no frames"),
    (lambda m, e, k, v, plan: m.retrieve([0, 0]), ValueError, "streams must be distinct"),
    (lambda m, e, k, v, plan: m.retrieve([]), ValueError, "at least one stream"),
    (lambda m, e, k, v, plan: m.retrieve(0, queries=e), ValueError, r"queries must have shape \[1, 6\]"),
    (lambda m, e, k, v, plan: m.gather("plan", k, v), TypeError, "plan must be a RetrievalPlan"),
    (lambda m, e, k, v, plan: m.latents(plan), ValueError, "latents needs storage='latent'"),
    (lambda m, e, k, v, plan: m.forget_before(0, 3), ValueError, r"frame must be in \[0, num_frames=2\]"),
    (lambda m, e, k, v, plan: m.forget_before(0, -1), ValueError, "frame must be in"),
    (lambda m, e, k, v, plan: m.forget_before(0, 1.0), TypeError, "frame must be an int"),
    (lambda m, e, k, v, plan: m.forget_before(7, 1), KeyError, "unknown stream 7"),
])
def test_bad_calls_raise_and_change_nothing(call, error, match):
    cfg = kv_config()
    mem = RetrievalMemory(cfg)
    g = torch.Generator().manual_seed(0)
    mem.add_stream()
    mem.add_stream()
    emb, k, v = random_block(g, cfg, 2)
    mem.append(0, emb, k=k, v=v)
    plan = mem.retrieve(0)
    before = snapshot(mem)
    with pytest.raises(error, match=match):
        call(mem, emb, k, v, plan)
    assert_unchanged(before, mem)


def test_gather_shape_errors():
    cfg = kv_config()
    mem = RetrievalMemory(cfg)
    g = torch.Generator().manual_seed(0)
    s = mem.add_stream()
    emb, k, v = random_block(g, cfg, 9)
    mem.append(s, emb, k=k, v=v)
    plan = mem.retrieve(s)
    good = torch.zeros(2, 1, 6, 3, 2, 8)
    with pytest.raises(ValueError, match=r"dst_k must be \[num_layers=2, B=1, cache_frames, 3, 2, 8\]"):
        mem.gather(plan, torch.zeros(2, 1, 6, 3, 2, 4), good)
    with pytest.raises(ValueError, match="too few for sink 1 \\+ top_k 3"):
        mem.gather(plan, good[:, :, :3], good[:, :, :3])
    with pytest.raises(ValueError, match="positions must be an int >= 0, one of 'sink', 'ordered', 'absolute'"):
        mem.gather(plan, good, good.clone(), positions="sideways")
    with pytest.raises(ValueError, match=r"dst_frame must have shape \[1, 3\]"):
        mem.gather(plan, good, good.clone(), dst_frame=torch.zeros(1, 2, dtype=torch.int64))


def test_memory_full_error_names_the_limit():
    cfg = kv_config(max_frames=8, page_size=4)
    mem = RetrievalMemory(cfg)
    g = torch.Generator().manual_seed(0)
    s = mem.add_stream()
    emb, k, v = random_block(g, cfg, 8)
    mem.append(s, emb, k=k, v=v)
    before = snapshot(mem)
    emb, k, v = random_block(g, cfg, 1)
    with pytest.raises(ValueError, match=r"memory is full: appending 1 frames to stream 0 needs 1 more embedding "
                                         r"pages but 0 are free \(raise MemoryConfig.max_frames=8\)"):
        mem.append(s, emb, k=k, v=v)
    assert_unchanged(before, mem)


# --- plans carry their identity ------------------------------------------------------------------------------------

def cache_for(cfg, B=1):
    L, T, H, Dh = cfg.kv_layout.frame_shape
    k = torch.zeros(L, B, cfg.sink_frames + cfg.top_k, T, H, Dh)
    return k, k.clone()


def test_plan_of_another_memory_or_before_reset_is_refused():
    cfg = kv_config()
    g = torch.Generator().manual_seed(1)
    a, b = RetrievalMemory(cfg), RetrievalMemory(cfg)
    for m in (a, b):
        s = m.add_stream()
        emb, k, v = random_block(g, cfg, 12)
        m.append(s, emb, k=k, v=v)
    plan = a.retrieve(0)
    before = snapshot(b)
    with pytest.raises(ValueError, match="plan was made by another RetrievalMemory"):
        b.gather(plan, *cache_for(cfg))
    assert_unchanged(before, b)
    a.reset(0)
    emb, k, v = random_block(g, cfg, 12)
    a.append(0, emb, k=k, v=v)
    before = snapshot(a)
    with pytest.raises(ValueError, match="plan is stale: stream 0 was reset or removed after retrieve"):
        a.gather(plan, *cache_for(cfg))
    assert_unchanged(before, a)


def test_plan_from_before_save_load_is_refused(tmp_path):
    mem = filled_memory()
    plan = mem.retrieve(0)
    mem.save(str(tmp_path / "m"))
    back = RetrievalMemory.load(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="another RetrievalMemory"):
        back.gather(plan, *cache_for(mem.config))
    mem.gather(plan, *cache_for(mem.config))  # still valid for the memory that made it


def test_latent_plans_are_checked_too():
    cfg = MemoryConfig(top_k=2, recent_exclude=0, sink_frames=1, window_frames=3, embed_dim=4, storage="latent",
                       latent_shape=(1, 2, 2), dtype=torch.float32, max_frames=64, page_size=4)
    mem = RetrievalMemory(cfg)
    s = mem.add_stream()
    mem.append(s, torch.randn(8, 4), latents=torch.randn(8, 1, 2, 2))
    plan = mem.retrieve(s)
    assert mem.latents(plan).shape == (1, 2, 1, 2, 2)
    mem.reset(s)
    with pytest.raises(ValueError, match="plan is stale"):
        mem.latents(plan)


def test_frame_dropped_between_retrieve_and_gather_invalidates_the_plan():
    """Another stream's append fills the host tier and drops frames this plan may have selected: the cache slot
    would keep stale data while plan.counts says it was filled, so gather refuses the plan (issue 11)."""
    cfg = kv_config(device_frames=2, host_frames=8)
    mem = RetrievalMemory(cfg)
    g = torch.Generator().manual_seed(2)
    a, b = mem.add_stream(), mem.add_stream()
    emb, k, v = random_block(g, cfg, 10)
    mem.append(a, emb, k=k, v=v)
    plan = mem.retrieve(a)
    assert plan.counts == [3] and first_retrievable(mem, a) == 0
    emb, k, v = random_block(g, cfg, 4)
    mem.append(b, emb, k=k, v=v)  # 9 stored + 3 new > 10 slots: a's oldest frames are dropped
    assert first_retrievable(mem, a) > plan.ids[0].min().item()
    before = snapshot(mem)
    with pytest.raises(ValueError, match="plan is stale: frames of stream 0 .* lost their K/V"):
        mem.gather(plan, *cache_for(cfg))
    assert_unchanged(before, mem)
    mem.gather(mem.retrieve(a), *cache_for(cfg))  # a new plan works


def test_oldest_frames_are_dropped_first_when_a_block_overflows_the_device_tier():
    """Frames a block sends straight to the host tier are newer than the device frames it displaces: the queues
    stay in age order, so a stream's dropped frames are always its oldest (what plan invalidation relies on)."""
    cfg = kv_config(device_frames=2, host_frames=3, window_frames=3, recent_exclude=0, sink_frames=0)
    mem = RetrievalMemory(cfg)
    g = torch.Generator().manual_seed(3)
    s = mem.add_stream()
    for n in (2, 3, 1):
        emb, k, v = random_block(g, cfg, n)
        mem.append(s, emb, k=k, v=v)
    stored = [f for f, c in enumerate(mem._streams[s].kv_code) if c >= 0]
    assert stored == [1, 2, 3, 4, 5] and first_retrievable(mem, s) == 1


@pytest.mark.parametrize("bad", ["outside", "repeated_across_segments"])
def test_gather_checks_destinations_across_segments_before_writing(bad):
    """gather issues one gather_kv per segment and each sees only its own entries: a bad destination of a frame in
    the second segment was found after the first segment had been written, and a destination repeated across two
    segments was not found at all (last writer won) (issue 11)."""
    cfg = kv_config(device_frames=8, top_k=3)
    mem = RetrievalMemory(cfg)
    g = torch.Generator().manual_seed(5)
    s = mem.add_stream()
    emb, k, v = random_block(g, cfg, 14)
    emb[:, 0] = 0
    emb[5:7] = torch.tensor([1.0, 0, 0, 0, 0, 0])  # the query's two exact matches: frame 5 (host), frame 6 (device)
    mem.append(s, emb, k=k, v=v)
    plan = mem.retrieve(s, queries=emb[5:6])
    assert plan.ids[0, :2].tolist() == [5, 6]
    assert [mem._streams[s].kv_code[f] >> 32 for f in (5, 6)] == [1, 0]
    dst_k, dst_v = cache_for(cfg)
    # rank 0 (host segment, gathered second) goes outside the cache, or to rank 1's frame (device segment)
    dst_frame = torch.tensor([[9, 2, 3]]) if bad == "outside" else torch.tensor([[2, 2, 3]])
    before_k, before = dst_k.clone(), snapshot(mem)
    with pytest.raises(ValueError, match=r"dst_frame\[0.*(outside the cache|twice)"):
        mem.gather(plan, dst_k, dst_v, dst_frame=dst_frame)
    assert torch.equal(dst_k, before_k) and (dst_v == 0).all()
    assert_unchanged(before, mem)


def test_pageable_host_tier_on_a_gpu_is_refused_at_configuration():
    with pytest.raises(ValueError, match="pin_host=False on a CUDA device needs host_frames=0"):
        kv_config(device="cuda", pin_host=False)
    kv_config(device="cuda", pin_host=False, host_frames=0)
    with pytest.raises(ValueError, match="device must be a torch device"):
        kv_config(device="bogus")


@pytest.mark.parametrize("kwargs, match", [
    (dict(storage="disk"), "storage must be one of"),
    (dict(storage="kv", kv_layout=(2, 3, 2, 8)), "storage='kv' needs kv_layout"),
    (dict(storage="latent", latent_shape=(2, 3)), "storage='latent' needs latent_shape"),
    (dict(embed_dim=0), "embed_dim must be an int >= 1"),
    (dict(page_size=0), "page_size must be an int >= 1"),
    (dict(host_frames=-1), "host_frames must be None or an int >= 0"),
    (dict(dtype=torch.int8), "dtype must be float32, float16, bfloat16 or float8_e4m3fn"),
    (dict(storage="latent", latent_shape=(1, 2, 2), dtype=torch.float8_e4m3fn), "a K/V storage option"),
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(device_frames=0, host_frames=0), "needs device_frames \\+ host_frames >= 1"),
])
def test_config_errors(kwargs, match):
    base = dict(storage="kv", kv_layout=LAYOUT, embed_dim=6)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MemoryConfig(**base)


@pytest.mark.parametrize("kwargs, match", [
    (dict(storage="kv", kv_layout=None), "storage='kv' needs kv_layout"),
    (dict(storage="latent", latent_shape=None), "storage='latent' needs latent_shape"),
])
def test_a_memory_needs_the_geometry_of_its_storage(kwargs, match):
    cfg = MemoryConfig(**{**dict(storage="kv", kv_layout=LAYOUT, embed_dim=6), **kwargs})  # a config may leave it
    with pytest.raises(ValueError, match=match):
        RetrievalMemory(cfg)


def test_kv_layout_errors():
    with pytest.raises(ValueError, match="KVLayout.head_dim must be even"):
        KVLayout(num_layers=1, tokens_per_frame=1, num_heads=1, head_dim=3)
    with pytest.raises(ValueError, match="KVLayout.num_layers must be an int >= 1"):
        KVLayout(num_layers=0, tokens_per_frame=1, num_heads=1, head_dim=2)


# --- found in review ------------------------------------------------------------------------------------------------

def test_stream_ids_are_converted_once_at_entry():
    """0-d tensors hash by identity: [tensor(0), tensor(0)] passed the distinct check and the call changed the
    memory before failing. Ids are now plain ints from the first line of every method."""
    cfg = kv_config()
    mem = RetrievalMemory(cfg)
    g = torch.Generator().manual_seed(0)
    s = mem.add_stream()
    emb, k, v = random_block(g, cfg, 2)
    before = snapshot(mem)
    with pytest.raises(ValueError, match="distinct"):
        mem.append([torch.tensor(0), torch.tensor(0)], emb[None].expand(2, -1, -1), k=k[:, None].expand(-1, 2, -1, -1, -1, -1),
                   v=v[:, None].expand(-1, 2, -1, -1, -1, -1))
    assert_unchanged(before, mem)
    mem.append(torch.tensor(s), emb, k=k, v=v)             # a 0-d tensor id is that int
    mem.append(torch.tensor([s]), emb[None], k=k[:, None], v=v[:, None])  # a 1-d tensor is a list of ids
    assert mem.num_frames(s) == 4 and mem.retrieve(torch.tensor(s)).streams == [s]
    with pytest.raises(TypeError, match="a stream id must be an int"):
        mem.retrieve([0.5])


def test_failed_host_growth_leaves_no_segment(monkeypatch):
    """The host tier is grown before the first mutation; if one of several new segments fails to allocate, none
    is added (the failed call changes nothing)."""
    from lrag_ext.memory_tiers import KVTiers

    cfg = kv_config(device_frames=2)
    mem = RetrievalMemory(cfg)
    g = torch.Generator().manual_seed(0)
    s = mem.add_stream()
    emb, k, v = random_block(g, cfg, 40)  # 39 stored frames: 37 to the host tier, three new segments
    real = KVTiers._new_segment
    calls = []

    def failing(self, slots, device, pin):
        calls.append(slots)
        if len(calls) == 2:
            raise RuntimeError("simulated out of memory")
        return real(self, slots, device, pin)

    monkeypatch.setattr(KVTiers, "_new_segment", failing)
    before = snapshot(mem)
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        mem.append(s, emb, k=k, v=v)
    assert_unchanged(before, mem)
    monkeypatch.setattr(KVTiers, "_new_segment", real)
    mem.append(s, emb, k=k, v=v)
    assert mem.num_frames(s) == 40
