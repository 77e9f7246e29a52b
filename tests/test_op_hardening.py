"""Hardening of the op layer: no argument may give a silent wrong answer.

1. A meta tensor mixed with CPU/CUDA tensors is dispatched to the fake kernel, which must refuse it, naming the
   argument (it returned uninitialised memory, or wrote nothing). The fake kernels make the C++ shape, dtype and
   device checks (the per-op test files run each op's error cases through them as well).
2. Outputs that alias (a stride-0 dim, or memory shared with an input or the other output) are refused, as
   torch's in-place ops refuse them, before anything is written (they were written, last writer winning).
3. Size arithmetic on user sizes never wraps: a check compares without multiplying or checks the product.
4. The reference agrees with the kernels on empty inputs.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lrag_ext
from conftest import CUDA_KERNELS, cuda_code
from lrag_ext import reference

registration_only = pytest.mark.registration_only(
    reason="meta tensors are dispatched to the fake kernels, not to the CUDA code")


def snapshot(args: dict) -> dict:
    """Copies of the non-meta tensors of `args` (fp8 compared through its bytes)."""
    return {n: t.view(torch.uint8).clone() if t.dtype == torch.float8_e4m3fn else t.clone()
            for n, t in args.items() if isinstance(t, torch.Tensor) and t.device.type != "meta"}


def assert_unchanged(args: dict, snap: dict) -> None:
    for n, before in snap.items():
        now = args[n].view(torch.uint8) if args[n].dtype == torch.float8_e4m3fn else args[n]
        assert torch.equal(now, before), f"{n} changed by a refused call"


# ------------------------------------------------------------------------------ 1. meta mixed with real tensors

def cosine_topk_args(device):
    return lrag_ext.cosine_topk, dict(
        queries=torch.randn(2, 8, device=device), pages=torch.randn(3, 4, 8, device=device),
        page_table=torch.tensor([[0, 1], [2, 0]], dtype=torch.int32, device=device),
        lo=torch.tensor([0, 0], device=device), hi=torch.tensor([8, 5], device=device), k=3)


def embed_head_args(device):
    return lrag_ext.embed_head, dict(
        feat=torch.randn(2, 8, 4, 4, device=device), gn_weight=torch.ones(8, device=device),
        gn_bias=torch.zeros(8, device=device), fc_weight=torch.randn(6, 8, device=device),
        fc_bias=torch.randn(6, device=device), groups=4, eps=1e-5)


def pooled_embed_args(device):
    return lrag_ext.pooled_embed, dict(x=torch.randn(2, 4, 5, 6, device=device),
                                       weight=torch.randn(3, 16, device=device), bias=torch.randn(3, device=device),
                                       grid=2)


def fp8_pool(device):
    pool = lrag_ext.kv_pool_empty(4, 2, 3, 2, 8, torch.float8_e4m3fn, device)
    pool.view(torch.uint8).copy_(torch.randint(0, 120, pool.shape, dtype=torch.uint8))
    return pool, lrag_ext.kv_pool_scale_empty(pool)


def write_kv_args(device):
    pool, scale = fp8_pool(device)
    return lrag_ext.write_kv, dict(pool=pool, src_k=torch.randn(2, 2, 3, 2, 8, device=device),
                                   src_v=torch.randn(2, 2, 3, 2, 8, device=device),
                                   slots=torch.tensor([2, 0], device=device), pool_scale=scale)


def gather_kv_args(device):
    pool, scale = fp8_pool(device)
    return lrag_ext.gather_kv, dict(pool=pool, slots=torch.tensor([[1, 3]], device=device),
                                    dst_k=torch.zeros(2, 1, 3, 3, 2, 8, device=device),
                                    dst_v=torch.zeros(2, 1, 3, 3, 2, 8, device=device),
                                    dst_frame=torch.tensor([[0, 2]], device=device),
                                    delta=torch.tensor([[2, -1]], device=device), rope_temporal_pairs=2,
                                    pool_scale=scale)


OPS = {"cosine_topk": cosine_topk_args, "embed_head": embed_head_args, "pooled_embed": pooled_embed_args,
       "write_kv": write_kv_args, "gather_kv": gather_kv_args}
META_CASES = [(op, name) for op, make in OPS.items() for name, v in make("cpu")[1].items()
              if isinstance(v, torch.Tensor)]


@registration_only
@pytest.mark.parametrize("op,name", META_CASES, ids=[f"{op}-{name}" for op, name in META_CASES])
def test_a_meta_argument_among_real_ones_is_refused_naming_it(device, op, name):
    fn, args = OPS[op](device)
    args[name] = args[name].to("meta")
    snap = snapshot(args)
    with pytest.raises(RuntimeError, match="meta") as err:
        fn(**args)
    assert name in str(err.value), str(err.value)
    assert_unchanged(args, snap)


@pytest.mark.parametrize("op", OPS)
def test_all_meta_arguments_still_run_the_fake_kernel(op):
    fn, args = OPS[op]("meta")
    out = fn(**args)
    if op == "cosine_topk":
        assert [tuple(t.shape) for t in out] == [(2, 3), (2, 3)] and out[1].dtype == torch.int64
    elif op in ("embed_head", "pooled_embed"):
        assert out.device.type == "meta" and out.dtype == torch.float32 and out.shape[0] == 2


def test_fake_mode_allows_a_host_pool_with_cuda_operands_but_no_other_mix():
    # Under FakeTensorMode the devices are the real ones (CUDA fakes need no GPU): the CUDA ops read a pinned host
    # pool with CUDA operands, which a fake tensor cannot tell from an unpinned one, so a cpu pool is accepted.
    with FakeTensorMode():
        pool = torch.empty(4, 2, 2, 3, 2, 8)
        src = torch.empty(2, 2, 3, 2, 8, device="cuda")
        lrag_ext.write_kv(pool, src, src, torch.zeros(2, dtype=torch.int64, device="cuda"))
        dst = torch.empty(2, 1, 3, 3, 2, 8, device="cuda")
        idx = torch.zeros(1, 2, dtype=torch.int64, device="cuda")
        lrag_ext.gather_kv(pool, idx, dst, dst.clone(), idx, idx, 2)
        host_src = torch.empty(src.shape)
        with pytest.raises(RuntimeError, match=r"pool must be on the device of src_k \(cpu\)"):
            lrag_ext.write_kv(torch.empty(pool.shape, device="cuda"), host_src, host_src,
                              torch.zeros(2, dtype=torch.int64))
        with pytest.raises(RuntimeError, match=r"dst_frame must be on the same device as dst_k \(cuda:0\), got cpu"):
            lrag_ext.gather_kv(pool, idx, dst, dst.clone(), torch.zeros(1, 2, dtype=torch.int64), idx, 2)
        with pytest.raises(RuntimeError, match=r"pages must be on the same device as queries \(cuda:0\), got cpu"):
            lrag_ext.cosine_topk(torch.empty(1, 8, device="cuda"), torch.empty(3, 4, 8),
                                 torch.zeros(1, 2, dtype=torch.int32, device="cuda"), idx.new_zeros(1),
                                 idx.new_zeros(1), 3)


# --------------------------------------------------------------------------------------------- 2. aliased outputs

def kv_pool(device, num_slots=4):
    return torch.randn(num_slots, 2, 2, 3, 2, 8).to(device)


def stride0_pool(device):
    return lrag_ext.write_kv, dict(pool=kv_pool(device, 1).expand(4, -1, -1, -1, -1, -1),
                                   src_k=torch.randn(2, 2, 3, 2, 8, device=device),
                                   src_v=torch.randn(2, 2, 3, 2, 8, device=device),
                                   slots=torch.tensor([2, 0], device=device))


def stride0_pool_scale(device):
    fn, args = write_kv_args(device)
    args["pool_scale"] = args["pool_scale"][:1].expand(4, -1, -1)
    return fn, args


def pool_overlaps_src_k(device):  # both dense, partly the same bytes
    storage = torch.randn(4 * 192 + 96, device=device)
    fn, args = stride0_pool(device)
    args.update(pool=storage[:4 * 192].view(4, 2, 2, 3, 2, 8), src_k=storage[96:96 + 192].view(2, 2, 3, 2, 8))
    return fn, args


def pool_overlaps_src_v(device):  # src_v a non-dense view of the pool ("too hard" for torch): same first element
    fn, args = stride0_pool(device)
    pool = kv_pool(device)
    args.update(pool=pool, src_v=pool[:2, :, 0].transpose(0, 1))
    return fn, args


def pool_scale_overlaps_pool(device):
    fn, args = write_kv_args(device)
    args["pool_scale"] = args["pool"].view(torch.uint8).view(-1)[:64].view(torch.float32).view(4, 2, 2)
    return fn, args


def gather_args(device):
    return lrag_ext.gather_kv, dict(pool=kv_pool(device), slots=torch.tensor([[1, 3]], device=device),
                                    dst_k=torch.zeros(2, 1, 3, 3, 2, 8, device=device),
                                    dst_v=torch.zeros(2, 1, 3, 3, 2, 8, device=device),
                                    dst_frame=torch.tensor([[0, 2]], device=device),
                                    delta=torch.tensor([[2, -1]], device=device), rope_temporal_pairs=2)


def dst_k_is_dst_v(device):
    fn, args = gather_args(device)
    args["dst_v"] = args["dst_k"]
    return fn, args


def dst_k_same_view_as_dst_v(device):  # two identical non-dense views of one cache
    fn, args = gather_args(device)
    cache = torch.zeros(2, 1, 3, 3, 2, 16, device=device)
    args.update(dst_k=cache[..., :8], dst_v=cache[..., :8])
    return fn, args


def stride0_dst_k(device):
    fn, args = gather_args(device)
    args["dst_k"] = args["dst_k"][:, :, :1].expand(-1, -1, 3, -1, -1, -1)
    return fn, args


def stride0_dst_v(device):
    fn, args = gather_args(device)
    args["dst_v"] = args["dst_v"][:, :, :, :, :1].expand(-1, -1, -1, -1, 2, -1)
    return fn, args


def dst_v_overlaps_pool(device):
    fn, args = gather_args(device)
    args["dst_v"] = args["pool"].view(-1)[:2 * 3 * 3 * 2 * 8].view(2, 1, 3, 3, 2, 8)
    return fn, args


def dst_k_overlaps_delta(device):  # another dtype: overlap is a matter of bytes
    fn, args = gather_args(device)
    buf = torch.zeros(2 * 3 * 3 * 2 * 8, device=device)
    args.update(dst_k=buf.view(2, 1, 3, 3, 2, 8), delta=buf[:4].view(torch.int64).view(1, 2))
    return fn, args


def dst_k_overlaps_pool_scale(device):
    fn, args = gather_kv_args(device)
    buf = torch.zeros(2 * 3 * 3 * 2 * 8, device=device)
    args.update(dst_k=buf.view(2, 1, 3, 3, 2, 8), pool_scale=buf[:16].view(4, 2, 2))
    return fn, args


ALIASED = [
    (stride0_pool, r"pool has elements that share memory \(a stride-0 dim"),
    (stride0_pool_scale, r"pool_scale has elements that share memory"),
    (pool_overlaps_src_k, r"pool overlaps src_k in memory"),
    (pool_overlaps_src_v, r"pool overlaps src_v in memory"),
    (pool_scale_overlaps_pool, r"pool_scale overlaps pool in memory"),
    (dst_k_is_dst_v, r"dst_k overlaps dst_v in memory"),
    (dst_k_same_view_as_dst_v, r"dst_k overlaps dst_v in memory"),
    (stride0_dst_k, r"dst_k has elements that share memory"),
    (stride0_dst_v, r"dst_v has elements that share memory"),
    (dst_v_overlaps_pool, r"dst_v overlaps pool in memory"),
    (dst_k_overlaps_delta, r"dst_k overlaps delta in memory"),
    (dst_k_overlaps_pool_scale, r"dst_k overlaps pool_scale in memory"),
]


@pytest.mark.parametrize("make,match", ALIASED, ids=[m.__name__ for m, _ in ALIASED])
def test_aliased_outputs_are_refused_before_any_write(device, make, match):
    fn, args = make(device)
    snap = snapshot(args)
    with pytest.raises(RuntimeError, match=match):
        fn(**args)
    assert_unchanged(args, snap)


def test_disjoint_views_of_one_cache_are_still_accepted(device):
    # dst_k and dst_v interleaved in one buffer (not dense: torch cannot classify them, they share no element) and
    # as the two dense halves of one buffer.
    fn, args = gather_args(device)
    interleaved = torch.zeros(2, 1, 3, 3, 2, 2, 8, device=device)
    halves = torch.zeros(2, 2, 1, 3, 3, 2, 8, device=device)
    for dst_k, dst_v in ((interleaved[:, :, :, :, :, 0], interleaved[:, :, :, :, :, 1]), (halves[0], halves[1])):
        ref_k, ref_v = torch.zeros_like(args["dst_k"]), torch.zeros_like(args["dst_v"])
        reference.gather_kv(args["pool"], args["slots"], ref_k, ref_v, args["dst_frame"], args["delta"], 2)
        fn(**{**args, "dst_k": dst_k, "dst_v": dst_v})
        torch.testing.assert_close(dst_k, ref_k, rtol=1e-6, atol=1e-6)
        assert torch.equal(dst_v, ref_v)


# ---------------------------------------------------------------------------------------- 3. size arithmetic

@pytest.mark.parametrize("k", [2**60, 2**62, 2**63 - 1])
def test_cosine_topk_k_beyond_int64_result_bytes_names_k(device, k):
    _, args = cosine_topk_args(device)
    with pytest.raises(RuntimeError, match=rf"k = {k} is too large: the \[B, k\] results of B = 2 streams"):
        lrag_ext.cosine_topk(**{**args, "k": k})


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer aborts on a failed allocation instead of returning null")
def test_cosine_topk_unallocatable_k_names_k(device):
    # 2 * 2^40 results: 24 TiB. The allocator's own message names only a byte count.
    _, args = cosine_topk_args(device)
    with pytest.raises(RuntimeError, match=r"cosine_topk cannot allocate its \[B, k\] results for k = 1099511627776"):
        lrag_ext.cosine_topk(**{**args, "k": 2**40})


def test_cosine_topk_capacity_product_is_checked_without_overflow(device):
    # 2^40 pages x 2^24 entries wraps to 0 in int64: the check passed and an empty history was searched.
    page_table = torch.zeros(1, 1, dtype=torch.int32, device=device).expand(1, 2**40)
    args = dict(queries=torch.randn(1, 8, device=device), pages=torch.empty(0, 2**24, 8, device=device),
                page_table=page_table, lo=torch.tensor([0], device=device), hi=torch.tensor([0], device=device), k=2)
    with pytest.raises(RuntimeError, match=r"page_table.shape\[1\] \* page_size must address fewer than 2\^31 - 1 "
                                           r"logical ids, got 1099511627776 pages x page_size 16777216"):
        lrag_ext.cosine_topk(**args)


@pytest.mark.parametrize("pairs", [2**62, 2**63 - 1])
def test_gather_kv_rope_pairs_near_int64_max_are_refused(device, pairs):
    # 2 * pairs wrapped to a negative number and passed the range check.
    fn, args = gather_args(device)
    with pytest.raises(RuntimeError, match=rf"rope_temporal_pairs must be in \[0, head_dim / 2 = 4\], got {pairs}"):
        fn(**{**args, "rope_temporal_pairs": pairs})


def test_kv_frame_size_product_is_checked_without_overflow(device):
    # An empty pool's frame sizes are arbitrary: 2^32 * 2^32 * 2 wrapped to 0 < 2^31 and passed the check.
    pool = torch.empty(0, 1, 2, 1, 1, 2, device=device).expand(0, 1, 2, 2**32, 2**32, 2)
    dst = torch.empty(1, 0, 1, 1, 1, 2, device=device).expand(1, 0, 1, 2**32, 2**32, 2)
    idx = torch.empty(0, 1, dtype=torch.int64, device=device)
    with pytest.raises(RuntimeError, match=r"tokens \* heads \* head_dim of one frame must be < 2\^31 - 1, "
                                           r"got 4294967296 \* 4294967296 \* 2"):
        lrag_ext.gather_kv(pool, idx, dst, dst.clone(), idx, idx, 0)


def test_gather_kv_huge_cache_without_elements(device):
    # No layers, so the cache holds no element whatever its sizes: 16 streams x 2^60 frames. The CPU host sized
    # its duplicate-frame table B * cache_frames, which wrapped to 0 entries and was then written out of bounds.
    pool = torch.zeros(1, 0, 2, 1, 1, 2, device=device)
    dst = torch.empty(0, 1, 1, 1, 1, 2, device=device).expand(0, 16, 2**60, 1, 1, 2)
    slots = torch.zeros(16, 2, dtype=torch.int64, device=device)
    frame = torch.tensor([[2**59, 2**60 - 1]] * 16, device=device)
    lrag_ext.gather_kv(pool, slots, dst, dst.clone(), frame, torch.zeros_like(frame), 0)
    if not cuda_code(device):  # value checks (CPU): a repeated destination is still found at such sizes
        frame[5, 1] = 2**59
        with pytest.raises(RuntimeError, match=rf"dst_frame\[5, 1\] = {2**59} is also the destination of "
                                               r"dst_frame\[5, 0\]"):
            lrag_ext.gather_kv(pool, slots, dst, dst.clone(), frame, torch.zeros_like(frame), 0)


def huge_embed_head(device):
    # C + D + 32 = 2^62 floats: * 4 bytes wrapped to 0 <= 48 KiB and the launch was made (then a copy of the
    # expanded parameters failed to allocate, or the kernel ran for ever).
    C = 2**62 - 33
    one = torch.ones(1, device=device)
    return lrag_ext.embed_head, (one.view(1, 1, 1, 1).expand(1, C, 1, 1), one.expand(C), one.expand(C),
                                 one.view(1, 1).expand(1, C), one, 1, 1e-5), r"embed_head on CUDA needs C \+ D <= 12256"


def huge_pooled_embed(device):
    D = 2**62 - 33
    one = torch.ones(1, device=device)
    return lrag_ext.pooled_embed, (one.view(1, 1, 1, 1), one.view(1, 1).expand(D, 1), one.expand(D), 1), \
        r"pooled_embed on CUDA needs C \* grid \* grid \+ D <= 12256"


@pytest.mark.parametrize("make", [huge_embed_head, huge_pooled_embed], ids=["embed_head", "pooled_embed"])
def test_cuda_shared_memory_limit_is_checked_without_overflow(cuda_code_device, make):
    fn, args, match = make(cuda_code_device)
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def free_gpu_bytes() -> int:
    return torch.cuda.mem_get_info()[0] if CUDA_KERNELS else 0


@pytest.mark.skipif(free_gpu_bytes() < 40 * 2**30, reason="needs the CUDA kernels and a GPU with 40 GiB free")
def test_cuda_cosine_topk_k_beyond_int32():
    # The merge kernel took k as a 32-bit int: k = 2^31 + 8 padded nothing and left the results uninitialised.
    _, args = cosine_topk_args("cuda")
    k = 2**31 + 8
    scores, ids = lrag_ext.cosine_topk(**{**args, "queries": args["queries"][:1], "page_table": args["page_table"][:1],
                                          "lo": args["lo"][:1], "hi": args["hi"][:1], "k": k})
    ref_s, ref_i = reference.cosine_topk(args["queries"][:1], args["pages"], args["page_table"][:1], args["lo"][:1],
                                         args["hi"][:1], 16)
    assert torch.equal(ids[:, :16], ref_i) and bool((ids[:, 16:] == -1).all())
    torch.testing.assert_close(scores[:, :16], ref_s)
    assert bool(torch.isneginf(scores[:, 16:]).all())


# ---------------------------------------------------------------------------------- 4. reference, empty inputs

def test_reference_embed_head_of_an_empty_batch_matches_the_kernel(device):
    _, args = embed_head_args(device)
    args["feat"] = args["feat"][:0]
    got, want = lrag_ext.embed_head(**args), reference.embed_head(**args)
    assert got.shape == want.shape == (0, 6) and got.dtype == want.dtype == torch.float32


def test_reference_pooled_embed_and_cosine_topk_of_empty_inputs_match_the_kernels(device):
    _, args = pooled_embed_args(device)
    args["x"] = args["x"][:0]
    got, want = lrag_ext.pooled_embed(**args), reference.pooled_embed(**args)
    assert got.shape == want.shape == (0, 3) and got.dtype == want.dtype == torch.float32
    for B, max_pages, P in [(0, 2, 3), (2, 0, 3), (2, 2, 0)]:   # no stream, no history, no page
        args = dict(queries=torch.randn(B, 8, device=device), pages=torch.randn(P, 4, 8, device=device),
                    page_table=torch.zeros(B, max_pages, dtype=torch.int32, device=device),
                    lo=torch.zeros(B, dtype=torch.int64, device=device),
                    hi=torch.full((B,), 4 * min(max_pages, P), dtype=torch.int64, device=device), k=3)
        got, want = lrag_ext.cosine_topk(**args), reference.cosine_topk(**args)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (B, max_pages, P)
