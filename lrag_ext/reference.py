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
        ``[N, D]`` float32 unit-norm embeddings (``[0, D]`` for an empty batch, as the kernels).
    """
    # GroupNorm written out in float64 (F.group_norm refuses one value per group, which is well defined here).
    # The group size is spelled out, not -1: an empty batch (N = 0) cannot infer it, and must give [0, D].
    N, C, H, W = feat.shape
    x = feat.double().reshape(N, groups, (C // groups) * H * W)
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


# ---------------------------------------------------------------------------------------------------------------
# Paged KV pool: write_kv, gather_kv and the temporal RoPE rotation they use.
# Pool layout: [num_slots, layers, 2 (K, V), tokens, heads, head_dim].

ROPE_THETA = 10000.0


def wan_temporal_pairs(head_dim: int) -> int:
    """Temporal RoPE pairs of Wan's split ``[c - 2(c//3) | c//3 | c//3]`` of ``c = head_dim // 2`` pairs."""
    c = head_dim // 2
    return c - 2 * (c // 3)


def rope_inv_freq(pairs: int, theta: float = ROPE_THETA, device=None) -> torch.Tensor:
    """``[pairs]`` float64 frequencies of one RoPE axis, as Wan's ``rope_params(_, 2 * pairs)``:
    ``omega_j = 1 / theta^(2j / (2 * pairs))``."""
    return 1.0 / torch.pow(torch.tensor(theta, dtype=torch.float64, device=device),
                           torch.arange(0, 2 * pairs, 2, dtype=torch.float64, device=device) / (2 * pairs))


def rope_rotate_temporal(x: torch.Tensor, delta: torch.Tensor, pairs: int,
                         theta: float = ROPE_THETA) -> torch.Tensor:
    """Rotates the first ``pairs`` RoPE pairs of ``x`` by ``delta`` positions, in float64.

    Pair ``j`` (real dims ``2j, 2j+1``) is multiplied, as a complex number, by ``exp(i * delta * omega_j)``
    (:func:`rope_inv_freq`); the other dims are unchanged. Entries with ``delta == 0`` are returned unchanged.

    Args:
        x: ``[E, ..., head_dim]`` float tensor.
        delta: ``[E]`` integer positions.
        pairs: temporal pairs (``0 <= pairs <= head_dim // 2``).
        theta: RoPE base.

    Returns:
        ``x`` as float64 with its temporal pairs rotated.
    """
    out = x.to(torch.float64).clone()
    if pairs == 0 or x.shape[0] == 0:
        return out
    lead = out[..., : 2 * pairs].reshape(*out.shape[:-1], pairs, 2)
    angle = delta.to(device=x.device, dtype=torch.float64).reshape(-1, *([1] * (x.dim() - 1))) * \
        rope_inv_freq(pairs, theta, x.device)                                           # [E, 1.., pairs]
    rotated = torch.view_as_real(torch.view_as_complex(lead.contiguous()) *
                                 torch.polar(torch.ones_like(angle), angle))
    moved = (delta != 0).to(x.device).reshape(-1, *([1] * x.dim()))
    out[..., : 2 * pairs] = torch.where(moved, rotated, lead).flatten(-2)
    return out


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_quantise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame float8_e4m3fn quantisation of ``x [n, layers, tokens, heads, head_dim]``.

    Returns ``(q, scale)``: ``scale [n, layers]`` float32 ``= amax(|x|) / 448`` over the FINITE values of each
    frame's layer (1 when that amax is 0) and ``q = (x / scale).to(float8_e4m3fn)``, so that
    ``q.float() * scale ~= x``. A NaN or inf cannot poison its frame's scale: it is left out of the amax, so
    every finite value of the frame keeps its precision; NaN is stored as the fp8 NaN and +-inf saturates to
    +-448 (float8_e4m3fn has no infinity; this is torch's cast and the kernels').
    """
    x = x.float()
    amax = torch.where(torch.isfinite(x), x.abs(), 0.0).amax(dim=(-3, -2, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x / scale[..., None, None, None]).to(torch.float8_e4m3fn), scale


def write_kv(pool: torch.Tensor, src_k: torch.Tensor, src_v: torch.Tensor, slots: torch.Tensor,
             pool_scale: torch.Tensor | None = None) -> None:
    """``pool[slots[i], l, 0] = src_k[l, i]`` and ``pool[slots[i], l, 1] = src_v[l, i]``, cast to the pool dtype;
    frames with ``slots[i] == -1`` are skipped. Mutates ``pool`` (and ``pool_scale``).

    A float8_e4m3fn pool stores :func:`fp8_quantise` of each frame and its scales in
    ``pool_scale[slots[i], l, 0 | 1]``.

    Args:
        pool: ``[num_slots, layers, 2, tokens, heads, head_dim]``.
        src_k, src_v: ``[layers, n, tokens, heads, head_dim]``.
        slots: ``[n]`` int64, distinct apart from -1.
        pool_scale: ``[num_slots, layers, 2]`` float32, with a float8_e4m3fn pool only.
    """
    keep = (slots >= 0).to(src_k.device)
    dst = slots[slots >= 0].to(pool.device)
    for kv, src in enumerate((src_k, src_v)):
        frames = src[:, keep].transpose(0, 1).to(pool.device)                 # [n', layers, T, H, hd]
        if pool.dtype == torch.float8_e4m3fn:  # indexing kernels do not all take fp8: move its bytes
            q, scale = fp8_quantise(frames)
            pool_scale[dst, :, kv] = scale
            pool.view(torch.uint8)[dst, :, kv] = q.view(torch.uint8)
        else:
            pool[dst, :, kv] = frames.to(pool.dtype)


def gather_kv(pool: torch.Tensor, slots: torch.Tensor, dst_k: torch.Tensor, dst_v: torch.Tensor,
              dst_frame: torch.Tensor, delta: torch.Tensor, rope_temporal_pairs: int,
              rope_theta: float = ROPE_THETA, pool_scale: torch.Tensor | None = None) -> None:
    """Copies pool frames into attention-cache frames, re-positioning K's temporal RoPE. Mutates dst_k, dst_v.

    For every ``slots[b, j] != -1`` and every layer ``l``, with ``s = slots[b, j]`` and ``f = dst_frame[b, j]``::

        dst_v[l, b, f] = pool[s, l, 1]
        dst_k[l, b, f] = rope_rotate_temporal(pool[s, l, 0], delta[b, j])   # float64 -> float32 -> dst dtype

    A float8_e4m3fn pool is first dequantised: ``pool[s, l, kv].float() * pool_scale[s, l, kv]`` (float32).

    Args:
        pool: ``[num_slots, layers, 2, tokens, heads, head_dim]``.
        slots, dst_frame, delta: ``[B, m]`` int64; ``slots == -1`` entries are skipped.
        dst_k, dst_v: ``[layers, B, cache_frames, tokens, heads, head_dim]``.
        rope_temporal_pairs, rope_theta: see :func:`rope_rotate_temporal`.
        pool_scale: ``[num_slots, layers, 2]`` float32, with a float8_e4m3fn pool only.
    """
    B, m = slots.shape
    keep = slots >= 0
    b = torch.arange(B, device=slots.device)[:, None].expand(B, m)[keep].to(dst_k.device)
    f = dst_frame[keep].to(dst_k.device)
    src = slots[keep].to(pool.device)
    if pool.dtype == torch.float8_e4m3fn:
        frames = pool.view(torch.uint8)[src].view(torch.float8_e4m3fn).float() * pool_scale[src][..., None, None, None]
    else:
        frames = pool[src]                                                      # [E, layers, 2, T, H, hd]
    frames = frames.to(dst_k.device)
    k = rope_rotate_temporal(frames[:, :, 0], delta[keep], rope_temporal_pairs, rope_theta)
    dst_k[:, b, f] = k.to(torch.float32).to(dst_k.dtype).transpose(0, 1)
    dst_v[:, b, f] = frames[:, :, 1].to(dst_v.dtype).transpose(0, 1)
