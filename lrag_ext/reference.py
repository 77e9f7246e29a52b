"""Pure-PyTorch definitions of every lrag_ext op.

These functions *are* the semantics: the compiled kernels are tested against them, the benchmarks use them as
the baseline, and :mod:`lrag_ext.ops` falls back to them on a device the compiled module was not built for.
They favour clarity over speed and do no argument checking beyond what PyTorch itself does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

COSINE_EPS = 1e-8


def cosine_topk(queries: torch.Tensor, pages: torch.Tensor, page_table: torch.Tensor, lo: torch.Tensor,
                hi: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarity of each stream's query over its eligible paged history.

    Logical entry ``i`` of stream ``b`` is ``pages[page_table[b, i // page_size], i % page_size]``; it is eligible
    when ``lo[b] <= i < hi[b]``. Its score is ``dot(q, e) / ((|q| + 1e-8) * (|e| + 1e-8))`` in float32 (the
    LongLive-RAG release normalises both sides with the same epsilon).

    Args:
        queries: ``[B, D]`` float tensor.
        pages: ``[P, page_size, D]``, the physical pool.
        page_table: ``[B, max_pages]`` int32.
        lo, hi: ``[B]`` int64 half-open eligible ranges.
        k: number of results per stream (>= 1).

    Returns:
        ``scores [B, k]`` float32 sorted descending (NaN first, as ``torch.sort``), ties broken by the lower id;
        ``ids [B, k]`` int64 logical ids. When fewer than k entries are eligible the tail is ``(-inf, -1)``.
    """
    B = queries.shape[0]
    P, page_size, _ = pages.shape
    capacity = page_table.shape[1] * page_size
    device = queries.device
    ids = torch.arange(capacity, device=device)
    eligible = (ids[None, :] >= lo[:, None]) & (ids[None, :] < hi[:, None])          # [B, cap]
    page = page_table.long()[:, ids // page_size].clamp(0, max(P - 1, 0))             # [B, cap]
    if P > 0:
        emb = pages[page, (ids % page_size)[None, :].expand(B, -1)].float()            # [B, cap, D]
    else:
        emb = pages.new_zeros((B, capacity, pages.shape[2]), dtype=torch.float32)
    q = queries.float()
    qn = q / (q.norm(dim=-1, keepdim=True) + COSINE_EPS)
    en = emb / (emb.norm(dim=-1, keepdim=True) + COSINE_EPS)
    scores = (en @ qn[:, :, None]).squeeze(-1)                                         # [B, cap]

    # Rank: eligible first, then by score descending; stable sorts keep ties in ascending id order.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(eligible.gather(1, order).to(torch.uint8), dim=1, descending=True,
                                       stable=True).indices)
    n = min(k, capacity)
    top = order[:, :n]
    top_scores = scores.gather(1, top)
    top_ok = eligible.gather(1, top)
    out_scores = torch.full((B, k), float("-inf"), dtype=torch.float32, device=device)
    out_ids = torch.full((B, k), -1, dtype=torch.int64, device=device)
    out_scores[:, :n] = torch.where(top_ok, top_scores, out_scores[:, :n])
    out_ids[:, :n] = torch.where(top_ok, ids[top], out_ids[:, :n])
    return out_scores, out_ids


NORMALIZE_EPS = 1e-12  # F.normalize's clamp, which the reference LatentAE.encode uses


def embed_head(feat: torch.Tensor, gn_weight: torch.Tensor, gn_bias: torch.Tensor, fc_weight: torch.Tensor,
               fc_bias: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """The LatentAE encoder's tail: GroupNorm -> SiLU -> global average pool -> Linear -> L2-normalise.

    ``y = silu(group_norm(feat, groups, gn_weight, gn_bias, eps))``, ``p = mean_{h,w} y`` ``[N, C]``,
    ``z = p @ fc_weight.T + fc_bias``, result ``z / max(|z|, 1e-12)``; computed in float64, returned as float32.

    Args:
        feat: ``[N, C, H, W]`` trunk features (any memory format). gn_weight, gn_bias: ``[C]``.
        fc_weight: ``[D, C]``; fc_bias: ``[D]``. groups: divides C. eps: GroupNorm epsilon.

    Returns:
        ``[N, D]`` float32 unit-norm embeddings.
    """
    # GroupNorm written out in float64 (F.group_norm refuses one value per group, which is well defined here).
    N, C = feat.shape[:2]
    x = feat.double().reshape(N, groups, -1)
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).pow(2).mean(dim=-1, keepdim=True)
    y = ((x - mean) / torch.sqrt(var + eps)).reshape(feat.shape)
    y = F.silu(y * gn_weight.double()[:, None, None] + gn_bias.double()[:, None, None])
    z = F.linear(y.mean(dim=(2, 3)), fc_weight.double(), fc_bias.double())
    return F.normalize(z, dim=-1, eps=NORMALIZE_EPS).float()


def adaptive_bins(size: int, grid: int) -> list[tuple[int, int]]:
    """The half-open bins of ``torch.nn.functional.adaptive_avg_pool2d`` along one axis:
    bin ``i`` covers ``[floor(i * size / grid), ceil((i + 1) * size / grid))`` (bins overlap when ``grid``
    does not divide ``size``)."""
    return [((i * size) // grid, -((-(i + 1) * size) // grid)) for i in range(grid)]


def pooled_embed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grid: int) -> torch.Tensor:
    """The light embedder: adaptive-average-pool each frame to ``grid x grid`` -> Linear -> L2-normalise.

    ``f[n, c, i, j] = mean of x[n, c, rows(i), cols(j)]`` with the bins of :func:`adaptive_bins` (exactly
    ``adaptive_avg_pool2d``), flattened channel-major to ``[N, C * grid * grid]``;
    ``z = f @ weight.T + bias``; result ``z / max(|z|, 1e-12)``; all in float32.

    Args:
        x: ``[N, C, H, W]`` latent frames; weight: ``[D, C * grid * grid]``; bias: ``[D]``; grid: ``1 <= grid <=
            min(H, W)``.

    Returns:
        ``[N, D]`` float32 unit-norm embeddings.
    """
    f = F.adaptive_avg_pool2d(x.float(), grid).flatten(1)
    return F.normalize(F.linear(f, weight.float(), bias.float()), dim=-1, eps=NORMALIZE_EPS)


def mean_descriptor(x: torch.Tensor) -> torch.Tensor:
    """The reference's fallback descriptor when no embedder is loaded: the spatial mean ``[N, C]`` of
    ``x [N, C, H, W]`` (float32, not normalised; retrieval normalises it)."""
    return x.float().mean(dim=(2, 3))
