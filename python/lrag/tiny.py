"""Tiny causal Wan models with seeded, UNTRAINED weights, for tests and benchmarks of the machinery (the block
loop, the cache, retrieval) where what the weights generate does not matter. ``lrag generate --demo`` does not use
them: it runs the trained toy generator (:mod:`lrag.demo`)."""
from __future__ import annotations

import math

import torch
from torch import nn

from lrag.config import WanConfig
from lrag.models.wan import CausalWanModel, LayerNorm, RMSNorm

MODEL_SEED = 11


def tiny_config(latent_size: int = 32) -> WanConfig:
    """2 layers, dim 64, 2 heads, 16 x ``latent_size`` x ``latent_size`` latents, the real schedule (3 frames per
    block, window 12, sink 1)."""
    return WanConfig(num_layers=2, dim=64, num_heads=2, ffn_dim=128, freq_dim=64, text_dim=32, text_len=16,
                     latent_height=latent_size, latent_width=latent_size, frames_per_block=3, window=12, sink=1)


@torch.no_grad()
def seeded_init_(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic re-initialisation of every parameter, as the fixtures' tiny models: weights
    N(0, 1/fan_in), modulation N(0, 1/dim), biases 0.02 N, norm weights 1 + 0.1 N (no zero output head, so
    the flow is not trivially 0)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if name.endswith("modulation"):
            p.copy_(noise / math.sqrt(p.shape[-1]))
        elif isinstance(module, (RMSNorm, LayerNorm)) and name.endswith("weight"):
            p.copy_(1 + 0.1 * noise)
        elif name.endswith("bias"):
            p.copy_(0.02 * noise)
        else:
            p.copy_(noise / math.sqrt(p[0].numel()))
    return model


def tiny_model(cfg: WanConfig, seed: int = MODEL_SEED) -> CausalWanModel:
    """A :class:`CausalWanModel` of ``cfg`` with :func:`seeded_init_` weights, in eval mode."""
    return seeded_init_(CausalWanModel(cfg), seed).eval()
