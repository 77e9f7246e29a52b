"""Pure-PyTorch definitions of every lrag_ext op.

These functions *are* the semantics: the compiled kernels are tested against them, the benchmarks use them as
the baseline, and :mod:`lrag_ext.ops` falls back to them on a device the compiled module was not built for.
They favour clarity over speed and do no argument checking beyond what PyTorch itself does.
"""
from __future__ import annotations

import torch

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
