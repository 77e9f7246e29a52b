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
            ``[max(lo, 0), min(hi, max_pages * page_size))`` (any int64 ``lo``/``hi``, ``INT64_MAX`` included)
            and entries on out-of-pool pages are skipped. CUDA-only limits: ``D <= 8192`` (the query lives in
            shared memory) and ``B <= 65535`` (the grid's y dimension).
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


# ---------------------------------------------------------------------------------------------------------------
# Paged KV pool.

def kv_pool_empty(num_slots: int, layers: int, tokens: int, heads: int, head_dim: int,
                  dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                  pin_memory: bool = False) -> torch.Tensor:
    """An uninitialised paged KV pool ``[num_slots, layers, 2, tokens, heads, head_dim]``.

    One slot holds one latent frame's K (index 0 of dim 2) and V (index 1) for all layers; slot indices come
    from a :class:`lrag_ext.SlotAllocator`. ``pin_memory=True`` (CPU only) makes a pinned host pool that the
    CUDA :func:`gather_kv` reads directly. A ``torch.float8_e4m3fn`` pool (half the bytes of bf16) also needs
    its scales, :func:`kv_pool_scale_empty`.

    Raises:
        ValueError: a negative size, an odd ``head_dim``, a dtype other than float32, float16, bfloat16 or
            float8_e4m3fn, or ``pin_memory`` with a non-CPU device.
    """
    sizes = dict(num_slots=num_slots, layers=layers, tokens=tokens, heads=heads, head_dim=head_dim)
    for name, v in sizes.items():
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE pairs), got {head_dim}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn):
        raise ValueError(f"dtype must be float32, float16, bfloat16 or float8_e4m3fn, got {dtype}")
    device = torch.device(device)
    if pin_memory and device.type != "cpu":
        raise ValueError(f"pin_memory=True needs device='cpu' (a host pool), got {device}")
    return torch.empty((num_slots, layers, 2, tokens, heads, head_dim), dtype=dtype, device=device,
                       pin_memory=pin_memory)


def kv_pool_scale_empty(pool: torch.Tensor) -> torch.Tensor:
    """The ``pool_scale [num_slots, layers, 2]`` float32 of a float8_e4m3fn pool, filled with ones, on the pool's
    device (pinned when the pool is). :func:`write_kv` overwrites the entries of the slots it writes."""
    return torch.ones(pool.shape[:2] + (2,), dtype=torch.float32, device=pool.device,
                      pin_memory=pool.device.type == "cpu" and pool.is_pinned())


def write_kv(pool: torch.Tensor, src_k: torch.Tensor, src_v: torch.Tensor, slots: torch.Tensor,
             pool_scale: torch.Tensor | None = None) -> None:
    """Writes new frames' K and V (all layers) into pool slots, in place (vLLM's ``reshape_and_cache``).

    ``pool[slots[i], l, 0] = src_k[l, i]`` and ``pool[slots[i], l, 1] = src_v[l, i]`` for every layer ``l``, cast
    to the pool dtype. K is stored as given (the LongLive-RAG pool keeps K without RoPE).

    float8_e4m3fn pools: each frame's K (and V) of each layer is stored as ``x / s`` with
    ``s = amax(|x|) / 448`` over the frame's finite values (1 when that is 0), and ``s`` goes to
    ``pool_scale[slots[i], l, 0 | 1]``. A NaN or inf cannot poison the scale: NaN is stored as NaN and +-inf
    saturates to +-448 (``float8_e4m3fn`` has no infinity), as torch's cast does.

    Args:
        pool: ``[num_slots, layers, 2, tokens, heads, head_dim]`` float32/float16/bfloat16/float8_e4m3fn, dense
            in its last dim (any other strides). On CUDA it may also be a pinned host pool written through its
            mapped device pointer.
        src_k, src_v: ``[layers, n, tokens, heads, head_dim]``, one float dtype (may differ from the pool's),
            any strides; on the device of ``slots``.
        slots: ``[n]`` int64, the destination slot of each frame; ``-1`` skips the frame. Slots other than -1
            must be distinct.
        pool_scale: ``[num_slots, layers, 2]`` float32 on the pool's device, required with (and only with) a
            float8_e4m3fn pool (:func:`kv_pool_scale_empty`).

    Raises:
        RuntimeError: wrong ranks, sizes, dtypes or devices (the message names the argument); on CPU also a
            slot outside ``[-1, num_slots)`` or a repeated slot, detected before anything is written. On CUDA
            these value checks would need a host synchronisation: out-of-range slots are skipped instead, and
            repeated slots leave the slot with one of the frames (which one is undefined).
    """
    torch.ops.lrag_ext.write_kv.default(pool, src_k, src_v, slots, pool_scale)


