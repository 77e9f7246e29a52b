"""Documented wrappers of the compiled ops, their fake (meta) kernels, and the reference fallback.

Every op is registered in ``csrc/lrag_ext.cpp`` under ``torch.ops.lrag_ext`` so that it composes with
``torch.compile``, CUDA graphs and ``torch.library.opcheck``. When the compiled module has no kernel for a
device (a CPU-only build used with CUDA tensors), the op is served by :mod:`lrag_ext.reference` instead, with a
one-time warning.
"""
from __future__ import annotations

import math
import warnings

import torch

from lrag_ext import _C, reference

_CUDA_BUILT = bool(_C.build_info()["cuda"])

# ---------------------------------------------------------------------------------------------------------------
# Argument checks of the fake (meta) kernels: the shape, dtype and device checks of csrc/checks.h and the ops'
# *_common.h, with the same messages (each names the argument). The dispatcher sends a call to the fake kernel
# whenever one argument is a meta tensor, so without them a meta tensor mixed with CPU or CUDA tensors returned
# uninitialised memory (or wrote nothing) instead of an error. Value checks (slot ids, ranges) need data and stay
# in the C++ kernels. torch._check raises RuntimeError and works on symbolic sizes under torch.compile.

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INT64_MAX = 2**63 - 1
_INT32_MAX = 2**31 - 1
_CUDA_MAX_D = 8192              # cosine_topk: the query lives in shared memory
_CUDA_MAX_STREAMS = 65535       # cosine_topk: the grid's y dimension
_CUDA_EMBED_SMEM_FLOATS = 48 * 1024 // 4 - 32   # embed_head / pooled_embed: features + output in 48 KiB
_CUDA_MAX_ROPE_PAIRS = 2048     # gather_kv


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_dim(t, dim, name, shape):
    torch._check(t.dim() == dim, lambda: f"{name} must be a {dim}-D tensor {shape}, got shape {list(t.shape)}")


def _check_dtype(t, want, name):
    torch._check(t.dtype == want, lambda: f"{name} must have dtype {_dtype_name(want)}, got {_dtype_name(t.dtype)}")


def _check_float_dtype(t, name):
    torch._check(t.dtype in _FLOATS,
                 lambda: f"{name} must be float32, float16 or bfloat16, got {_dtype_name(t.dtype)}")


def _check_same_dtype(t, ref, name, ref_name):
    torch._check(t.dtype == ref.dtype, lambda: f"{name} must have the dtype of {ref_name} ({_dtype_name(ref.dtype)}), "
                                               f"got {_dtype_name(t.dtype)}")


