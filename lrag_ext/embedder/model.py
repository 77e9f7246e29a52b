"""The LatentAE embedding network of LongLive-RAG, with the official module layout and state-dict names.

Layout (``hidden_dims = [w_0, ..., w_{L-1}]``), matching the released checkpoints key for key:

- ``encoder.conv_stack``: per width ``w_i``: ``Conv2d(3x3, stride 2, pad 1) -> GroupNorm -> SiLU -> ResBlock``
  (indices 4i .. 4i+3);
- ``encoder.final_norm``: ``GroupNorm -> SiLU``; global average pool; ``encoder.fc``: ``Linear(w_{L-1} -> D)``;
- ``decoder.fc``: ``Linear(D -> w_{L-1} * h_b * w_b) -> SiLU``, reshaped to the bottleneck ``[w_{L-1}, h_b, w_b]``;
- ``decoder.upsample_stack``: per consecutive pair ``(w_{i}, w_{i-1})`` of the reversed widths:
  ``Upsample(nearest x2) -> Conv2d 3x3 -> GroupNorm -> SiLU -> ResBlock`` (indices 5j .. 5j+4);
- ``decoder.final``: ``Upsample(nearest x2) -> Conv2d 3x3 (-> in_channels)``, cropped to the top-left ``H x W``.

Each stride-2 conv maps a size ``s`` to ``ceil(s / 2)``, so the bottleneck is ``ceil(H / 2^L) x ceil(W / 2^L)`` and
the decoder output ``2^L`` times that, never smaller than the input.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

GROUP_CANDIDATES = (32, 16, 8, 4, 1)
GN_EPS = 1e-5  # torch.nn.GroupNorm's default, which the reference uses


def num_groups(channels: int) -> int:
    """The GroupNorm group count of the reference: the first of 32, 16, 8, 4, 1 that divides ``channels``."""
    return next(g for g in GROUP_CANDIDATES if channels % g == 0)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels), channels, eps=GN_EPS)


def downsampled(size: int, stages: int) -> int:
    """Spatial size after ``stages`` stride-2 3x3 convs with padding 1 (each maps ``s`` to ``ceil(s / 2)``)."""
    for _ in range(stages):
        size = (size + 1) // 2
    return size


class ConfigBase:
    """Dict round-trip and validation helpers shared by the embedder config dataclasses."""

    @classmethod
    def from_dict(cls, cfg: dict):
        """Builds a config from a (possibly larger) dict, ignoring keys that are not fields of this class."""
        names = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in cfg.items() if k in names})
        out.validate()
        return out

    @classmethod
    def resolve(cls, cfg=None, **overrides):
        """``cfg`` (default: the class defaults) with ``overrides`` applied, validated."""
        base = cfg.to_dict() if cfg is not None else {}
        out = cls(**{**base, **overrides})
        out.validate()
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    def check_positive(self, *names: str) -> None:
        for name in names:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class LossFields(ConfigBase):
    """The loss weights every embedder config carries (SPEC.md §5 defaults)."""
    delta_margin: float = 0.85
    delta_weight: float = 1.0
    delta_window: int = 3
    smooth_weight: float = 1.0


@dataclass
class AEConfig(LossFields):
    """The LatentAE fields of the reference's ``AEConfig`` (architecture and loss weights).

    The released checkpoints carry ``vars(AEConfig)`` with many more (training, logging) fields; use
    :meth:`from_dict` to take only these.
    """
    hidden_dims: list[int] = field(default_factory=lambda: [64, 128, 256])
    latent_dim: int = 1024
    in_channels: int = 16
    spatial_h: int = 60
    spatial_w: int = 104

    def validate(self) -> None:
        if not self.hidden_dims or any(int(w) < 1 for w in self.hidden_dims):
            raise ValueError(f"hidden_dims must be a non-empty list of positive widths, got {self.hidden_dims}")
        self.check_positive("latent_dim", "in_channels", "spatial_h", "spatial_w", "delta_window")


class ResBlock(nn.Module):
    """Pre-norm residual block ``x + conv(silu(gn(conv(silu(gn(x))))))``; the last conv starts at zero."""

    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                   group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))
        nn.init.zeros_(self.block[5].weight)
        nn.init.zeros_(self.block[5].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    """``[N, C_in, H, W] -> [N, latent_dim]`` raw (unnormalised) embeddings."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        layers, prev = [], cfg.in_channels
        for width in cfg.hidden_dims:
            layers += [nn.Conv2d(prev, width, 3, stride=2, padding=1), group_norm(width), nn.SiLU(), ResBlock(width)]
            prev = width
        self.conv_stack = nn.Sequential(*layers)
        self.final_norm = nn.Sequential(group_norm(prev), nn.SiLU())
        self.fc = nn.Linear(prev, cfg.latent_dim)
        stages = len(cfg.hidden_dims)
        self.feat_shape = (prev, downsampled(cfg.spatial_h, stages), downsampled(cfg.spatial_w, stages))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution trunk: ``[N, C_in, H, W] -> [N, C, h_b, w_b]`` (the input of the head)."""
        return self.conv_stack(x)

    def head(self, feat: torch.Tensor) -> torch.Tensor:
        """GroupNorm -> SiLU -> global average pool -> Linear, unfused (the reference path, differentiable)."""
        return self.fc(self.final_norm(feat).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class Decoder(nn.Module):
    """``[N, latent_dim] -> [N, C_in, H, W]`` reconstruction (training only)."""

    def __init__(self, cfg: AEConfig, feat_shape: tuple[int, int, int]):
        super().__init__()
        self.feat_shape = feat_shape
        self.out_hw = (cfg.spatial_h, cfg.spatial_w)
        self.fc = nn.Sequential(nn.Linear(cfg.latent_dim, feat_shape[0] * feat_shape[1] * feat_shape[2]), nn.SiLU())
        widths = list(reversed(cfg.hidden_dims))
        layers = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1),
                       group_norm(cout), nn.SiLU(), ResBlock(cout)]
        self.upsample_stack = nn.Sequential(*layers)
        self.final = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                   nn.Conv2d(widths[-1], cfg.in_channels, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(z.shape[0], *self.feat_shape)
        x = self.final(self.upsample_stack(x))
        h, w = self.out_hw
        return x[:, :, :h, :w]


class LatentAE(nn.Module):
    """Encoder + decoder over single latent frames ``[N, in_channels, spatial_h, spatial_w]``.

    ``forward(x) -> (recon, z_raw)``; :meth:`encode` gives (optionally L2-normalised) embeddings;
    :meth:`embed` is the inference path (fused head, normalised, no decoder work).
    """

    def __init__(self, cfg: AEConfig | None = None, **overrides):
        super().__init__()
        cfg = AEConfig.resolve(cfg, **overrides)
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg, self.encoder.feat_shape)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return self.decoder(z), z

    def encode(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embeddings ``[N, latent_dim]`` of frames ``[N, C, H, W]`` through the unfused (differentiable) path.

        ``normalize=True`` divides by ``max(|z|, 1e-12)`` (``F.normalize``)."""
        z = self.encoder(x)
        return F.normalize(z, dim=-1) if normalize else z

    @torch.no_grad()
    def embed(self, frames: torch.Tensor, out: torch.Tensor | None = None,
              rows: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised embeddings ``[N, latent_dim]`` (float32) of frames ``[N, C, H, W]``: conv trunk, then the
        fused ``embed_head`` op. Inference only (no autograd, no decoder work); frames are cast to the model's
        dtype. With ``out [M, latent_dim]`` and ``rows [N]`` (int64), also writes ``out[rows] = result``
        (cast to ``out.dtype``), e.g. into history slots."""
        from lrag_ext.ops import embed_head  # noqa: PLC0415  (ops need the compiled module)
        feat = self.encoder.trunk(frames.to(self.encoder.fc.weight.dtype))
        norm = self.encoder.final_norm[0]
        result = embed_head(feat, norm.weight, norm.bias, self.encoder.fc.weight, self.encoder.fc.bias,
                            norm.num_groups, norm.eps)
        return write_rows(result, out, rows)


def write_rows(result: torch.Tensor, out: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
    """``out[rows] = result`` (cast) when ``out`` is given; returns ``result``. Checks shapes before writing."""
    if out is None:
        if rows is not None:
            raise ValueError("rows given without out")
        return result
    if rows is None or rows.dim() != 1 or rows.shape[0] != result.shape[0]:
        raise ValueError(f"rows must be a 1-D index tensor of length {result.shape[0]} when out is given")
    if out.dim() != 2 or out.shape[1] != result.shape[1]:
        raise ValueError(f"out must be [M, {result.shape[1]}], got {tuple(out.shape)}")
    out.index_copy_(0, rows.to(out.device, torch.int64), result.to(out.device, out.dtype))
    return result
