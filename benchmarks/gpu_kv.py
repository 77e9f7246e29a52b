"""gather_kv / write_kv on a CUDA GPU against the bandwidth floors.

    python benchmarks/gpu_kv.py [--layers 30] [--tokens 1560] [--heads 12] [--head-dim 128] [--frames 6]
                                [--dtype bf16] [--json out.json]

Cases (defaults: Wan2.1-1.3B geometry, 6 retrieved frames x 30 layers, bf16: 6 x 287.5 MB = 1.7 GB):
- ``gather device``: pool in device memory -> attention-cache frames (read + write 1.7 GB each), with and
  without the RoPE rotation; the floor is the device's measured copy bandwidth (a large ``copy_``).
- ``gather pinned``: pool in pinned host memory, read over PCIe by the kernel; the floor is the measured
  host->device bandwidth (``copy_`` from pinned memory, non_blocking).
- ``write device``: the inverse (new frames -> pool slots).
- fp8 pools (float8_e4m3fn + per-frame/layer scales): half the bytes read; gather from device and from pinned
  memory, and the two-pass write (amax, then quantise).
- baselines: the PyTorch reference (index + RoPE in float64), and the release's way: one host->device copy
  per frame per layer (``.to(device)`` of each pinned layer slice).
Each kernel case is first checked against the reference on two of its layers. Times are medians of
CUDA-event-timed calls. Prints a table; ``--json`` also writes the rows.
"""
from __future__ import annotations

import argparse
import json

import torch

from _gpu_timing import median_ms  # noqa: E402
import lrag_ext
from lrag_ext import reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGET = 0.80


