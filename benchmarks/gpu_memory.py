"""Per-block retrieval cost of lrag_ext.RetrievalMemory on a GPU at the real Wan2.1-1.3B K/V geometry.

    python benchmarks/gpu_memory.py [--quick]

K/V of one frame: 30 layers x 2 x 1560 tokens x 12 heads x 128 (bf16) = 287.5 MB. For each history length the
memory holds every frame's 1024-d embedding and the K/V of the newest frames in two tiers; a block's retrieve +
gather (6 frames, ~1.7 GB written into the cache's memory slots) is timed with CUDA events, with the selected
frames served from the device tier and, in a second configuration, from the pinned host tier. The baseline is
the reference release's way: per-frame, per-layer host tensors copied to the GPU on every one of the 5 forwards
and every layer (~8.6 GB per block), timed for one block. ``--quick`` (the size bound of gpu_check.sh) leaves out
the 5000-frame history (its 5000 appends) and times the baseline once instead of three times.
"""
from __future__ import annotations

import argparse

import torch

import lrag_ext
from _gpu_timing import median_ms

L, T, H, D = 30, 1560, 12, 128
K, R, SINK, WINDOW, EMBED = 6, 5, 1, 12, 1024


def build(history, device_frames, host_frames, frame_kv):
    layout = lrag_ext.KVLayout(num_layers=L, tokens_per_frame=T, num_heads=H, head_dim=D)
    mem = lrag_ext.RetrievalMemory(lrag_ext.MemoryConfig(
        top_k=K, recent_exclude=R, sink_frames=SINK, window_frames=WINDOW, embed_dim=EMBED, kv_layout=layout,
        device="cuda", dtype=torch.bfloat16, max_frames=history + 64, page_size=64, device_frames=device_frames,
        host_frames=host_frames))
    s = mem.add_stream()
    g = torch.Generator("cuda").manual_seed(0)
    for _ in range(history):
        mem.append(s, torch.randn(1, EMBED, device="cuda", generator=g), k=frame_kv, v=frame_kv)
    return mem, s


def measure(built, cache_k, cache_v) -> tuple[float, int]:
    """Median ms of one block's retrieve + gather on a built (memory, stream), and the frames it selects."""
    mem, s = built
    ms = median_ms(lambda: mem.gather(mem.retrieve([s]), cache_k, cache_v), iters=10)
    return ms, mem.retrieve([s]).counts[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the 5000-frame history; one timed baseline block")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    frame_kv = torch.randn(L, 1, T, H, D, device="cuda", dtype=torch.bfloat16)
    cache_k = torch.zeros(L, 1, WINDOW, T, H, D, device="cuda", dtype=torch.bfloat16)
    cache_v = torch.zeros_like(cache_k)
    gb = 2 * K * frame_kv.numel() * 2 / 1e9
    # The newest K/V frames fit the tiers; retrieval reaches the frames >= R + window old that are still stored.
    cases = ((480, 40, 0, "device"), (480, 4, 36, "host")) + (() if args.quick else ((5000, 40, 0, "device"),))
    for history, dev, host, where in cases:
        ms, count = measure(build(history, dev, host, frame_kv), cache_k, cache_v)
        torch.cuda.empty_cache()  # the memory built for this case is gone with measure()'s frame
        print(f"history {history:5d}  frames from {where:6s} tier: retrieve+gather {ms:8.2f} ms "
              f"({count} frames, {gb:.2f} GB moved, {gb / ms * 1e3:.0f} GB/s)")
    # Baseline: the release's per-forward, per-layer host->device copies of the retrieved frames' K/V.
    host_k = [[frame_kv[l, 0].cpu() for l in range(L)] for _ in range(K)]

    def release_block():
        for _forward in range(5):
            for layer in range(L):
                for j in range(K):
                    cache_k[layer, 0, SINK + j].copy_(host_k[j][layer], non_blocking=True)
                    cache_v[layer, 0, SINK + j].copy_(host_k[j][layer], non_blocking=True)

    ms = median_ms(release_block, iters=1 if args.quick else 3, warmup=1)
    print(f"release baseline (5 forwards x 30 layers x 6 frames H2D from pageable memory): {ms:8.2f} ms per block")


if __name__ == "__main__":
    main()