def gather_kv(pool: torch.Tensor, slots: torch.Tensor, dst_k: torch.Tensor, dst_v: torch.Tensor,
              dst_frame: torch.Tensor, delta: torch.Tensor | None = None, rope_temporal_pairs: int | None = None,
              rope_theta: float = 10000.0, pool_scale: torch.Tensor | None = None) -> None:
    """Copies pool frames into attention-cache frames (all layers, one launch), re-positioning K's temporal RoPE.

    For every ``slots[b, j] != -1`` and every layer ``l``, with ``s = slots[b, j]``, ``f = dst_frame[b, j]``::

        dst_v[l, b, f] = pool[s, l, 1]
        dst_k[l, b, f] = R(delta[b, j]) pool[s, l, 0]

    ``R(d)`` multiplies RoPE pair ``i`` (real dims ``2i, 2i+1``) of each head, for ``i < rope_temporal_pairs``,
    by ``exp(1j * d * omega_i)`` with ``omega_i = rope_theta^(-2i / (2 * rope_temporal_pairs))`` (Wan's
    temporal axis), computed in float64 and cast back through float32, so a key stored without RoPE gathered
    with ``delta = p`` equals Wan's temporal RoPE at position ``p``; ``delta = b - a`` moves a key roped at
    temporal position ``a`` to ``b``. ``delta == 0`` is a plain copy. Values are cast to the cache dtype; a
    float8_e4m3fn pool is dequantised first, ``float(q) * pool_scale[s, l, 0 | 1]`` in float32.

    Args:
        pool: ``[num_slots, layers, 2, tokens, heads, head_dim]`` float32/float16/bfloat16/float8_e4m3fn, dense
            in its last dim. On CUDA it may be on the cache's device or be a pinned host pool (read over PCIe through its
            mapped device pointer, in stream order; no extra synchronisation is needed).
        slots: ``[B, m]`` int64 source slots; ``-1`` skips the entry.
        dst_k, dst_v: ``[layers, B, cache_frames, tokens, heads, head_dim]`` float32/float16/bfloat16 (one
            dtype), dense in their last dim, otherwise any strides (e.g. views of a larger cache).
        dst_frame: ``[B, m]`` int64 destination cache frame of each entry; distinct within a stream.
        delta: ``[B, m]`` int64 temporal position shift of each entry's K; ``None`` = all zeros.
        rope_temporal_pairs: temporal RoPE pairs per head; ``None`` = Wan's split ``c - 2(c // 3)`` of
            ``c = head_dim // 2`` (22 for head_dim 128). ``0`` disables the rotation.
        rope_theta: RoPE base.
        pool_scale: ``[num_slots, layers, 2]`` float32 on the pool's device, required with (and only with) a
            float8_e4m3fn pool.

    Raises:
        RuntimeError: wrong ranks, sizes, dtypes or devices, ``rope_temporal_pairs`` outside
            ``[0, head_dim / 2]``, a non-positive ``rope_theta``; on CPU also a slot outside ``[-1, num_slots)``,
            a ``dst_frame`` outside ``[0, cache_frames)`` or a cache frame targeted twice within a stream, all
            detected before anything is written. On CUDA those value checks would need a host synchronisation:
            entries with an out-of-range slot or frame are skipped instead, and duplicate destinations give
            undefined contents. CUDA-only limit: ``rope_temporal_pairs <= 2048``.
    """
    if rope_temporal_pairs is None:
        rope_temporal_pairs = reference.wan_temporal_pairs(dst_k.shape[-1])
    if delta is None:
        delta = torch.zeros_like(slots)
    torch.ops.lrag_ext.gather_kv.default(pool, slots, dst_k, dst_v, dst_frame, delta, int(rope_temporal_pairs),
                                         float(rope_theta), pool_scale)


@torch.library.register_fake("lrag_ext::write_kv")
def _write_kv_fake(pool, src_k, src_v, slots, pool_scale=None):
    torch._check(pool.dim() == 6, lambda: "pool must be [num_slots, layers, 2, tokens, heads, head_dim]")
    torch._check(src_k.dim() == 5, lambda: "src_k must be [layers, n, tokens, heads, head_dim]")


@torch.library.register_fake("lrag_ext::gather_kv")
def _gather_kv_fake(pool, slots, dst_k, dst_v, dst_frame, delta, rope_temporal_pairs, rope_theta, pool_scale=None):
    torch._check(pool.dim() == 6, lambda: "pool must be [num_slots, layers, 2, tokens, heads, head_dim]")
    torch._check(dst_k.dim() == 6, lambda: "dst_k must be [layers, B, cache_frames, tokens, heads, head_dim]")


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
    fallback("write_kv", reference.write_kv)
    fallback("gather_kv", reference.gather_kv)


if not _CUDA_BUILT:
    _register_reference_fallbacks()
