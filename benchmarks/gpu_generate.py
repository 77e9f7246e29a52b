"""Retrieval overhead of the generator at the real Wan2.1-1.3B geometry on a GPU (random weights, bf16).

    python benchmarks/gpu_generate.py [--seconds 120] [--device-frames 32] [--host-frames 160]

Runs LongLive-RAG (``rag``) for ``--seconds`` of video (4 latent frames a second, 3 per block) and prints, every
40 blocks, the mean per-block time of retrieval (top-k + gather into the cache), memory (embedding + append),
the 4 denoising forwards and the context rerun, and retrieval + memory as a share of the block. K/V of one frame
is 287.5 MB at this geometry, so the memory keeps ``--device-frames`` on the GPU and at most ``--host-frames`` in
pinned host memory (older frames are dropped: they stay searchable only through their embeddings' history range).
No checkpoint is needed: weights are random, which changes nothing about the cost.
"""
from __future__ import annotations

import argparse

import torch

from lrag.config import wan_1_3b
from lrag.models.wan import CausalWanModel
from lrag.pipeline import Pipeline
from lrag_ext import MemoryConfig


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--device-frames", type=int, default=32)
    ap.add_argument("--host-frames", type=int, default=160)
    args = ap.parse_args()
    cfg = wan_1_3b()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CausalWanModel(cfg).to(torch.bfloat16).eval()
    blocks = int(round(args.seconds * 4 / cfg.frames_per_block))
    text = torch.randn(1, cfg.text_len, cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    pipe = Pipeline(model, retrieval=MemoryConfig(device_frames=args.device_frames, host_frames=args.host_frames))
    rows = []

    def on_block(block):
        rows.append(block.timings)
        if (block.index + 1) % 40 == 0 or block.index + 1 == blocks:
            recent = rows[-40:]
            mean = {k: 1e3 * sum(r[k] for r in recent) / len(recent) for k in recent[0]}
            share = (mean["retrieval"] + mean["memory"]) / mean["total"]
            print(f"blocks {block.index + 1 - len(recent):4d}-{block.index:4d} (history {block.start_frame:4d} frames): "
                  f"retrieval {mean['retrieval']:7.2f} ms  memory {mean['memory']:7.2f} ms  "
                  f"denoise {mean['denoise']:8.1f} ms  rerun {mean['rerun']:7.1f} ms  total {mean['total']:8.1f} ms  "
                  f"overhead {100 * share:5.2f} %", flush=True)

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  {blocks} blocks")
    pipe.generate(text, blocks * cfg.frames_per_block, generator=torch.Generator("cuda").manual_seed(0), mode="rag",
                  callback=on_block)


if __name__ == "__main__":
    main()