def time_cuda(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median seconds per call, CUDA-event timed (wall clock on a CPU smoke run)."""
    return median_ms(fn, iters=iters, warmup=warmup) / 1e3


def device_copy_bandwidth(nbytes: int, device: str) -> float:
    """Bytes/s of a device-to-device copy_ (counting read + write)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * nbytes / time_cuda(lambda: y.copy_(x))


def h2d_bandwidth(nbytes: int) -> float:
    """Bytes/s of a pinned host -> device copy_."""
    x = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    y = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / time_cuda(lambda: y.copy_(x, non_blocking=True))


def check(pool, slots, dst_k, dst_v, frame, delta, pairs) -> bool:
    """The kernel against the reference on layers 0 and the last (views: strided pool and cache)."""
    sel = [0, pool.shape[1] - 1]
    ok = True
    for lay in sel:
        p = pool[:, lay:lay + 1]
        k, v = dst_k[lay:lay + 1].clone().zero_(), dst_v[lay:lay + 1].clone().zero_()
        rk, rv = k.clone(), v.clone()
        lrag_ext.gather_kv(p, slots, k, v, frame, delta, pairs)
        reference.gather_kv(p.to(k.device), slots, rk, rv, frame, delta, pairs, 10000.0)
        ok &= torch.equal(v, rv) and torch.allclose(k.float(), rk.float(), rtol=1e-2, atol=1e-2)
    return ok


def check8(pool8, scale8, slots, dst_k, dst_v, frame, delta, pairs) -> bool:
    """The fp8 gather against the reference on layer 0."""
    k, v = dst_k[:1].clone().zero_(), dst_v[:1].clone().zero_()
    rk, rv = k.clone(), v.clone()
    lrag_ext.gather_kv(pool8[:, :1], slots, k, v, frame, delta, pairs, pool_scale=scale8[:, :1])
    reference.gather_kv(pool8[:, :1], slots, rk, rv, frame, delta, pairs, 10000.0, pool_scale=scale8[:, :1])
    return torch.equal(v, rv) and torch.allclose(k.float(), rk.float(), rtol=1e-2, atol=1e-2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=1560)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--slots", type=int, default=12, help="pool slots (device and pinned pools each)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (no pinned cases)")
    a = ap.parse_args()
    dev = a.device
    gpu = dev == "cuda"
    dtype = DTYPES[a.dtype]
    L, T, H, hd, m = a.layers, a.tokens, a.heads, a.head_dim, a.frames
    pairs = reference.wan_temporal_pairs(hd)
    torch.manual_seed(0)

    pool = lrag_ext.kv_pool_empty(a.slots, L, T, H, hd, dtype, dev)
    pool.copy_(torch.randn(pool.shape, device=dev, dtype=torch.float32).to(dtype))
    host = lrag_ext.kv_pool_empty(a.slots, L, T, H, hd, dtype, "cpu", pin_memory=gpu)
    host.copy_(pool)
    F = 12  # the attention cache: sink | m memory frames | local window
    dst_k = torch.zeros(L, 1, F, T, H, hd, dtype=dtype, device=dev)
    dst_v = torch.zeros_like(dst_k)
    slots = torch.randperm(a.slots, device=dev)[:m][None]
    frame = torch.arange(1, m + 1, device=dev)[None]
    zero = torch.zeros_like(slots)
    delta = torch.full_like(slots, -9)
    frame_bytes = L * 2 * T * H * hd * pool.element_size()
    moved = m * frame_bytes  # bytes read (= bytes written)

    copy_bw = device_copy_bandwidth(moved, dev)
    h2d_bw = h2d_bandwidth(moved) if gpu else float("nan")
    ok_dev = check(pool, slots, dst_k, dst_v, frame, delta, pairs)
    ok_host = check(host, slots, dst_k, dst_v, frame, delta, pairs) if gpu else True
    src_k = torch.randn(L, m, T, H, hd, device=dev).to(dtype)
    src_v = torch.randn_like(src_k)
    wslots = slots[0]
    # fp8 pools holding the same frames (write_kv quantises them)
    pool8 = lrag_ext.kv_pool_empty(a.slots, L, T, H, hd, torch.float8_e4m3fn, dev)
    scale8 = lrag_ext.kv_pool_scale_empty(pool8)
    for s in range(a.slots):
        lrag_ext.write_kv(pool8, pool[s, :, 0][:, None], pool[s, :, 1][:, None], torch.tensor([s], device=dev),
                          pool_scale=scale8)
    host8 = lrag_ext.kv_pool_empty(a.slots, L, T, H, hd, torch.float8_e4m3fn, "cpu", pin_memory=gpu)
    host8.view(torch.uint8).copy_(pool8.view(torch.uint8))
    hscale8 = lrag_ext.kv_pool_scale_empty(host8)
    hscale8.copy_(scale8)
    ok_fp8 = check8(pool8, scale8, slots, dst_k, dst_v, frame, delta, pairs)

    def release_way():  # the reference release: a host->device copy per retrieved frame per layer
        for s in slots[0].tolist():
            for lay in range(L):
                dst_k[lay, 0, 1].copy_(host[s, lay, 0], non_blocking=True)
                dst_v[lay, 0, 1].copy_(host[s, lay, 1], non_blocking=True)

    rows = []

    def row(name, fn, nbytes, floor_bw, floor_name, ok=True):
        t = time_cuda(fn)
        bw = nbytes / t
        rows.append(dict(case=name, ms=t * 1e3, gb_per_s=bw / 1e9, floor=floor_name, floor_gb_per_s=floor_bw / 1e9,
                         fraction=bw / floor_bw, ok=ok))

    row("gather device, delta=0", lambda: lrag_ext.gather_kv(pool, slots, dst_k, dst_v, frame, zero, pairs),
        2 * moved, copy_bw, "d2d copy", ok_dev)
    row("gather device, RoPE", lambda: lrag_ext.gather_kv(pool, slots, dst_k, dst_v, frame, delta, pairs),
        2 * moved, copy_bw, "d2d copy", ok_dev)
    if gpu:
        row("gather pinned host, RoPE", lambda: lrag_ext.gather_kv(host, slots, dst_k, dst_v, frame, delta, pairs),
            moved, h2d_bw, "h2d copy", ok_host)
    row("write device", lambda: lrag_ext.write_kv(pool, src_k, src_v, wslots), 2 * moved, copy_bw, "d2d copy")
    row("gather device fp8 pool, RoPE",
        lambda: lrag_ext.gather_kv(pool8, slots, dst_k, dst_v, frame, delta, pairs, pool_scale=scale8),
        moved // pool.element_size() + moved, copy_bw, "d2d copy", ok_fp8)
    if gpu:
        row("gather pinned fp8 pool, RoPE",
            lambda: lrag_ext.gather_kv(host8, slots, dst_k, dst_v, frame, delta, pairs, pool_scale=hscale8),
            moved // pool.element_size(), h2d_bw, "h2d copy", ok_fp8)
    row("write device fp8 pool (2 passes)",
        lambda: lrag_ext.write_kv(pool8, src_k, src_v, wslots, pool_scale=scale8),
        2 * moved + moved // pool.element_size(), copy_bw, "d2d copy")
    row("torch reference gather (device)",
        lambda: reference.gather_kv(pool, slots, dst_k, dst_v, frame, delta, pairs, 10000.0), 2 * moved, copy_bw,
        "d2d copy")
    if gpu:
        row("release: per-frame per-layer h2d", release_way, moved, h2d_bw, "h2d copy")

    print(f"gather/write of {m} frames x {L} layers, {T} tokens x {H} heads x {hd}, {a.dtype}: "
          f"{moved / 1e9:.3f} GB per direction; {torch.cuda.get_device_name() if gpu else dev}")
    print(f"device copy bandwidth {copy_bw / 1e9:.0f} GB/s (read+write), pinned h2d {h2d_bw / 1e9:.1f} GB/s")
    print(f"{'case':36s} {'ms':>9s} {'GB/s':>9s} {'floor':>9s} {'of floor':>9s}  check")
    for r in rows:
        flag = "" if r["fraction"] >= TARGET or "reference" in r["case"] or "release" in r["case"] else "  < 80%"
        print(f"{r['case']:36s} {r['ms']:9.3f} {r['gb_per_s']:9.1f} {r['floor_gb_per_s']:9.1f} "
              f"{100 * r['fraction']:8.1f}%  {'ok' if r['ok'] else 'MISMATCH'}{flag}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(rows=rows, copy_gb_per_s=copy_bw / 1e9, h2d_gb_per_s=h2d_bw / 1e9), f, indent=1)
    if not (ok_dev and ok_host and ok_fp8):
        raise SystemExit("gather_kv disagrees with the reference")


if __name__ == "__main__":
    main()
