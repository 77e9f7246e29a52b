"""Models shared by the embedder benchmarks (CPU bench_embed.py and GPU gpu_embed.py)."""
from __future__ import annotations

import torch

from lrag_ext.embedder import LatentAE


def perturbed_ae() -> LatentAE:
    """Full-size LatentAE (hidden 64/128/256, D 1024, 60 x 104) in eval mode, with its zero-initialised convs
    randomised so that no residual path is an identity."""
    torch.manual_seed(0)
    model = LatentAE().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    return model
