"""cosine_topk on CPU: lrag_ext vs the PyTorch reference, torch matmul+topk, and faiss-cpu IndexFlatIP.

Run: ``make bench`` or ``.venv/bin/python -m pytest benchmarks/bench_cosine_topk.py --benchmark-only
--benchmark-json out.json`` then ``python benchmarks/summarize.py out.json``.

Providers, all on the same N x D float32 embeddings (N = history length, one stream per query):
- ``lrag_ext``: the fused kernel over a paged pool (page_size 256, pages in shuffled physical order).
- ``reference``: :func:`lrag_ext.reference.cosine_topk` (gathers the paged history, normalises, matmul, sorts).
- ``torch_mm``: the reference release's way on a contiguous matrix: normalise both, ``E @ q``, ``torch.topk``.
- ``faiss``: ``IndexFlatIP`` on pre-normalised vectors (so it does less work than the others: no norms).
Each case checks the ids against the reference before it is timed.
"""
from __future__ import annotations

import pytest
import torch

import lrag_ext
from lrag_ext import reference

from conftest import ALL_THREADS, torch_threads

try:
    import faiss
except ImportError:  # faiss-cpu is a benchmark-only extra
    faiss = None

PAGE = 256
NS = [1_000, 10_000, 100_000]
DS = [256, 1024]
KS = [6, 16]
BS = [1, 8]
THREADS = sorted({1, ALL_THREADS})
PROVIDERS = ["lrag_ext", "reference", "torch_mm", "faiss"]

_DATA = {}


def data(N, D, B):
    key = (N, D, B)
    if key not in _DATA:
        _DATA.clear()  # keep at most one data set alive (N = 1e5, D = 1024 is 400 MB)
        g = torch.Generator().manual_seed(0)
        emb = torch.randn(N, D, generator=g)
        n_pages = -(-N // PAGE)
        padded = torch.zeros(n_pages * PAGE, D)
        padded[:N] = emb
        perm = torch.randperm(n_pages, generator=g)
        pages = torch.empty(n_pages, PAGE, D)
        pages[perm] = padded.view(n_pages, PAGE, D)
        table = perm.int()[None].repeat(B, 1)
        queries = torch.randn(B, D, generator=g)
        _DATA[key] = dict(emb=emb, pages=pages, table=table, queries=queries,
                          lo=torch.zeros(B, dtype=torch.int64), hi=torch.full((B,), N, dtype=torch.int64),
                          emb_n=emb / (emb.norm(dim=1, keepdim=True) + 1e-8))
    return _DATA[key]


def make_call(provider, d, k):
    if provider == "lrag_ext":
        return lambda: lrag_ext.cosine_topk(d["queries"], d["pages"], d["table"], d["lo"], d["hi"], k)[1]
    if provider == "reference":
        return lambda: reference.cosine_topk(d["queries"], d["pages"], d["table"], d["lo"], d["hi"], k)[1]
    if provider == "torch_mm":
        def torch_mm():
            q = d["queries"] / (d["queries"].norm(dim=1, keepdim=True) + 1e-8)
            return torch.topk(q @ d["emb_n"].T, k, dim=1).indices
        return torch_mm
    if provider == "faiss":
        index = faiss.IndexFlatIP(d["emb_n"].shape[1])
        index.add(d["emb_n"].numpy())
        return lambda: torch.from_numpy(index.search(
            (d["queries"] / (d["queries"].norm(dim=1, keepdim=True) + 1e-8)).numpy(), k)[1])
    raise ValueError(provider)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cosine_topk(benchmark, provider, N, D, k, B, threads):
    if provider == "faiss" and faiss is None:
        pytest.skip("faiss-cpu not installed (pip install faiss-cpu)")
    if provider == "reference" and N * D * B > 2e8:
        pytest.skip("reference gathers a [B, N, D] copy: too slow/large at this size")
    d = data(N, D, B)
    call = make_call(provider, d, k)
    with torch_threads(threads):
        if faiss is not None:
            faiss.omp_set_num_threads(threads)
        want = lrag_ext.reference.cosine_topk(d["queries"][:1], d["pages"], d["table"][:1], d["lo"][:1],
                                              d["hi"][:1], k)[1] if N * D <= 2e7 else None
        got = call()
        if want is not None:  # the same top-1 (random data has no near-ties at the top)
            assert got[0, 0].item() == want[0, 0].item(), (provider, got[0], want[0])
        rounds = 3 if N * D * B >= 1e8 else 10
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    bytes_read = N * D * 4 * B
    benchmark.extra_info.update(provider=provider, N=N, D=D, k=k, B=B, threads=threads,
                                gb_per_s=bytes_read / benchmark.stats.stats.median / 1e9)
