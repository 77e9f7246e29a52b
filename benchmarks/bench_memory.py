"""Per-block retrieval cost on CPU: lrag_ext.RetrievalMemory (retrieve + gather) vs the reference release's way.

    .venv/bin/python -m pytest benchmarks/bench_memory.py --benchmark-only

History of 480 frames (120 s at 4 latent frames per second) and 5,000 frames; K = 6, R = 5, sink 1, window 12,
1024-d embeddings; K/V geometry 4 layers x 64 tokens x 4 heads x 64 (bf16, 256 KiB a frame: small enough that
5,000 frames fit this machine; the per-frame work scales with the bytes moved, which the GB/s column shows).

Providers:
- ``lrag_ext``: ``mem.retrieve([s])`` + ``mem.gather(plan, cache_k, cache_v)`` (one cosine_topk launch, one
  gather_kv launch per storage segment; all frames in one tier).
- ``release``: the LongLive-RAG release's approach re-implemented: a Python list of per-frame embeddings and a
  per-layer Python list of per-frame K/V tensors; per block stack the eligible embeddings, L2-normalise,
  matmul, ``torch.topk``, then copy each selected frame's K and V layer by layer into the cache.
Both select the same frames (checked before timing).
"""
from __future__ import annotations

import pytest
import torch

import lrag_ext

LAYERS, TOKENS, HEADS, HEAD_DIM, EMBED = 4, 64, 4, 64, 1024
K, R, SINK, WINDOW = 6, 5, 1, 12
HISTORIES = [480, 5000]


class ReleaseMemory:
    """The reference release's data structures and per-block steps (our re-implementation, for the baseline)."""

    def __init__(self):
        self.desc: list[torch.Tensor] = []
        self.k: list[list[torch.Tensor]] = [[] for _ in range(LAYERS)]   # per layer, per frame
        self.v: list[list[torch.Tensor]] = [[] for _ in range(LAYERS)]

    def append(self, emb, k, v):
        for i in range(emb.shape[0]):
            self.desc.append(emb[i])
            for layer in range(LAYERS):
                self.k[layer].append(k[layer, i].clone())
                self.v[layer].append(v[layer, i].clone())

    def retrieve_and_copy(self, cache_k, cache_v):
        n = len(self.desc)
        hi = SINK + max(0, n - WINDOW) - R
        cand = torch.stack(self.desc[SINK:hi])
        q = self.desc[-1]
        cand = cand / (cand.norm(dim=-1, keepdim=True) + 1e-8)
        q = q / (q.norm() + 1e-8)
        sims = torch.bmm(cand[None], q[None, :, None]).flatten()
        top = torch.topk(sims, min(K, sims.numel()))
        frames = (top.indices + SINK).tolist()
        for j, f in enumerate(frames):
            for layer in range(LAYERS):
                cache_k[layer, 0, SINK + j] = self.k[layer][f]
                cache_v[layer, 0, SINK + j] = self.v[layer][f]
        return frames


def build(n_frames: int):
    g = torch.Generator().manual_seed(0)
    layout = lrag_ext.KVLayout(num_layers=LAYERS, tokens_per_frame=TOKENS, num_heads=HEADS, head_dim=HEAD_DIM)
    mem = lrag_ext.RetrievalMemory(lrag_ext.MemoryConfig(
        top_k=K, recent_exclude=R, sink_frames=SINK, window_frames=WINDOW, embed_dim=EMBED, storage="kv",
        kv_layout=layout, dtype=torch.bfloat16, max_frames=n_frames + 64, page_size=64,
        device_frames=n_frames, host_frames=0))
    release = ReleaseMemory()
    s = mem.add_stream()
    for start in range(0, n_frames, 60):
        n = min(60, n_frames - start)
        emb = torch.randn(n, EMBED, generator=g)
        kv = torch.randn(2, LAYERS, n, TOKENS, HEADS, HEAD_DIM, generator=g).bfloat16()
        mem.append(s, emb, k=kv[0], v=kv[1])
        release.append(emb, kv[0], kv[1])
    shape = (LAYERS, 1, WINDOW, TOKENS, HEADS, HEAD_DIM)
    return mem, s, release, torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16)


_CACHE = {}


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("provider", ["lrag_ext", "release"])
def test_block_retrieval(benchmark, provider, history):
    if history not in _CACHE:
        _CACHE.clear()
        _CACHE[history] = build(history)
    mem, s, release, cache_k, cache_v = _CACHE[history]
    plan = mem.retrieve([s])
    ours = plan.ids[0, :plan.counts[0]].tolist()
    assert ours == release.retrieve_and_copy(cache_k, cache_v)   # same frames, before timing

    if provider == "lrag_ext":
        def step():
            mem.gather(mem.retrieve([s]), cache_k, cache_v)
    else:
        def step():
            release.retrieve_and_copy(cache_k, cache_v)
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)
    moved = 2 * K * LAYERS * TOKENS * HEADS * HEAD_DIM * 2 + (history - WINDOW - R) * EMBED * 4
    benchmark.extra_info.update(provider=provider, history=history,
                                gb_per_s=round(moved / benchmark.stats.stats.median / 1e9, 2))
