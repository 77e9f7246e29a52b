"""RetrievalMemory as a state machine (hypothesis.stateful) against a brute-force model.

Random sequences of add_stream / append / retrieve / gather / reset / remove_stream / save+load, interleaved with
calls that must fail (bad dtypes, shapes, devices, ids, stale and foreign plans, a full memory). The model keeps every
frame in plain Python and implements the documented policy directly:

- a block starting at frame n may retrieve the frames of ``RetrievalPolicy.eligible_range(n)`` whose K/V are still
  stored, the top-k by cosine similarity with frame n - 1;
- K/V tiers hold at most ``device_frames + host_frames`` frames (sink frames are never stored); when more are stored,
  the oldest stored frames (append order, all streams together) are dropped first;
- a plan is refused after one of its streams is reset/removed, after a drop inside its eligible range, and by
  another memory (a loaded copy included).

Every failing call must leave the memory exactly as it was (``memory_state.snapshot``), and after every step the
slots, pages and queues must account for exactly the stored frames. Bounded by ``max_examples`` and the step count
so the whole file stays within a few tens of seconds; ``LRAG_FUZZ_EXAMPLES`` raises the budget for a campaign.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from lrag_ext.memory import KVLayout, MemoryConfig, RetrievalMemory

from conftest import cuda_code
from memory_state import assert_unchanged, snapshot

LAYOUT = KVLayout(num_layers=2, tokens_per_frame=2, num_heads=1, head_dim=2)
EXAMPLES = int(os.environ.get("LRAG_FUZZ_EXAMPLES", "50"))

# (device_frames, host_frames, max_frames, page_size): unbounded host, a small bounded host, device only, host only.
TIERS = [(4, None, 48, 4), (3, 5, 40, 3), (7, 0, 24, 5), (0, 6, 30, 4)]


class Model:
    """Everything the memory was given, and the policy applied by brute force."""

    def __init__(self, cfg: MemoryConfig):
        self.cfg = cfg
        self.limit = None if cfg.host_frames is None else cfg.device_frames + cfg.host_frames
        self.emb: dict[int, list[torch.Tensor]] = {}
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.dropped_below: dict[int, int] = {}
        self.stored: list[tuple[int, int]] = []  # (stream, frame) in append order
        self.next_stream = 0
        self.n_pages = -(-cfg.max_frames // cfg.page_size)

    def add_stream(self) -> int:
        s = self.next_stream
        self.next_stream += 1
        self.emb[s], self.kv[s], self.dropped_below[s] = [], [], 0
        return s

    def forget(self, s: int) -> None:
        self.emb[s], self.kv[s], self.dropped_below[s] = [], [], 0
        self.stored = [x for x in self.stored if x[0] != s]

    def pages_used(self) -> int:
        return sum(-(-len(e) // self.cfg.page_size) for e in self.emb.values())

    def fits(self, s: int, n: int) -> bool:
        ps = self.cfg.page_size
        extra = -(-(len(self.emb[s]) + n) // ps) - -(-len(self.emb[s]) // ps)
        return self.pages_used() + extra <= self.n_pages

    def append(self, s: int, emb, k, v) -> None:
        start = len(self.emb[s])
        self.emb[s].extend(emb)
        self.kv[s].extend((k[:, i], v[:, i]) for i in range(emb.shape[0]))
        self.stored += [(s, f) for f in range(start, start + emb.shape[0]) if f >= self.cfg.sink_frames]
        if self.limit is not None:
            while len(self.stored) > self.limit:
                ds, df = self.stored.pop(0)
                self.dropped_below[ds] = max(self.dropped_below[ds], df + 1)

    def eligible_lo_hi(self, s: int) -> tuple[int, int]:
        lo, hi = self.cfg.policy.eligible_range(len(self.emb[s]))
        lo = max(lo, self.dropped_below[s])
        return lo, max(lo, hi)

    def scores(self, s: int) -> dict[int, float]:
        q = self.emb[s][-1].double()
        lo, hi = self.eligible_lo_hi(s)
        return {i: float(q @ self.emb[s][i].double() / ((q.norm() + 1e-8) * (self.emb[s][i].double().norm() + 1e-8)))
                for i in range(lo, hi)}


class MemoryMachine(RuleBasedStateMachine):
    cfg: MemoryConfig = None  # set by the test
    device = "cpu"

    def __init__(self):
        super().__init__()
        self.mem = RetrievalMemory(self.cfg)
        self.model = Model(self.cfg)
        self.plans: list[tuple] = []  # (plan, {stream: eligible lo at retrieve}, valid-for-this-memory)
        self.g = torch.Generator().manual_seed(0)
        self.tmp = tempfile.mkdtemp(prefix="lrag-stateful-")

    def teardown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ helpers
    def block(self, n: int, dtype=torch.float32):
        L, T, H, Dh = LAYOUT.frame_shape
        emb = torch.randn(n, self.cfg.embed_dim, generator=self.g)
        k = torch.randn(L, n, T, H, Dh, generator=self.g).to(dtype)
        v = torch.randn(L, n, T, H, Dh, generator=self.g).to(dtype)
        return emb, k, v

    def streams(self) -> list[int]:
        return sorted(self.model.emb)

    def expect_failure(self, call, error) -> None:
        before = snapshot(self.mem)
        with pytest.raises(error):
            call()
        assert_unchanged(before, self.mem)

    def plan_is_valid(self, entry) -> bool:
        plan, los, streams_state, same_memory = entry
        if not same_memory:
            return False
        for s in plan.streams:
            if s not in self.model.emb or streams_state[s] is not self.mem._streams.get(s):
                return False
            if self.model.dropped_below[s] > los[s]:
                return False
        return True

    # -------------------------------------------------------------------------------------------------- rules
    @initialize(n=st.integers(1, 3))
    def start_streams(self, n):
        for _ in range(n):
            self.add_stream()

    def add_stream(self, data=None):
        assert self.mem.add_stream() == self.model.add_stream()

    @precondition(lambda self: self.model.emb)
    @rule(data=st.data(), sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3))
    def append_blocks(self, data, sizes):
        """A block for several streams (the generator's pattern), one append per stream or one batched append for
        distinct streams, then a retrieve for them."""
        if data.draw(st.booleans()):
            streams = data.draw(st.lists(st.sampled_from(self.streams()), min_size=1, max_size=3, unique=True))
            self.append_batched(streams, sizes[0])
        else:
            streams = data.draw(st.lists(st.sampled_from(self.streams()), min_size=len(sizes), max_size=len(sizes)))
            for s, n in zip(streams, sizes):
                self.append_one(s, n)
        self.check_retrieve(sorted(set(streams)))

    def append_batched(self, streams: list[int], n: int):
        emb, k, v = self.block(n * len(streams))
        emb, k, v = emb.unflatten(0, (len(streams), n)), k.unflatten(1, (len(streams), n)), v.unflatten(1, (len(streams), n))
        fits = self.model.pages_used() + sum(
            -(-(len(self.model.emb[s]) + n) // self.cfg.page_size) - -(-len(self.model.emb[s]) // self.cfg.page_size)
            for s in streams) <= self.model.n_pages
        if not fits:
            self.expect_failure(lambda: self.mem.append(streams, emb, k=k, v=v), ValueError)
            return
        self.mem.append(streams, emb, k=k, v=v)
        for b, s in enumerate(streams):  # the model: one append per stream, in order
            self.model.append(s, emb[b], k[:, b], v[:, b])

    def append_one(self, s: int, n: int):
        emb, k, v = self.block(n)
        if not self.model.fits(s, n):
            self.expect_failure(lambda: self.mem.append(s, emb.to(self.device), k=k, v=v), ValueError)
            return
        self.mem.append(s, emb, k=k, v=v)
        self.model.append(s, emb, k, v)

    @precondition(lambda self: any(self.model.emb.values()))
    @rule(data=st.data())
    def retrieve(self, data):
        candidates = [s for s in self.streams() if self.model.emb[s]]
        self.check_retrieve(data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=3, unique=True)))

    def check_retrieve(self, streams: list[int]):
        streams = [s for s in streams if self.model.emb.get(s)]
        if not streams:
            return
        plan = self.mem.retrieve(streams)
        for b, s in enumerate(streams):
            scores = self.model.scores(s)
            want = min(self.cfg.top_k, len(scores))
            assert plan.counts[b] == want
            got = plan.ids[b, :want].tolist()
            assert len(set(got)) == want and set(got) <= set(scores), (s, got, sorted(scores))
            assert (plan.ids[b, want:] == -1).all()
            # Top-k by the double-precision oracle, up to float32 rounding of near-ties.
            kth = sorted(scores.values(), reverse=True)[want - 1] if want else None
            for i in got:
                assert scores[i] >= kth - 1e-5, (s, i, scores[i], kth)
        self.plans.append((plan, {s: self.model.eligible_lo_hi(s)[0] for s in streams},
                           {s: self.mem._streams[s] for s in streams}, True))
        self.plans = self.plans[-4:]

    @precondition(lambda self: self.plans)
    @rule(data=st.data(), newest=st.booleans())
    def gather(self, data, newest):
        entry = self.plans[-1] if newest else data.draw(st.sampled_from(self.plans))
        plan = entry[0]
        L, T, H, Dh = LAYOUT.frame_shape
        cache = self.cfg.sink_frames + self.cfg.top_k + 1
        dst_k = torch.zeros(L, len(plan.streams), cache, T, H, Dh)
        dst_v = torch.zeros_like(dst_k)
        if not self.plan_is_valid(entry):
            self.expect_failure(lambda: self.mem.gather(plan, dst_k, dst_v), ValueError)
            return
        self.mem.gather(plan, dst_k, dst_v)
        for b, s in enumerate(plan.streams):
            got = plan.ids[b, :plan.counts[b]].tolist()
            for j, frame in enumerate(got):
                k_ref, v_ref = self.model.kv[s][frame]
                assert torch.equal(dst_k[:, b, self.cfg.sink_frames + j], k_ref), (s, frame)
                assert torch.equal(dst_v[:, b, self.cfg.sink_frames + j], v_ref), (s, frame)
            rest = [f for f in range(cache) if not self.cfg.sink_frames <= f < self.cfg.sink_frames + len(got)]
            assert (dst_k[:, b, rest] == 0).all() and (dst_v[:, b, rest] == 0).all()

    def reset(self, data):
        s = data.draw(st.sampled_from(self.streams()))
        self.mem.reset(s)
        self.model.forget(s)

    def remove(self, data):
        s = data.draw(st.sampled_from(self.streams()))
        self.mem.remove_stream(s)
        self.model.forget(s)
        del self.model.emb[s], self.model.kv[s], self.model.dropped_below[s]
        self.expect_failure(lambda: self.mem.reset(s), KeyError)

    def save_and_load(self, data):
        path = os.path.join(self.tmp, f"m{len(os.listdir(self.tmp))}")
        self.mem.save(path)
        self.mem = RetrievalMemory.load(path)
        # Plans made before belong to the old object.
        self.plans = [(p, los, states, False) for p, los, states, _ in self.plans]

    def foreign_plan(self, data):
        other = RetrievalMemory(self.cfg)
        s = other.add_stream()
        emb, k, v = self.block(1)
        other.append(s, emb, k=k, v=v)
        plan = other.retrieve(s)
        L, T, H, Dh = LAYOUT.frame_shape
        dst = torch.zeros(L, 1, self.cfg.sink_frames + self.cfg.top_k, T, H, Dh)
        self.expect_failure(lambda: self.mem.gather(plan, dst, dst.clone()), ValueError)

    def append_bad(self, data):
        kind = data.draw(st.sampled_from(["float64", "int", "shape", "meta", "unknown", "bool", "missing_v",
                                          "mixed_dtypes", "empty"]))
        s = data.draw(st.sampled_from(self.streams()))
        emb, k, v = self.block(2)
        call, error = {
            "float64": (lambda: self.mem.append(s, emb, k=k.double(), v=v.double()), ValueError),
            "int": (lambda: self.mem.append(s, emb, k=k.long(), v=v.long()), ValueError),
            "shape": (lambda: self.mem.append(s, emb, k=k[:, :1], v=v), ValueError),
            "meta": (lambda: self.mem.append(s, emb, k=k.to("meta"), v=v), ValueError),
            "unknown": (lambda: self.mem.append(self.model.next_stream + 5, emb, k=k, v=v), KeyError),
            "bool": (lambda: self.mem.append(True, emb, k=k, v=v), TypeError),
            "missing_v": (lambda: self.mem.append(s, emb, k=k), ValueError),
            "mixed_dtypes": (lambda: self.mem.append(s, emb, k=k, v=v.half()), ValueError),
            "empty": (lambda: self.mem.append(s, emb[:0], k=k[:, :0], v=v[:, :0]), ValueError),
        }[kind]
        self.expect_failure(call, error)

    def gather_bad(self, data):
        kind = data.draw(st.sampled_from(["dtype", "shape", "device", "dst_frame", "positions", "strided",
                                          "dst_frame_repeated", "dst_frame_outside"]))
        entry = data.draw(st.sampled_from(self.plans))
        plan = entry[0]
        L, T, H, Dh = LAYOUT.frame_shape
        B, K = plan.ids.shape
        cache = self.cfg.sink_frames + K + 1
        good = torch.zeros(L, B, cache, T, H, Dh)
        call = {
            "dtype": lambda: self.mem.gather(plan, good.double(), good.double()),
            "shape": lambda: self.mem.gather(plan, good[:, :, :, :1], good[:, :, :, :1]),
            "device": lambda: self.mem.gather(plan, good.to("meta"), good.clone()),
            "dst_frame": lambda: self.mem.gather(plan, good, good.clone(), dst_frame=torch.zeros(B, K)),
            "positions": lambda: self.mem.gather(plan, good, good.clone(), positions="everywhere"),
            "dst_frame_repeated": lambda: self.mem.gather(plan, good, good.clone(),
                                                          dst_frame=torch.zeros(B, K, dtype=torch.int64)),
            "dst_frame_outside": lambda: self.mem.gather(plan, good, good.clone(),
                                                         dst_frame=torch.full((B, K), cache, dtype=torch.int64)),
            "strided": lambda: self.mem.gather(plan, torch.zeros(L, B, cache, T, H, 2 * Dh)[..., ::2], good.clone()),
        }[kind]
        self.expect_failure(call, ValueError)

    def retrieve_bad(self, data):
        s = data.draw(st.sampled_from(self.streams()))
        calls = [(lambda: self.mem.retrieve([s, s]), ValueError), (lambda: self.mem.retrieve([]), ValueError),
                 (lambda: self.mem.retrieve(True), TypeError),
                 (lambda: self.mem.retrieve([s], queries=torch.zeros(2, self.cfg.embed_dim)), ValueError)]
        if not self.model.emb[s]:
            calls.append((lambda: self.mem.retrieve(s), ValueError))
        call, error = data.draw(st.sampled_from(calls))
        self.expect_failure(call, error)

    # Rules are drawn uniformly by hypothesis: growing histories (append, retrieve, gather) get one rule each, while
    # the many misuse kinds share one rule and stream lifecycle events another, so histories grow long enough for
    # retrieval, eviction and drops to happen between resets.
    @precondition(lambda self: self.model.emb)
    @rule(data=st.data())
    def misuse(self, data):
        kinds = [self.append_bad, self.retrieve_bad] + ([self.gather_bad, self.foreign_plan] if self.plans else [])
        data.draw(st.sampled_from(kinds))(data)

    @rule(data=st.data(), event=st.sampled_from(["add_stream", "reset", "remove", "save_and_load"]))
    def lifecycle(self, data, event):
        if event in ("reset", "remove") and not self.model.emb:
            event = "add_stream"
        getattr(self, event)(data)

    # ------------------------------------------------------------------------------------------------ invariants
    @invariant()
    def storage_accounts_for_exactly_the_stored_frames(self):
        mem, model = self.mem, self.model
        assert mem.streams() == self.streams()
        want = {}
        for s, f in model.stored:
            want.setdefault(s, set()).add(f)
        codes = []
        for s in self.streams():
            st_ = mem._streams[s]
            assert st_.num_frames == len(model.emb[s])
            stored = {f for f, c in enumerate(st_.kv_code) if c >= 0}
            assert stored == want.get(s, set()), (s, sorted(stored), sorted(want.get(s, set())))
            assert st_.first_retrievable == model.dropped_below[s]
            codes += [c for c in st_.kv_code if c >= 0]
        assert len(codes) == len(set(codes))
        assert sum(seg.allocator.num_slots - seg.allocator.num_free for seg in mem._segments()) == len(codes)
        assert mem._page_alloc.num_slots - mem._page_alloc.num_free == model.pages_used()
        queued = [x for q in mem._queues().values() for x in q]
        assert sorted(queued) == sorted(model.stored)
        if self.cfg.host_frames is not None:
            assert sum(seg.allocator.num_slots for seg in mem._segments()[1:]) <= self.cfg.host_frames


@pytest.mark.parametrize("device_frames, host_frames, max_frames, page_size", TIERS)
def test_memory_state_machine(device, device_frames, host_frames, max_frames, page_size):
    if device == "cuda":
        pytest.skip("the state machine builds its tensors on the CPU; the GPU paths are covered by test_retrieval_memory")
    cfg = MemoryConfig(top_k=2, recent_exclude=1, sink_frames=1, window_frames=4, embed_dim=4, storage="kv",
                       kv_layout=LAYOUT, device="cpu", dtype=torch.float32, max_frames=max_frames,
                       page_size=page_size, device_frames=device_frames, host_frames=host_frames)
    machine = type("Machine", (MemoryMachine,), dict(cfg=cfg))
    run_state_machine_as_test(machine, settings=settings(
        max_examples=EXAMPLES if not cuda_code(device) else max(3, EXAMPLES // 5), stateful_step_count=50,
        deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None))
