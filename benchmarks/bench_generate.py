"""Per-block wall time of the generator on CPU, RAG vs native, split into retrieval and the five forwards.

    .venv/bin/python -m pytest benchmarks/bench_generate.py --benchmark-only

Model: a tiny causal Wan (2 layers, dim 64, 2 heads, 16 x 8 x 8 latents, 16 tokens per frame; the geometry of
the official tiny fixtures) with seeded random weights, 40 blocks (120 latent frames) so retrieval is active for
34 of them. ``extra_info`` holds the mean per-block split in ms over the blocks with a retrieval (rag) or the
same blocks (native): ``retrieval`` (top-k + gather into the cache), ``denoise`` (4 forwards), ``rerun`` (the t=0
forward), ``memory`` (embedding + append), and ``retrieval_share`` = retrieval / total.
"""
from __future__ import annotations

import pytest
import torch

from lrag.config import WanConfig
from lrag.models.wan import CausalWanModel
from lrag.pipeline import Pipeline
from lrag_ext import MemoryConfig

BLOCKS = 40


def tiny_model() -> CausalWanModel:
    torch.manual_seed(0)
    cfg = WanConfig(num_layers=2, dim=64, num_heads=2, ffn_dim=128, text_dim=32, text_len=16, latent_height=8,
                    latent_width=8)
    return CausalWanModel(cfg).eval()


@pytest.mark.parametrize("mode", ["native", "rag"])
def test_generate_tiny(benchmark, mode):
    model = tiny_model()
    cfg = model.cfg
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(1))
    pipe = Pipeline(model, retrieval=MemoryConfig())
    results = []

    def run():
        results.append(pipe.generate(text, BLOCKS * cfg.frames_per_block, generator=torch.Generator().manual_seed(2),
                                     mode=mode))

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    res = results[-1]
    assert torch.isfinite(res.latents).all()
    if mode == "rag":
        assert len(res.memory_log) == BLOCKS - 6
    late = res.blocks[6:]
    mean = {key: 1e3 * sum(b.timings[key] for b in late) / len(late)
            for key in ("retrieval", "denoise", "rerun", "memory", "total")}
    benchmark.extra_info.update(provider=mode, blocks=BLOCKS, **{f"{k}_ms": round(v, 3) for k, v in mean.items()},
                                retrieval_share=round(mean["retrieval"] / mean["total"], 4))
