"""write_kv / gather_kv on CPU: lrag_ext vs the PyTorch reference (index_select/index_put + RoPE in float64).

Run: ``.venv/bin/python -m pytest benchmarks/bench_kv.py --benchmark-only``.

Geometries (m frames moved per call, all layers, K and V):
- ``small``: 2 layers x 16 tokens x 2 heads x 32, float32 pool and cache.
- ``wan``: Wan2.1-1.3B frames (1560 tokens x 12 heads x 128, bf16) but only 2 of its 30 layers, to fit the
  memory of a small machine (a real frame is 287.5 MB over 30 layers).
- ``wan_fp8``: the same frames in a float8_e4m3fn pool (per-frame/layer scales) gathered into a bf16 cache
  and written from bf16 frames (quantised on the way).
GB/s counts the bytes read plus the bytes written. Each case checks the result against the reference first.
``memcpy`` is the floor: one contiguous ``copy_`` of the same number of bytes.
"""
from __future__ import annotations

import os

import pytest
import torch

import lrag_ext
from lrag_ext import reference

GEOMS = {
    "small": dict(layers=2, tokens=16, heads=2, head_dim=32, dtype=torch.float32, slots=16, m=6),
    "wan": dict(layers=2, tokens=1560, heads=12, head_dim=128, dtype=torch.bfloat16, slots=8, m=6),
    "wan_fp8": dict(layers=2, tokens=1560, heads=12, head_dim=128, dtype=torch.bfloat16, slots=8, m=6, fp8=True),
}
THREADS = sorted({1, os.cpu_count() or 1})
_DATA: dict = {}


def data(name):
    if name not in _DATA:
        _DATA.clear()  # one geometry alive at a time
        c = GEOMS[name]
        g = torch.Generator().manual_seed(0)
        L, T, H, hd, S, m = c["layers"], c["tokens"], c["heads"], c["head_dim"], c["slots"], c["m"]
        pool = torch.randn(S, L, 2, T, H, hd, generator=g).to(c["dtype"])
        src = torch.randn(L, m, T, H, hd, generator=g).to(c["dtype"])
        scale = None
        if c.get("fp8"):  # the same frames, quantised by write_kv
            p8 = lrag_ext.kv_pool_empty(S, L, T, H, hd, torch.float8_e4m3fn)
            scale = lrag_ext.kv_pool_scale_empty(p8)
            lrag_ext.write_kv(p8, pool[:, :, 0].transpose(0, 1), pool[:, :, 1].transpose(0, 1), torch.arange(S),
                              pool_scale=scale)
            pool = p8
        F = m + 6  # the attention cache: sink + m memory frames + a local window
        _DATA[name] = dict(
            pool=pool, src_k=src, src_v=src.clone(), write_slots=torch.randperm(S, generator=g)[:m],
            slots=torch.randperm(S, generator=g)[:m][None], dst_frame=torch.arange(1, m + 1)[None],
            delta=torch.full((1, m), -7), pairs=reference.wan_temporal_pairs(hd),
            dst_k=torch.zeros(L, 1, F, T, H, hd, dtype=c["dtype"]), dst_v=torch.zeros(L, 1, F, T, H, hd, dtype=c["dtype"]),
            frame_bytes=L * 2 * T * H * hd * pool.element_size(), m=m, scale=scale,
            cache_elem=torch.empty(0, dtype=c["dtype"]).element_size())
    return _DATA[name]


def memcpy_call(d):
    if "copy_src" not in d:
        d["copy_src"] = torch.empty(d["m"] * d["frame_bytes"], dtype=torch.uint8)
        d["copy_dst"] = torch.empty_like(d["copy_src"])
        d["copy_src"].fill_(1)
    return lambda: d["copy_dst"].copy_(d["copy_src"])


def gather_call(impl, d):
    if impl == "memcpy":
        return memcpy_call(d)
    fn = lrag_ext.gather_kv if impl == "lrag_ext" else reference.gather_kv
    return lambda: fn(d["pool"], d["slots"], d["dst_k"], d["dst_v"], d["dst_frame"], d["delta"], d["pairs"], 10000.0,
                      pool_scale=d["scale"])


def write_call(impl, d):
    if impl == "memcpy":
        return memcpy_call(d)
    fn = lrag_ext.write_kv if impl == "lrag_ext" else reference.write_kv
    return lambda: fn(d["pool"], d["src_k"], d["src_v"], d["write_slots"], pool_scale=d["scale"])


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("impl", ["lrag_ext", "reference", "memcpy"])
@pytest.mark.parametrize("geom", list(GEOMS))
def test_gather_kv(benchmark, geom, impl, threads):
    if impl == "memcpy" and geom == "wan_fp8":
        pytest.skip("the memcpy floor is the wan case's")
    d = data(geom)
    want_k, want_v = d["dst_k"].clone(), d["dst_v"].clone()
    reference.gather_kv(d["pool"], d["slots"], want_k, want_v, d["dst_frame"], d["delta"], d["pairs"], 10000.0,
                        pool_scale=d["scale"])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gather_call(impl, d)()
        if impl != "memcpy":
            torch.testing.assert_close(d["dst_k"], want_k, rtol=8e-3, atol=8e-3)
            assert torch.equal(d["dst_v"], want_v)
        benchmark.pedantic(gather_call(impl, d), rounds=5 if geom.startswith("wan") else 50, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(before)
    # read the pool frames + write the cache frames (fp8: 1-byte reads, 2-byte writes)
    moved = d["m"] * d["frame_bytes"] * (1 + d["cache_elem"] // d["pool"].element_size())
    benchmark.extra_info.update(op="gather_kv", geom=geom, impl=impl, threads=threads,
                                gb_per_s=moved / benchmark.stats.stats.median / 1e9)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("impl", ["lrag_ext", "reference", "memcpy"])
@pytest.mark.parametrize("geom", list(GEOMS))
def test_write_kv(benchmark, geom, impl, threads):
    if impl == "memcpy" and geom == "wan_fp8":
        pytest.skip("the memcpy floor is the wan case's")
    d = data(geom)
    want = d["pool"].clone()
    want_scale = d["scale"].clone() if d["scale"] is not None else None
    reference.write_kv(want, d["src_k"], d["src_v"], d["write_slots"], want_scale)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        write_call(impl, d)()
        if impl != "memcpy":
            assert torch.equal(d["pool"].view(torch.uint8), want.view(torch.uint8))
        benchmark.pedantic(write_call(impl, d), rounds=5 if geom.startswith("wan") else 50, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(before)
    moved = d["m"] * d["frame_bytes"] * (1 + d["cache_elem"] // d["pool"].element_size())
    benchmark.extra_info.update(op="write_kv", geom=geom, impl=impl, threads=threads,
                                gb_per_s=moved / benchmark.stats.stats.median / 1e9)
