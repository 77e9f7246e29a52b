"""cosine_topk on a CUDA GPU: lrag_ext vs torch (matmul + topk, and the paged reference) vs the bandwidth floor.

    python benchmarks/gpu_cosine_topk.py [--dtype bf16] [--json out.json]

The floor of a case is the bytes the search must read (N x D embeddings per stream) divided by the device's
measured copy bandwidth (a large clone: bytes read + written per second). Each case checks ids against the
reference before timing. Times are medians of CUDA-event-timed replays of a CUDA graph (launch overhead out).
"""
from __future__ import annotations

import argparse
import json

import torch

import lrag_ext
from lrag_ext import reference
from _gpu_timing import median_ms, time_graph

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (read + write) of a 1 GiB clone."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = median_ms(lambda: y.copy_(x)) / 1e3
    return 2 * x.numel() / t


def case(N, D, B, k, dtype, page_size, bw):
    g = torch.Generator(device="cuda").manual_seed(0)
    n_pages = -(-N // page_size)
    pages = torch.randn(n_pages, page_size, D, device="cuda", generator=g).to(dtype)
    table = torch.randperm(n_pages, device="cuda", generator=g).int()[None].repeat(B, 1)
    q = torch.randn(B, D, device="cuda", generator=g).to(dtype)
    lo = torch.zeros(B, dtype=torch.int64, device="cuda")
    hi = torch.full((B,), N, dtype=torch.int64, device="cuda")
    got = lrag_ext.cosine_topk(q, pages, table, lo, hi, k)
    want = reference.cosine_topk(q, pages, table, lo, hi, k)
    ok = torch.equal(got[1][:, 0], want[1][:, 0]) and torch.allclose(got[0], want[0], atol=2e-3, rtol=0)
    emb = pages.view(-1, D)[:N]

    def torch_mm():
        qn = q.float() / (q.float().norm(dim=1, keepdim=True) + 1e-8)
        en = emb.float() / (emb.float().norm(dim=1, keepdim=True) + 1e-8)
        return torch.topk(qn @ en.T, k, dim=1)

    t_ours = time_graph(lambda: lrag_ext.cosine_topk(q, pages, table, lo, hi, k))
    t_mm = median_ms(torch_mm, iters=30) / 1e3
    floor = N * D * pages.element_size() * B / bw
    return dict(N=N, D=D, B=B, k=k, dtype=str(dtype).split(".")[-1], correct=ok, ours_us=t_ours * 1e6,
                torch_mm_us=t_mm * 1e6, floor_us=floor * 1e6, vs_floor=t_ours / floor, speedup_vs_mm=t_mm / t_ours)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--json")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e9:.0f} GB/s  torch {torch.__version__}")
    rows = []
    for N in (1_000, 10_000, 100_000):
        for D in (256, 1024):
            for B in (1, 8):
                for k in (6, 16):
                    rows.append(case(N, D, B, k, dtype, 256, bw))
    head = f"{'N':>7} {'D':>5} {'B':>2} {'k':>3} {'ok':>3} {'ours µs':>9} {'floor µs':>9} {'x floor':>8} {'mm+topk µs':>11} {'speedup':>8}"
    print(head)
    for r in rows:
        print(f"{r['N']:>7} {r['D']:>5} {r['B']:>2} {r['k']:>3} {'yes' if r['correct'] else 'NO':>3} "
              f"{r['ours_us']:>9.1f} {r['floor_us']:>9.1f} {r['vs_floor']:>8.2f} {r['torch_mm_us']:>11.1f} "
              f"{r['speedup_vs_mm']:>8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bw=bw, rows=rows), f, indent=1)
    if not all(r["correct"] for r in rows):
        raise SystemExit("some cases disagree with the reference")


if __name__ == "__main__":
    main()
