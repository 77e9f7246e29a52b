"""Embedding one block (3 latent frames, 16 x 60 x 104) on a CUDA GPU: the reference-style module vs ours.

    python benchmarks/gpu_embed.py [--frames 3] [--json out.json]

Rows:
- ``reference fp32``: the unfused PyTorch LatentAE ``encode`` in float32, NCHW (what the release runs);
- ``reference bf16``: the same in bfloat16 autocast-free bf16 weights, NCHW;
- ``ours bf16 CL``: bf16 channels-last trunk + the fused ``embed_head`` op (eager, and as a CUDA graph);
- ``head unfused`` / ``head fused``: the tail alone on the trunk output;
- ``pooled unfused`` / ``pooled op``: the light embedder (adaptive pool + Linear + normalise);
- ``mean descriptor``: the fallback.
Each row checks its embeddings against the float32 reference first (cosine >= 0.99 in bf16). Times are medians
of CUDA-event-timed calls (eager) or graph replays (graph).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from embed_models import perturbed_ae  # noqa: E402
from _gpu_timing import time_eager, time_graph  # noqa: E402  (shared GPU timing helpers)

from lrag_ext import ops  # noqa: E402
from lrag_ext.embedder import PooledEmbedder, mean_descriptor  # noqa: E402


def min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).min())


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = "cuda"
    x32 = torch.randn(args.frames, 16, 60, 104, device=dev, generator=torch.Generator(dev).manual_seed(1))
    ref_model = perturbed_ae().to(dev)
    bf_model = perturbed_ae().to(dev, torch.bfloat16)
    cl_model = perturbed_ae().to(dev, torch.bfloat16).to(memory_format=torch.channels_last)
    xb, xcl = x32.bfloat16(), x32.bfloat16().contiguous(memory_format=torch.channels_last)
    want = ref_model.encode(x32)
    feat = cl_model.encoder.trunk(xcl)
    norm, fc = cl_model.encoder.final_norm[0], cl_model.encoder.fc
    head_args = (feat, norm.weight, norm.bias, fc.weight, fc.bias, norm.num_groups, norm.eps)
    pooled = PooledEmbedder(in_channels=16, grid=4, latent_dim=1024).to(dev).eval()
    pooled_bf = PooledEmbedder(in_channels=16, grid=4, latent_dim=1024).to(dev, torch.bfloat16).eval()
    pooled_bf.load_state_dict({k: v.bfloat16() for k, v in pooled.state_dict().items()})

    def unfused_head():
        return F.normalize(cl_model.encoder.head(feat).float(), dim=-1)

    def pooled_unfused():
        return pooled_bf.encode(xb).float()

    cases = [  # name, fn, want (or None), graphable
        ("reference fp32 NCHW", lambda: ref_model.encode(x32), want, True),
        ("reference bf16 NCHW", lambda: bf_model.encode(xb), want, True),
        ("ours bf16 CL + embed_head", lambda: cl_model.embed(xcl), want, True),
        ("head unfused bf16", unfused_head, ops.embed_head(*head_args), True),
        ("head embed_head bf16", lambda: ops.embed_head(*head_args), unfused_head(), True),
        ("pooled unfused bf16", pooled_unfused, pooled.encode(x32), True),
        ("pooled_embed op bf16", lambda: pooled_bf.embed(xb), pooled.encode(x32), True),
        ("mean descriptor", lambda: mean_descriptor(xb), None, True),
    ]
    rows = []
    for name, fn, ref, graphable in cases:
        out = fn()
        cos = min_cos(out, ref) if ref is not None else float("nan")
        ok = ref is None or cos >= 0.99
        t_e = time_eager(fn)
        t_g = time_graph(fn) if graphable else float("nan")
        rows.append(dict(name=name, min_cos=cos, ok=ok, eager_us=t_e * 1e6, graph_us=t_g * 1e6))
    base = rows[0]["eager_us"]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  block = {args.frames} x 16 x 60 x 104")
    print(f"{'case':<28} {'ok':>3} {'min cos':>8} {'eager µs':>9} {'graph µs':>9} {'vs ref fp32 eager':>18}")
    for r in rows:
        print(f"{r['name']:<28} {'yes' if r['ok'] else 'NO':>3} {r['min_cos']:>8.4f} {r['eager_us']:>9.1f} "
              f"{r['graph_us']:>9.1f} {base / min(r['eager_us'], r['graph_us']):>17.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    if not all(r["ok"] for r in rows):
        raise SystemExit("some cases disagree with the float32 reference")


if __name__ == "__main__":
    main()
