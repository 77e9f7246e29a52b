"""Training losses of the LongLive-RAG embedder (SPEC.md §5), on chunks of S consecutive latent frames.

With raw (unnormalised) embeddings ``z [B, S, D]`` of a chunk ``x [B, S, C, H, W]``:

    L_rec    = MSE(D(E(x)), x)
    L_delta  = λ_Δ · mean_{k=1..w'} mean_{b,t} max(0, cos(z_{t+k}, z_t) − m),   w' = min(S − 1, w)
    L_smooth = mean_{b,t} sqrt(|z_{t+2} − 2 z_{t+1} + z_t|² + 1e−8)        (0 when S < 3)
    L_total  = L_rec + L_delta + λ_s · L_smooth

``L_delta`` is reported already multiplied by λ_Δ, as the reference's ``TemporalDeltaLoss`` does (so the
reconstruction-only ablation reports ``L_delta = 0``). Defaults m = 0.85, w = 3, λ_Δ = λ_s = 1.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

SMOOTH_EPS = 1e-8
COS_EPS = 1e-8


class LossTerms(NamedTuple):
    total: torch.Tensor
    rec: torch.Tensor
    delta: torch.Tensor
    smooth: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {name: float(value.detach()) for name, value in zip(("total", "rec", "delta", "smooth"), self)}


def _check_seq(z: torch.Tensor) -> None:
    if z.dim() != 3:
        raise ValueError(f"z must be [B, S, D] embeddings of chunks, got shape {tuple(z.shape)}")


def delta_hinge_per_offset(z: torch.Tensor, margin: float = 0.85, window: int = 3) -> torch.Tensor:
    """``[w']``: for each offset k = 1..w', ``mean_{b,t} max(0, cos(z_{t+k}, z_t) − margin)``; w' = min(S−1, w).

    Cosine is ``F.cosine_similarity`` (eps 1e-8). Empty (``[0]``) when S < 2.
    """
    _check_seq(z)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    w = min(z.shape[1] - 1, window)
    terms = [F.relu(F.cosine_similarity(z[:, k:], z[:, :-k], dim=-1, eps=COS_EPS) - margin).mean()
             for k in range(1, w + 1)]
    return torch.stack(terms) if terms else z.new_zeros(0)


def window_temporal_delta_loss(z: torch.Tensor, margin: float = 0.85, window: int = 3,
                               weight: float = 1.0) -> torch.Tensor:
    """Window Temporal Delta Loss ``weight · mean_k hinge_k`` (see the module docstring); 0 when S < 2.

    Penalises neighbouring frames (up to ``window`` apart) whose embeddings are more similar than ``margin``, so
    that consecutive frames stay distinguishable for retrieval.

    Args:
        z: ``[B, S, D]`` raw embeddings of B chunks of S consecutive frames.
    """
    per = delta_hinge_per_offset(z, margin, window)
    if per.numel() == 0:
        return z.new_zeros(())
    return weight * per.mean()


def smoothness_loss(z: torch.Tensor) -> torch.Tensor:
    """``mean_{b,t} sqrt(|z_{t+2} − 2 z_{t+1} + z_t|² + 1e−8)`` over ``z [B, S, D]``; 0 when S < 3."""
    _check_seq(z)
    if z.shape[1] < 3:
        return z.new_zeros(())
    acc = z[:, 2:] - 2 * z[:, 1:-1] + z[:, :-2]
    return torch.sqrt(acc.pow(2).sum(-1) + SMOOTH_EPS).mean()


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mean((recon − x)²)``."""
    return F.mse_loss(recon, x)


def embedder_losses(model: torch.nn.Module, chunk: torch.Tensor, margin: float = 0.85, window: int = 3,
                    delta_weight: float = 1.0, smooth_weight: float = 1.0) -> LossTerms:
    """All loss terms of one batch of chunks ``[B, S, C, H, W]``.

    ``model(frames [N, C, H, W])`` must return ``(recon or None, z_raw [N, D])``; a model without a decoder
    (the pooled embedder) returns ``None`` and gets ``L_rec = 0``.
    """
    if chunk.dim() != 5:
        raise ValueError(f"chunk must be [B, S, C, H, W], got shape {tuple(chunk.shape)}")
    B, S = chunk.shape[:2]
    frames = chunk.reshape(B * S, *chunk.shape[2:])
    recon, z = model(frames)
    rec = reconstruction_loss(recon.float(), frames.float()) if recon is not None else frames.new_zeros((), dtype=torch.float32)
    z = z.float().view(B, S, -1)
    delta = window_temporal_delta_loss(z, margin, window, delta_weight)
    smooth = smoothness_loss(z)
    return LossTerms(rec + delta + smooth_weight * smooth, rec, delta, smooth)
