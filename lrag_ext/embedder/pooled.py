"""PooledEmbedder: the microsecond alternative to the LatentAE encoder.

``z = W · flatten(adaptive_avg_pool2d(x, grid)) + b`` per frame, normalised for retrieval. Trained with the same
Window Temporal Delta + smoothness losses as the LatentAE (there is no decoder, so no reconstruction term);
inference runs the fused ``pooled_embed`` op, which reads each frame once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lrag_ext.embedder.model import LossFields, write_rows


@dataclass
class PooledConfig(LossFields):
    """Architecture (``in_channels``, ``grid``, ``latent_dim``) and loss weights of a :class:`PooledEmbedder`."""
    in_channels: int = 16
    grid: int = 4
    latent_dim: int = 256
    encoder: str = "pooled"

    def validate(self) -> None:
        self.check_positive("in_channels", "grid", "latent_dim", "delta_window")
        if self.encoder != "pooled":
            raise ValueError(f"PooledConfig.encoder must be 'pooled', got {self.encoder!r}")


class PooledEmbedder(nn.Module):
    """Average-pool to ``grid x grid`` -> Linear(``in_channels * grid²`` -> ``latent_dim``).

    ``forward(x [N, C, H, W]) -> (None, z_raw [N, latent_dim])`` (the training interface shared with
    :class:`LatentAE`, with no reconstruction); :meth:`embed` is the fused, normalised inference path.
    """

    def __init__(self, cfg: PooledConfig | None = None, **overrides):
        super().__init__()
        cfg = PooledConfig.resolve(cfg, **overrides)
        self.config = cfg
        self.fc = nn.Linear(cfg.in_channels * cfg.grid * cfg.grid, cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, self.fc(F.adaptive_avg_pool2d(x, self.config.grid).flatten(1))

    def encode(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Differentiable embeddings ``[N, latent_dim]`` (normalised with ``F.normalize`` if asked)."""
        z = self.forward(x)[1]
        return F.normalize(z, dim=-1) if normalize else z

    @torch.no_grad()
    def embed(self, frames: torch.Tensor, out: torch.Tensor | None = None,
              rows: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised float32 embeddings ``[N, latent_dim]`` of frames ``[N, C, H, W]`` via the fused op;
        ``out``/``rows`` as in :meth:`LatentAE.embed`."""
        from lrag_ext.ops import pooled_embed  # noqa: PLC0415  (ops need the compiled module)
        result = pooled_embed(frames.to(self.fc.weight.dtype), self.fc.weight, self.fc.bias, self.config.grid)
        return write_rows(result, out, rows)
