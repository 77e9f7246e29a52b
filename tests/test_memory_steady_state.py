"""A block's retrieve + gather in steady state reads only the persistent device index: it builds no tensor from
host data (on a GPU each would be a host->device copy) and allocates the same bytes whatever the history length.

Counted with a TorchDispatchMode on the CPU: ``aten.lift_fresh`` is ``torch.tensor(<python data>)``; every other
non-view op's outputs are allocations. Equal counts at a history of 60 and 600 frames per stream are what makes a
block's retrieval capturable in a CUDA graph (a GPU run additionally captures it: benchmarks/gpu_check.sh).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lrag_ext
from lrag_ext.memory import KVLayout, MemoryConfig, RetrievalMemory

LAYOUT = KVLayout(num_layers=2, tokens_per_frame=3, num_heads=2, head_dim=8)


class CountOps(TorchDispatchMode):
    """Host-data tensors built and bytes allocated by the ops run inside the mode."""

    def __init__(self):
        super().__init__()
        self.from_host = 0
        self.bytes = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        if func is torch.ops.aten.lift_fresh.default:
            self.from_host += 1
        elif not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


def memory_with_history(frames: int, streams: int = 3, device: str = "cpu") -> tuple[RetrievalMemory, list[int]]:
    # A bounded host tier, full at both histories: an unbounded one adds a segment (one more gather_kv launch) each
    # time the stored frames double, the only per-block cost that grows with history (logarithmically).
    cfg = MemoryConfig(top_k=6, recent_exclude=5, sink_frames=1, window_frames=12, embed_dim=16, storage="kv",
                       kv_layout=LAYOUT, dtype=torch.float32, max_frames=4096, page_size=16, device_frames=32,
                       host_frames=120, device=device)
    mem = RetrievalMemory(cfg)
    g = torch.Generator().manual_seed(frames)
    ids = [mem.add_stream() for _ in range(streams)]
    L, T, H, Dh = LAYOUT.frame_shape
    for _ in range(frames // 3):
        append_block(mem, ids, g)
    return mem, ids


def append_block(mem: RetrievalMemory, ids: list[int], g: torch.Generator) -> None:
    L, T, H, Dh = LAYOUT.frame_shape
    B, dev = len(ids), mem.device
    mem.append(ids, torch.randn(B, 3, 16, generator=g).to(dev), k=torch.randn(L, B, 3, T, H, Dh, generator=g).to(dev),
               v=torch.randn(L, B, 3, T, H, Dh, generator=g).to(dev))


def block_retrieval(mem: RetrievalMemory, ids: list[int], cache: tuple) -> CountOps:
    with CountOps() as counts:
        plan = mem.retrieve(ids)
        mem.gather(plan, *cache)
    return counts


def test_retrieve_and_gather_cost_does_not_grow_with_history():
    results = {}
    for frames in (60, 600):
        mem, ids = memory_with_history(frames)
        L, T, H, Dh = LAYOUT.frame_shape
        cache = (torch.zeros(L, len(ids), 7, T, H, Dh), torch.zeros(L, len(ids), 7, T, H, Dh))
        block_retrieval(mem, ids, cache)  # first block of these streams: the row list goes to the device once
        results[frames] = [block_retrieval(mem, ids, cache) for _ in range(3)]
    for frames, runs in results.items():
        for counts in runs:
            assert counts.from_host == 0, (frames, [op for op in counts.ops if "lift_fresh" in op])
    assert {c.bytes for c in results[60]} == {c.bytes for c in results[600]}, \
        (results[60][0].bytes, results[600][0].bytes)


def test_batched_append_equals_one_append_per_stream():
    """append(list of streams) is one write for all streams; the memory ends up exactly as after the loop."""
    from memory_state import snapshot

    L, T, H, Dh = LAYOUT.frame_shape
    g = torch.Generator().manual_seed(0)
    blocks = [(torch.randn(2, 3, 16, generator=g), torch.randn(L, 2, 3, T, H, Dh, generator=g),
               torch.randn(L, 2, 3, T, H, Dh, generator=g)) for _ in range(30)]
    mems = []
    for batched in (True, False):
        cfg = MemoryConfig(top_k=6, recent_exclude=5, sink_frames=1, window_frames=12, embed_dim=16, storage="kv",
                           kv_layout=LAYOUT, dtype=torch.float32, max_frames=512, page_size=16, device_frames=8,
                           host_frames=40)
        mem = RetrievalMemory(cfg)
        ids = [mem.add_stream(), mem.add_stream()]
        for emb, k, v in blocks:
            if batched:
                mem.append(ids, emb, k=k, v=v)
            else:
                for b, s in enumerate(ids):
                    mem.append(s, emb[b], k=k[:, b], v=v[:, b])
        mems.append(mem)
    a, b = snapshot(mems[0]), snapshot(mems[1])
    for key in ("next_stream", "page_free", "fifo"):
        assert a.meta[key] == b.meta[key], key
    for s in (0, 1):
        assert a.meta["streams"][s][:4] == b.meta["streams"][s][:4]
        pa, pb = mems[0].retrieve(s), mems[1].retrieve(s)
        assert torch.equal(pa.ids, pb.ids) and torch.equal(pa.scores, pb.scores)
        cache = [torch.zeros(L, 1, 7, T, H, Dh) for _ in range(4)]
        mems[0].gather(pa, cache[0], cache[1])
        mems[1].gather(pb, cache[2], cache[3])
        assert torch.equal(cache[0], cache[2]) and torch.equal(cache[1], cache[3])


@pytest.mark.skipif(not (torch.cuda.is_available() and lrag_ext.build_info()["cuda"]),
                    reason="needs a GPU and the CUDA kernels")
def test_block_retrieval_is_capturable_in_a_cuda_graph():
    """retrieve + gather captured once replay correctly after later appends: the graph reads the persistent
    index, so a replay sees the new history (what eager calls compute)."""
    mem, ids = memory_with_history(60, device="cuda")
    L, T, H, Dh = LAYOUT.frame_shape
    cache = [torch.zeros(L, len(ids), 7, T, H, Dh, device="cuda") for _ in range(2)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graphs asks
        for _ in range(2):
            mem.gather(mem.retrieve(ids), *cache)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mem.retrieve(ids)
        mem.gather(captured, *cache)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        append_block(mem, ids, g)
        graph.replay()
        eager = mem.retrieve(ids)
        want = [torch.zeros_like(c) for c in cache]
        mem.gather(eager, *want)
        torch.cuda.synchronize()
        assert torch.equal(captured.ids, eager.ids) and torch.equal(captured.scores, eager.scores)
        assert torch.equal(cache[0], want[0]) and torch.equal(cache[1], want[1])
