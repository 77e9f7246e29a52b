"""The built-in demo: a tiny causal Wan model, an embedder and a "text encoder" with seeded, UNTRAINED weights.

It needs no download and runs the whole machinery (block loop, retrieval memory, streaming video, logs, plot)
on a CPU in about a minute. Its frames show what the machinery does, not a meaningful video: the weights are
random. Frames are rendered with :func:`lrag.video.latent_preview` (a fixed 16 -> 3 projection, upsampled),
not the Wan VAE, above a timeline strip showing what the block attended to (:func:`timeline_strip`).
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from torch import nn

from lrag.config import WanConfig
from lrag.models.wan import CausalWanModel, LayerNorm, RMSNorm
from lrag.video import latent_preview

MODEL_SEED = 11
EMBED_SEED = 26
DEMO_EMBED_DIM = 64          # the demo embedder's key size
DEMO_EMBED_GRID = 4          # its pooling grid: the demo latents must be at least this large


def demo_config(latent_size: int = 32) -> WanConfig:
    """The demo's geometry: 2 layers, dim 64, 2 heads, 16 x ``latent_size`` x ``latent_size`` latents, the
    real schedule (3 frames per block, window 12, sink 1)."""
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


def demo_model(cfg: WanConfig, seed: int = MODEL_SEED) -> CausalWanModel:
    return seeded_init_(CausalWanModel(cfg), seed).eval()


def demo_embedder(cfg: WanConfig, seed: int = EMBED_SEED):
    """A :class:`lrag_ext.embedder.PooledEmbedder` (4 x 4 average pool -> Linear -> 64-d, normalised) with
    seeded weights: untrained, it shows retrieval running, not good keys."""
    from lrag_ext.embedder import PooledEmbedder  # noqa: PLC0415  (the compiled embedder ops)

    return seeded_init_(PooledEmbedder(in_channels=cfg.in_dim, grid=DEMO_EMBED_GRID, latent_dim=DEMO_EMBED_DIM),
                        seed).eval()


def demo_text(prompt: str, cfg: WanConfig) -> torch.Tensor:
    """A stand-in for the text encoder: ``[1, text_len, text_dim]`` normal values seeded by the prompt's CRC32,
    so the same prompt always gives the same "embedding" and different prompts different ones."""
    g = torch.Generator().manual_seed(zlib.crc32(prompt.encode("utf-8")))
    return torch.randn((1, cfg.text_len, cfg.text_dim), generator=g)


STRIP_HEIGHT = 16
COLOURS = {"empty": (24, 24, 24), "past": (90, 90, 90), "window": (60, 120, 255), "retrieved": (255, 160, 0),
           "block": (255, 255, 255)}


def timeline_strip(width: int, total_frames: int, start: int, frames: int, sink: int, local: int,
                   retrieved: list[int]) -> np.ndarray:
    """``uint8 [STRIP_HEIGHT, width, 3]``: one column range per latent frame of the whole video, coloured by
    its role for the block ``[start, start + frames)``: not generated yet (near black), generated (grey), attended
    from the cache (blue: the sink and the last ``local`` frames of the window), retrieved (orange), the block
    itself (white)."""
    role = ["empty"] * total_frames
    end = start + frames
    role[:end] = ["past"] * end
    for f in list(range(min(sink, end))) + list(range(max(sink, end - local), end)):
        role[f] = "window"
    for f in retrieved:
        role[f] = "retrieved"
    role[start:end] = ["block"] * frames
    strip = np.empty((STRIP_HEIGHT, width, 3), dtype=np.uint8)
    for f, name in enumerate(role):
        x0 = f * width // total_frames
        x1 = max((f + 1) * width // total_frames, x0 + 1)
        strip[:, x0:x1] = COLOURS[name]
    strip[:2] = 0                                    # a dark line between the frame and the strip
    return strip


class DemoRenderer:
    """Renders a demo block: :func:`latent_preview` frames with a :func:`timeline_strip` underneath.

    ``mode`` decides the attended local window: ``window - sink - top_k`` frames in ``rag`` mode (the retrieval
    model's shortened window), ``window - sink`` in ``native`` mode.
    """

    def __init__(self, cfg: WanConfig, mode: str, total_frames: int, top_k: int, scale: int):
        self.cfg, self.total, self.scale = cfg, total_frames, scale
        self.local = cfg.window - cfg.sink - (top_k if mode == "rag" else 0)

    def __call__(self, block) -> np.ndarray:
        frames = latent_preview(block.latents[0], scale=self.scale)
        rec = block.memory_record
        retrieved = rec["selected_global_frames"][0] if rec is not None else []
        strip = timeline_strip(frames.shape[2], self.total, block.start_frame, block.latents.shape[1],
                               self.cfg.sink, self.local, retrieved)
        return np.concatenate([frames, np.broadcast_to(strip, (len(frames), *strip.shape))], axis=1)
