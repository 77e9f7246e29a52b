"""Documented wrappers of the compiled ops, their fake (meta) kernels, and the reference fallback.

Every op is registered in ``csrc/lrag_ext.cpp`` under ``torch.ops.lrag_ext`` so that it composes with
``torch.compile``, CUDA graphs and ``torch.library.opcheck``. When the compiled module has no kernel for a
device (a CPU-only build used with CUDA tensors), the op is served by :mod:`lrag_ext.reference` instead, with a
one-time warning.
"""
from __future__ import annotations

import warnings

import torch

from lrag_ext import _C, reference

_CUDA_BUILT = bool(_C.build_info()["cuda"])


def cosine_topk(queries: torch.Tensor, pages: torch.Tensor, page_table: torch.Tensor, lo: torch.Tensor,
                hi: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarity of each stream's query over its eligible paged embedding history.

    ``score(q, e) = dot(q, e) / ((|q| + 1e-8) * (|e| + 1e-8))``, accumulated in float32. Logical entry ``i`` of
    stream ``b`` lives at ``pages[page_table[b, i // page_size], i % page_size]`` and is eligible when
    ``lo[b] <= i < hi[b]``.

    Args:
        queries: ``[B, D]`` float32, float16 or bfloat16.
        pages: ``[P, page_size, D]``, same dtype and device as ``queries``; may be strided over its first two
            dims (the last must be dense, or it is copied).
        page_table: ``[B, max_pages]`` int32, the physical page of each logical page of each stream.
        lo, hi: ``[B]`` int64, the half-open range of eligible logical ids of each stream.
        k: results per stream, ``>= 1``; may exceed the number of eligible entries.

    Returns:
        ``(scores, ids)``: ``scores [B, k]`` float32 sorted descending, ``ids [B, k]`` int64 logical ids. Equal
        scores are ordered by ascending id, so results are deterministic. When fewer than ``k`` entries are
        eligible, the tail is padded with score ``-inf`` and id ``-1``. NaN scores (from non-finite inputs) rank
        first, as in ``torch.sort``.

    Raises:
        RuntimeError: wrong ranks, dtypes, sizes or devices; ``k < 1``; on CPU also ``lo < 0``, ``lo > hi``,
            ``hi`` beyond ``max_pages * page_size``, or a page id of an eligible entry outside ``[0, P)``.
            On CUDA these value checks would need a host synchronisation, so instead the range is clamped to
            ``[max(lo, 0), min(hi, max_pages * page_size))`` and entries on out-of-pool pages are skipped.
    """
    return torch.ops.lrag_ext.cosine_topk.default(queries, pages, page_table, lo, hi, k)


@torch.library.register_fake("lrag_ext::cosine_topk")
def _cosine_topk_fake(queries, pages, page_table, lo, hi, k):
    torch._check(queries.dim() == 2, lambda: "queries must be [B, D]")
    torch._check(k >= 1, lambda: f"k must be >= 1, got {k}")
    B = queries.shape[0]
    return (queries.new_empty((B, k), dtype=torch.float32), queries.new_empty((B, k), dtype=torch.int64))


def embed_head(feat: torch.Tensor, gn_weight: torch.Tensor, gn_bias: torch.Tensor, fc_weight: torch.Tensor,
               fc_bias: torch.Tensor, groups: int, eps: float = 1e-5) -> torch.Tensor:
    """The LatentAE encoder's tail in one op: GroupNorm -> SiLU -> global average pool -> Linear -> L2-normalise.

    ``y = silu(group_norm(feat, groups, gn_weight, gn_bias, eps))``, ``p[n, c] = mean_{h,w} y[n, c]``,
    ``z = p @ fc_weight.T + fc_bias``, returns ``z / max(|z|, 1e-12)`` (``F.normalize``). Statistics and sums are
    accumulated in float32 or better; the normalised feature map is never materialised.

    Args:
        feat: ``[N, C, H, W]`` float32, float16 or bfloat16 trunk features; NCHW-contiguous or channels-last are
            read in place, other layouts are copied first.
        gn_weight, gn_bias: ``[C]``, the GroupNorm affine parameters (dtype and device of ``feat``).
        fc_weight: ``[D, C]``; fc_bias: ``[D]`` (dtype and device of ``feat``).
        groups: GroupNorm groups, ``>= 1`` and dividing ``C``.
        eps: GroupNorm epsilon, ``>= 0``.

    Returns:
        ``[N, D]`` float32 unit-norm embeddings (all-zero rows stay zero).

    Raises:
        RuntimeError: wrong ranks, sizes, dtypes or devices; ``groups`` not dividing ``C``; ``eps < 0``; on CUDA
            ``C + D > 12256`` (the pooled vector and the output live in 48 KiB of shared memory).
    """
    return torch.ops.lrag_ext.embed_head.default(feat, gn_weight, gn_bias, fc_weight, fc_bias, groups, eps)


@torch.library.register_fake("lrag_ext::embed_head")
def _embed_head_fake(feat, gn_weight, gn_bias, fc_weight, fc_bias, groups, eps):
    torch._check(feat.dim() == 4, lambda: "feat must be [N, C, H, W]")
    torch._check(fc_weight.dim() == 2, lambda: "fc_weight must be [D, C]")
    return feat.new_empty((feat.shape[0], fc_weight.shape[0]), dtype=torch.float32)


def pooled_embed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grid: int) -> torch.Tensor:
    """The light embedder in one op: average-pool each frame to ``grid x grid`` -> Linear -> L2-normalise.

    ``f[n, c, i, j]`` is the mean of ``x[n, c]`` over rows ``[floor(i H / g), ceil((i + 1) H / g))`` and columns
    ``[floor(j W / g), ceil((j + 1) W / g))`` (exactly ``adaptive_avg_pool2d``), flattened channel-major to
    ``[N, C g g]``; ``z = f @ weight.T + bias``; returns ``z / max(|z|, 1e-12)``. One pass over each frame.

    Args:
        x: ``[N, C, H, W]`` float32, float16 or bfloat16 latent frames, any strides.
        weight: ``[D, C * grid * grid]``; bias: ``[D]`` (dtype and device of ``x``).
        grid: pooled grid size, ``1 <= grid <= min(H, W)``.

    Returns:
        ``[N, D]`` float32 unit-norm embeddings.

    Raises:
        RuntimeError: wrong ranks, sizes, dtypes or devices; ``grid`` out of range; on CUDA
            ``C * grid * grid + D > 12256`` (features and output live in 48 KiB of shared memory).
    """
    return torch.ops.lrag_ext.pooled_embed.default(x, weight, bias, grid)


@torch.library.register_fake("lrag_ext::pooled_embed")
def _pooled_embed_fake(x, weight, bias, grid):
    torch._check(x.dim() == 4, lambda: "x must be [N, C, H, W]")
    torch._check(weight.dim() == 2, lambda: "weight must be [D, C * grid * grid]")
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


def _register_reference_fallbacks() -> None:
    """Serves CUDA tensors with the reference when this build has no CUDA kernels."""
    warned = []

    def fallback(name, fn):
        def impl(*args):
            if not warned:
                warnings.warn("lrag_ext was built without CUDA kernels; CUDA tensors use the slow PyTorch "
                              "reference. Rebuild with a CUDA torch and nvcc for the fused kernels.",
                              RuntimeWarning, stacklevel=3)
                warned.append(True)
            return fn(*args)
        torch.library.impl(f"lrag_ext::{name}", "CUDA")(impl)

    fallback("cosine_topk", reference.cosine_topk)
    fallback("embed_head", reference.embed_head)
    fallback("pooled_embed", reference.pooled_embed)


if not _CUDA_BUILT:
    _register_reference_fallbacks()