def _check_same_device(t, ref, name, ref_name):
    torch._check(t.device == ref.device,
                 lambda: f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def _check_size(t, dim, want, name, what):
    torch._check(t.shape[dim] == want, lambda: f"{name}.shape[{dim}] must equal {what} ({want}), got {t.shape[dim]}")


def _check_pool_device(pool, ref, ref_name):
    """The pool lives on the device of the other operands; with CUDA operands it may also be a pinned host pool
    (a fake tensor does not tell whether it is pinned, so any cpu pool is accepted there). A meta tensor mixed with
    non-meta ones is always refused."""
    ok = pool.device == ref.device or (pool.device.type == "cpu" and ref.device.type == "cuda")
    torch._check(ok, lambda: f"pool must be on the device of {ref_name} ({ref.device}), or in pinned host memory "
                             f"with CUDA {ref_name}; got {pool.device}")


def _check_pool(pool):
    """csrc/kv_pool_common.h check_pool; returns (num_slots, layers, tokens, heads, head_dim)."""
    _check_dim(pool, 6, "pool", "[num_slots, layers, 2, tokens, heads, head_dim]")
    torch._check(pool.dtype in _FLOATS + (torch.float8_e4m3fn,),
                 lambda: f"pool must be float32, float16, bfloat16 or float8_e4m3fn, got {_dtype_name(pool.dtype)}")
    torch._check(pool.shape[2] == 2, lambda: f"pool.shape[2] must be 2 (K and V), got {pool.shape[2]}")
    _check_last_dim_dense(pool, "pool")
    num_slots, layers, _, tokens, heads, head_dim = pool.shape
    torch._check(head_dim % 2 == 0, lambda: f"pool.shape[5] (head_dim) must be even (RoPE pairs), got {head_dim}")
    torch._check(tokens * heads * head_dim < _INT32_MAX, lambda: "tokens * heads * head_dim of one frame must be "
                                                                 f"< 2^31 - 1, got {tokens} * {heads} * {head_dim}")
    return num_slots, layers, tokens, heads, head_dim


def _check_last_dim_dense(t, name):
    torch._check(t.shape[-1] <= 1 or t.stride(-1) == 1,
                 lambda: f"{name} must be dense in its last dim (head_dim), got strides {list(t.stride())}")


def _check_frame_geometry(t, layers, tokens, heads, head_dim, name):
    d = t.dim()
    _check_size(t, 0, layers, name, "pool.shape[1] (layers)")
    _check_size(t, d - 3, tokens, name, "pool.shape[3] (tokens)")
    _check_size(t, d - 2, heads, name, "pool.shape[4] (heads)")
    _check_size(t, d - 1, head_dim, name, "pool.shape[5] (head_dim)")


def _check_index(t, name, shape, dim):
    _check_dim(t, dim, name, shape)
    _check_dtype(t, torch.int64, name)


def _check_pool_scale(pool, num_slots, layers, pool_scale):
    """csrc/kv_pool_common.h check_pool_scale: required with (and only with) a float8_e4m3fn pool."""
    if pool.dtype != torch.float8_e4m3fn:
        torch._check(pool_scale is None, lambda: "pool_scale is only used with a float8_e4m3fn pool; pool is "
                                                 f"{_dtype_name(pool.dtype)}")
        return
    torch._check(pool_scale is not None, lambda: "a float8_e4m3fn pool needs pool_scale [num_slots, layers, 2] float32")
    _check_dim(pool_scale, 3, "pool_scale", "[num_slots, layers, 2]")
    _check_dtype(pool_scale, torch.float32, "pool_scale")
    _check_size(pool_scale, 0, num_slots, "pool_scale", "pool.shape[0] (num_slots)")
    _check_size(pool_scale, 1, layers, "pool_scale", "pool.shape[1] (layers)")
    _check_size(pool_scale, 2, 2, "pool_scale", "2 (K, V)")
    _check_same_device(pool_scale, pool, "pool_scale", "pool")


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
        RuntimeError: wrong ranks, dtypes, sizes or devices (every tensor on the device of ``queries``; a meta
            tensor mixed with others is refused by the fake kernel with the same message); ``k < 1``; a ``k``
            whose ``B * k * 12`` result bytes overflow int64 (the message names ``k``); a ``page_table.shape[1]
            * page_size`` of 2^31 - 1 or more (checked without overflow); on CPU also ``lo < 0``, ``lo > hi``,
            ``hi`` beyond ``max_pages * page_size``, or a page id of an eligible entry outside ``[0, P)``.
            On CUDA these value checks would need a host synchronisation, so instead the range is clamped to
            ``[max(lo, 0), min(hi, max_pages * page_size))`` (any int64 ``lo``/``hi``, ``INT64_MAX`` included)
            and entries on out-of-pool pages are skipped. CUDA-only limits: ``D <= 8192`` (the query lives in
            shared memory) and ``B <= 65535`` (the grid's y dimension). Results that cannot be allocated are
            reported naming ``k`` and ``B`` (as ``torch.OutOfMemoryError``, a ``RuntimeError``, where the
            allocator raised one, e.g. on CUDA).
    """
    return torch.ops.lrag_ext.cosine_topk.default(queries, pages, page_table, lo, hi, k)


@torch.library.register_fake("lrag_ext::cosine_topk")
def _cosine_topk_fake(queries, pages, page_table, lo, hi, k):
    # csrc/cosine_topk_common.h check_cosine_topk_args, then the CUDA host's limits.
    _check_dim(queries, 2, "queries", "[B, D]")
    _check_float_dtype(queries, "queries")
    _check_dim(pages, 3, "pages", "[P, page_size, D]")
    _check_same_dtype(pages, queries, "pages", "queries")
    _check_same_device(pages, queries, "pages", "queries")
    _check_dim(page_table, 2, "page_table", "[B, max_pages]")
    _check_dtype(page_table, torch.int32, "page_table")
    _check_same_device(page_table, queries, "page_table", "queries")
    _check_dim(lo, 1, "lo", "[B]")
    _check_dim(hi, 1, "hi", "[B]")
    _check_dtype(lo, torch.int64, "lo")
    _check_dtype(hi, torch.int64, "hi")
    _check_same_device(lo, queries, "lo", "queries")
    _check_same_device(hi, queries, "hi", "queries")
    torch._check(k >= 1, lambda: f"k must be >= 1, got {k}")
    B, D = queries.shape
    page_size, max_pages = pages.shape[1], page_table.shape[1]
    torch._check(D >= 1, lambda: f"queries.shape[1] (D) must be >= 1, got {D}")
    _check_size(pages, 2, D, "pages", "queries.shape[1] (D)")
    torch._check(page_size >= 1, lambda: f"pages.shape[1] (page_size) must be >= 1, got {page_size}")
    _check_size(page_table, 0, B, "page_table", "queries.shape[0] (B)")
    _check_size(lo, 0, B, "lo", "queries.shape[0] (B)")
    _check_size(hi, 0, B, "hi", "queries.shape[0] (B)")
    torch._check(max_pages * page_size < _INT32_MAX,
                 lambda: "page_table.shape[1] * page_size must address fewer than 2^31 - 1 logical ids, got "
                         f"{max_pages} pages x page_size {page_size}")
    torch._check(B * k * 12 <= _INT64_MAX, lambda: f"k = {k} is too large: the [B, k] results of B = {B} streams "
                                                   "would need B * k * 12 bytes, beyond int64")
    if queries.device.type == "cuda":
        torch._check(D <= _CUDA_MAX_D, lambda: f"queries.shape[1] (D) must be <= {_CUDA_MAX_D} on CUDA, got {D}")
        torch._check(B <= _CUDA_MAX_STREAMS or max_pages * page_size == 0 or pages.shape[0] == 0,
                     lambda: f"queries.shape[0] (B) must be <= {_CUDA_MAX_STREAMS} on CUDA (the grid's y "
                             f"dimension), got {B}")
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
        RuntimeError: wrong ranks, sizes, dtypes or devices (the parameters on the device of ``feat``; a meta
            tensor mixed with others is refused by the fake kernel with the same message); ``H * W`` overflowing
            int64; ``groups`` not dividing ``C``; ``eps < 0``; on CUDA ``C + D > 12256`` (the pooled vector and
            the output live in 48 KiB of shared memory; compared without overflow).
    """
    return torch.ops.lrag_ext.embed_head.default(feat, gn_weight, gn_bias, fc_weight, fc_bias, groups, eps)


def _check_param(p, x, dim, name, shape, x_name):
    _check_dim(p, dim, name, shape)
    _check_same_dtype(p, x, name, f"the input {x_name}")
    _check_same_device(p, x, name, f"the input {x_name}")


@torch.library.register_fake("lrag_ext::embed_head")
def _embed_head_fake(feat, gn_weight, gn_bias, fc_weight, fc_bias, groups, eps):
    # csrc/embed_common.h check_embed_head_args, then the CUDA host's shared-memory limit.
    _check_dim(feat, 4, "feat", "[N, C, H, W]")
    _check_float_dtype(feat, "feat")
    _check_param(gn_weight, feat, 1, "gn_weight", "[C]", "feat")
    _check_param(gn_bias, feat, 1, "gn_bias", "[C]", "feat")
    _check_param(fc_weight, feat, 2, "fc_weight", "[D, C]", "feat")
    _check_param(fc_bias, feat, 1, "fc_bias", "[D]", "feat")
    N, C, H, W = feat.shape
    D = fc_weight.shape[0]
    torch._check(H * W <= _INT64_MAX, lambda: f"feat.shape[2] * feat.shape[3] (H x W) overflows int64: {H} x {W}")
    torch._check(C >= 1, lambda: f"feat.shape[1] (C) must be >= 1, got {C}")
    torch._check(H * W >= 1, lambda: f"feat must have at least one pixel, got H x W = {H} x {W}")
    _check_size(gn_weight, 0, C, "gn_weight", "feat.shape[1] (C)")
    _check_size(gn_bias, 0, C, "gn_bias", "feat.shape[1] (C)")
    _check_size(fc_weight, 1, C, "fc_weight", "feat.shape[1] (C)")
    torch._check(D >= 1, lambda: f"fc_weight.shape[0] (D) must be >= 1, got {D}")
    _check_size(fc_bias, 0, D, "fc_bias", "fc_weight.shape[0] (D)")
    torch._check(groups >= 1 and C % groups == 0, lambda: f"groups must be >= 1 and divide C ({C}), got {groups}")
    torch._check(eps >= 0, lambda: f"eps must be >= 0, got {eps}")
    if feat.device.type == "cuda":
        torch._check(N == 0 or C + D <= _CUDA_EMBED_SMEM_FLOATS,
                     lambda: f"embed_head on CUDA needs C + D <= {_CUDA_EMBED_SMEM_FLOATS}, got C = {C}, D = {D}")
    return feat.new_empty((N, D), dtype=torch.float32)


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
        RuntimeError: wrong ranks, sizes, dtypes or devices (the parameters on the device of ``x``; a meta tensor
            mixed with others is refused by the fake kernel with the same message); ``grid`` out of range;
            ``C * grid * grid`` overflowing int64; on CUDA ``C * grid * grid + D > 12256`` (features and output
            live in 48 KiB of shared memory; compared without overflow).
    """
    return torch.ops.lrag_ext.pooled_embed.default(x, weight, bias, grid)


@torch.library.register_fake("lrag_ext::pooled_embed")
def _pooled_embed_fake(x, weight, bias, grid):
    # csrc/embed_common.h check_pooled_embed_args, then the CUDA host's shared-memory limit.
    _check_dim(x, 4, "x", "[N, C, H, W]")
    _check_float_dtype(x, "x")
    _check_param(weight, x, 2, "weight", "[D, C * grid * grid]", "x")
    _check_param(bias, x, 1, "bias", "[D]", "x")
    N, C, H, W = x.shape
    D = weight.shape[0]
    torch._check(C >= 1, lambda: f"x.shape[1] (C) must be >= 1, got {C}")
    torch._check(grid >= 1 and grid <= H and grid <= W,
                 lambda: f"grid must be in [1, min(H, W)] = [1, {min(H, W)}], got {grid}")
    K = C * grid * grid
    torch._check(K <= _INT64_MAX, lambda: "x.shape[1] * grid * grid (C * grid * grid) overflows int64: "
                                          f"C = {C}, grid = {grid}")
    _check_size(weight, 1, K, "weight", "C * grid * grid")
    torch._check(D >= 1, lambda: f"weight.shape[0] (D) must be >= 1, got {D}")
    _check_size(bias, 0, D, "bias", "weight.shape[0] (D)")
    if x.device.type == "cuda":
        torch._check(N == 0 or K + D <= _CUDA_EMBED_SMEM_FLOATS,
                     lambda: f"pooled_embed on CUDA needs C * grid * grid + D <= {_CUDA_EMBED_SMEM_FLOATS}, "
                             f"got {K} + {D}")
    return x.new_empty((N, D), dtype=torch.float32)


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
        RuntimeError: wrong ranks, sizes, dtypes or devices (the message names the argument; a meta tensor mixed
            with others is refused by the fake kernel with the same message); an output that aliases: ``pool`` or
            ``pool_scale`` with a stride-0 dim (e.g. from ``expand()``), or sharing memory with ``src_k``,
            ``src_v``, ``slots`` or each other (e.g. ``"pool overlaps src_k"``; as in torch's in-place ops, views
            torch cannot classify cheaply -- non-dense views of one storage that start at different addresses --
            are not detected); ``tokens * heads * head_dim >= 2^31 - 1`` (checked without overflow); on CPU also
            a slot outside ``[-1, num_slots)`` or a repeated slot, all detected before anything is written. On CUDA
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
        RuntimeError: wrong ranks, sizes, dtypes or devices (a meta tensor mixed with others is refused by the
            fake kernel with the same message); an output that aliases: ``dst_k`` or ``dst_v`` with a stride-0
            dim (e.g. from ``expand()``), ``dst_k`` sharing memory with ``dst_v`` (``"dst_k overlaps dst_v"``), or
            either sharing memory with ``pool``, ``slots``, ``dst_frame``, ``delta`` or ``pool_scale`` (as in
            torch's in-place ops, non-dense views of one storage that start at different addresses are not
            detected); ``rope_temporal_pairs`` outside ``[0, head_dim / 2]`` (any int64, compared without
            overflow), a non-positive ``rope_theta``; on CPU also a slot outside ``[-1, num_slots)``,
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
    # csrc/kv_pool_common.h check_write_kv_args and check_pool_scale, then the hosts' device rule for the pool.
    num_slots, layers, tokens, heads, head_dim = _check_pool(pool)
    _check_dim(src_k, 5, "src_k", "[layers, n, tokens, heads, head_dim]")
    _check_float_dtype(src_k, "src_k")
    _check_frame_geometry(src_k, layers, tokens, heads, head_dim, "src_k")
    torch._check(src_v.shape == src_k.shape,
                 lambda: f"src_v must have the shape of src_k ({list(src_k.shape)}), got {list(src_v.shape)}")
    _check_same_dtype(src_v, src_k, "src_v", "src_k")
    _check_index(slots, "slots", "[n]", 1)
    _check_size(slots, 0, src_k.shape[1], "slots", "src_k.shape[1] (n)")
    _check_same_device(src_v, src_k, "src_v", "src_k")
    _check_same_device(slots, src_k, "slots", "src_k")
    _check_pool_scale(pool, num_slots, layers, pool_scale)
    _check_pool_device(pool, src_k, "src_k")


@torch.library.register_fake("lrag_ext::gather_kv")
def _gather_kv_fake(pool, slots, dst_k, dst_v, dst_frame, delta, rope_temporal_pairs, rope_theta, pool_scale=None):
    # csrc/kv_pool_common.h check_gather_kv_args and check_pool_scale, then the hosts' device rule for the pool
    # and the CUDA limit on rope_temporal_pairs.
    num_slots, layers, tokens, heads, head_dim = _check_pool(pool)
    _check_dim(dst_k, 6, "dst_k", "[layers, B, cache_frames, tokens, heads, head_dim]")
    _check_float_dtype(dst_k, "dst_k")
    _check_frame_geometry(dst_k, layers, tokens, heads, head_dim, "dst_k")
    _check_last_dim_dense(dst_k, "dst_k")
    torch._check(dst_v.shape == dst_k.shape,
                 lambda: f"dst_v must have the shape of dst_k ({list(dst_k.shape)}), got {list(dst_v.shape)}")
    _check_same_dtype(dst_v, dst_k, "dst_v", "dst_k")
    _check_last_dim_dense(dst_v, "dst_v")
    _check_index(slots, "slots", "[B, m]", 2)
    _check_size(slots, 0, dst_k.shape[1], "slots", "dst_k.shape[1] (B)")
    _check_index(dst_frame, "dst_frame", "[B, m]", 2)
    torch._check(dst_frame.shape == slots.shape,
                 lambda: f"dst_frame must have the shape of slots ({list(slots.shape)}), got {list(dst_frame.shape)}")
    _check_index(delta, "delta", "[B, m]", 2)
    torch._check(delta.shape == slots.shape,
                 lambda: f"delta must have the shape of slots ({list(slots.shape)}), got {list(delta.shape)}")
    _check_same_device(dst_v, dst_k, "dst_v", "dst_k")
    _check_same_device(slots, dst_k, "slots", "dst_k")
    _check_same_device(dst_frame, dst_k, "dst_frame", "dst_k")
    _check_same_device(delta, dst_k, "delta", "dst_k")
    torch._check(0 <= rope_temporal_pairs <= head_dim // 2,
                 lambda: f"rope_temporal_pairs must be in [0, head_dim / 2 = {head_dim // 2}], "
                         f"got {rope_temporal_pairs}")
    torch._check(rope_theta > 0 and math.isfinite(rope_theta),
                 lambda: f"rope_theta must be a positive finite number, got {rope_theta}")
    _check_pool_scale(pool, num_slots, layers, pool_scale)
    _check_pool_device(pool, dst_k, "dst_k")
    if dst_k.device.type == "cuda":
        torch._check(rope_temporal_pairs <= _CUDA_MAX_ROPE_PAIRS,
                     lambda: f"rope_temporal_pairs must be <= {_CUDA_MAX_ROPE_PAIRS} on CUDA, "
                             f"got {rope_temporal_pairs}")


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
