"""lrag_ext.cosine_topk against the pure-PyTorch reference (and a brute-force loop), on every device."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lrag_ext
from lrag_ext import reference

from conftest import cuda_code

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Score tolerance per dtype: inputs are rounded to the dtype, accumulation is float32 on both sides, so the only
# difference is summation order.
SCORE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def make_paged(B, D, lengths, page_size, dtype, device, extra_pages=3, seed=0):
    """Random pool where each stream's pages sit at random physical positions, interleaved with other streams'.

    Returns (pages [P, page_size, D], page_table [B, max_pages] int32).
    """
    g = torch.Generator().manual_seed(seed)
    pages_needed = [math.ceil(n / page_size) for n in lengths]
    max_pages = max(pages_needed + [1])
    P = sum(pages_needed) + extra_pages
    perm = torch.randperm(P, generator=g)
    table = torch.full((B, max_pages), -7, dtype=torch.int32)  # unused entries hold junk on purpose
    used = 0
    for b, n in enumerate(pages_needed):
        table[b, :n] = perm[used:used + n].int()
        used += n
    pages = torch.randn(P, page_size, D, generator=g).to(dtype)
    return pages.to(device), table.to(device)


def check_against_reference(queries, pages, table, lo, hi, k):
    got_s, got_i = lrag_ext.cosine_topk(queries, pages, table, lo, hi, k)
    ref_s_next, ref_i_next = reference.cosine_topk(queries, pages, table, lo, hi, k + 1)  # sees the next rank too
    ref_s, ref_i = ref_s_next[:, :k], ref_i_next[:, :k]
    assert got_s.dtype == torch.float32 and got_i.dtype == torch.int64
    assert got_s.shape == ref_s.shape == (queries.shape[0], k)
    atol = SCORE_ATOL[queries.dtype]
    torch.testing.assert_close(got_s.cpu(), ref_s.cpu(), atol=atol, rtol=0)
    # Ids must be exact wherever the reference's scores are distinct beyond the tolerance; inside a near-tie the
    # two may legitimately differ by summation order, but the sets of chosen scores still agree (checked above).
    ref_i, got_i = ref_i.cpu(), got_i.cpu()
    for b in range(ref_s.shape[0]):
        s = ref_s_next[b].cpu()
        for j in range(k):
            neighbours = torch.cat([s[max(j - 1, 0):j], s[j + 1:j + 2]])
            separated = bool(((neighbours - s[j]).abs() > 2 * atol).all()) or not math.isfinite(float(s[j]))
            if separated:
                assert got_i[b, j] == ref_i[b, j], (b, j, got_i[b], ref_i[b])
    return got_s, got_i


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 7, 16])
def test_matches_reference_random_paged(device, dtype, page_size):
    B, D = 5, 33
    lengths = [0, 1, 40, 257, 100]
    pages, table = make_paged(B, D, lengths, page_size, dtype, device, seed=page_size)
    lo = torch.tensor([0, 0, 3, 10, 0], device=device)
    hi = torch.tensor([0, 1, 40, 250, 100], device=device)
    queries = torch.randn(B, D, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    for k in (1, 6, 16, 300):
        scores, ids = check_against_reference(queries, pages, table, lo, hi, k)
        # Structural invariants, independent of the reference.
        n_eligible = (hi - lo).cpu()
        for b in range(B):
            n = min(k, int(n_eligible[b]))
            assert (ids[b, n:] == -1).all() and torch.isneginf(scores[b, n:].cpu()).all()
            chosen = ids[b, :n].cpu()
            assert ((chosen >= lo[b].cpu()) & (chosen < hi[b].cpu())).all()
            assert len(set(chosen.tolist())) == n
            assert (scores[b, :n].cpu().diff() <= 0).all()


def brute_force(query, entries, lo, hi, k):
    """Python loop oracle: (score, id) pairs sorted by score desc then id asc, in float64."""
    q = query.double()
    rows = []
    for i in range(lo, hi):
        e = entries[i].double()
        rows.append((float(q @ e / ((q.norm() + 1e-8) * (e.norm() + 1e-8))), i))
    rows.sort(key=lambda r: (-r[0], r[1]))
    return rows[:k]


def test_matches_brute_force_loop(device):
    D, n, page_size = 64, 50, 4
    g = torch.Generator().manual_seed(3)
    entries = torch.randn(n, D, generator=g)
    pages = torch.cat([entries, torch.zeros((-n) % page_size, D)]).reshape(-1, page_size, D)
    perm = torch.randperm(pages.shape[0], generator=g)
    shuffled = torch.empty_like(pages)
    shuffled[perm] = pages
    table = perm.int()[None, :]
    q = torch.randn(1, D, generator=g)
    scores, ids = lrag_ext.cosine_topk(q.to(device), shuffled.to(device), table.to(device),
                                       torch.tensor([5], device=device), torch.tensor([47], device=device), 10)
    expected = brute_force(q[0], entries, 5, 47, 10)
    assert ids[0].tolist() == [i for _, i in expected]
    torch.testing.assert_close(scores[0].cpu().double(), torch.tensor([s for s, _ in expected], dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_ties_resolve_to_lower_id(device):
    # Identical embeddings everywhere: every score ties exactly, so the result is the lowest eligible ids in order.
    D, page_size = 8, 4
    base = torch.randn(D)
    pages = base.repeat(6, page_size, 1)
    table = torch.tensor([[5, 0, 3, 1, 2, 4]], dtype=torch.int32)
    q = base[None].clone()
    lo, hi = torch.tensor([2]), torch.tensor([21])
    scores, ids = lrag_ext.cosine_topk(q.to(device), pages.to(device), table.to(device), lo.to(device),
                                       hi.to(device), 5)
    ref_s, ref_i = reference.cosine_topk(q, pages, table, lo, hi, 5)
    assert ids.cpu().tolist() == ref_i.tolist() == [[2, 3, 4, 5, 6]]
    # Exactly representable values: all scores are exactly 1.
    pages2 = torch.zeros(3, 2, 4)
    pages2[..., 0] = 1.0
    table2 = torch.tensor([[2, 0, 1]], dtype=torch.int32)
    q2 = torch.tensor([[1.0, 0, 0, 0]])
    s2, i2 = lrag_ext.cosine_topk(q2.to(device), pages2.to(device), table2.to(device), torch.tensor([1], device=device),
                                  torch.tensor([6], device=device), 3)
    assert i2.cpu().tolist() == [[1, 2, 3]]
    assert s2[0].cpu().tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


def test_negative_zero_ties_with_zero(device):
    pages = torch.tensor([[[0.0, 1.0]], [[0.0, -1.0]], [[0.0, 2.0]]])
    q = torch.tensor([[1.0, 0.0]])  # every score is +0 or -0
    table = torch.tensor([[1, 0, 2]], dtype=torch.int32)
    _, ids = lrag_ext.cosine_topk(q.to(device), pages.to(device), table.to(device), torch.tensor([0], device=device),
                                  torch.tensor([3], device=device), 3)
    assert ids.cpu().tolist() == [[0, 1, 2]]


def test_nan_ranks_first_like_torch_sort(device):
    pages = torch.randn(4, 1, 3)
    pages[2, 0, 1] = float("nan")
    table = torch.arange(4, dtype=torch.int32)[None]
    q = torch.randn(1, 3)
    lo, hi = torch.tensor([0]), torch.tensor([4])
    s, i = lrag_ext.cosine_topk(q.to(device), pages.to(device), table.to(device), lo.to(device), hi.to(device), 4)
    rs, ri = reference.cosine_topk(q, pages, table, lo, hi, 4)
    assert i.cpu().tolist() == ri.tolist() and i[0, 0].item() == 2
    assert math.isnan(s[0, 0].item())


@pytest.mark.parametrize("B", [1, 256])
def test_many_streams_share_one_pool(device, B):
    D, page_size = 16, 8
    g = torch.Generator().manual_seed(B)
    P = 40
    pages = torch.randn(P, page_size, D, generator=g)
    # Every stream maps its 5 logical pages onto random (possibly shared) physical pages.
    table = torch.randint(0, P, (B, 5), generator=g, dtype=torch.int32)
    lo = torch.randint(0, 20, (B,), generator=g)
    hi = lo + torch.randint(0, 21, (B,), generator=g)
    queries = torch.randn(B, D, generator=g)
    check_against_reference(queries.to(device), pages.to(device), table.to(device), lo.to(device), hi.to(device), 6)


@pytest.mark.parametrize("D", [1, 2, 3, 4096])
def test_extreme_dims(device, D):
    pages, table = make_paged(2, D, [9, 30], 4, torch.float32, device, seed=D)
    q = torch.randn(2, D).to(device)
    check_against_reference(q, pages, table, torch.tensor([0, 2], device=device), torch.tensor([9, 30], device=device), 4)


def test_k_larger_than_history_and_empty_ranges(device):
    pages, table = make_paged(3, 8, [3, 0, 5], 2, torch.float32, device)
    q = torch.randn(3, 8, device=device)
    lo = torch.tensor([0, 0, 5], device=device)
    hi = torch.tensor([3, 0, 5], device=device)
    scores, ids = check_against_reference(q, pages, table, lo, hi, 7)
    assert (ids[0, 3:] == -1).all() and (ids[1:] == -1).all()
    assert torch.isneginf(scores[1:].cpu()).all()


INT64_MAX = 2 ** 63 - 1


@pytest.mark.parametrize("lo,hi", [(INT64_MAX - 3, INT64_MAX), (INT64_MAX, INT64_MAX), (INT64_MAX - 3, 20)])
def test_lo_near_int64_max(device, lo, hi):
    """lo/hi near INT64_MAX in one stream: the CPU kernel refuses them by name; the CUDA code (which cannot read
    values without a host synchronisation) clamps them to an empty range. Either way the other streams of the
    call are unaffected and nothing is read out of bounds (the CUDA code once overflowed lo + chunk offset)."""
    # 300 ids: the CUDA score kernel has several chunks of 128, so block offsets > 0 are added to lo
    pages, table = make_paged(2, 16, [300, 300], 4, torch.float32, device)
    q = torch.randn(2, 16, generator=torch.Generator().manual_seed(5)).to(device)
    lo_t, hi_t = torch.tensor([2, lo], device=device), torch.tensor([290, hi], device=device)
    if not cuda_code(device):
        with pytest.raises(RuntimeError, match=r"lo\[1\]|hi\[1\]"):
            lrag_ext.cosine_topk(q, pages, table, lo_t, hi_t, 4)
        return
    scores, ids = lrag_ext.cosine_topk(q, pages, table, lo_t, hi_t, 4)
    assert ids[1].tolist() == [-1] * 4 and torch.isinf(scores[1]).all() and (scores[1] < 0).all()
    want_s, want_i = reference.cosine_topk(q[:1], pages, table[:1], lo_t[:1], hi_t[:1], 4)
    assert torch.equal(ids[:1], want_i)
    torch.testing.assert_close(scores[:1], want_s, atol=1e-6, rtol=0)


def test_non_contiguous_inputs(device):
    B, D = 3, 24
    pages_full, table = make_paged(B, 2 * D, [10, 20, 30], 4, torch.float32, device)
    pages = pages_full[..., ::2]  # strided embedding dim: copied internally
    pages_strided = torch.randn(2 * pages_full.shape[0], 4, D, device=device)[::2]  # strided over pages only
    q = torch.randn(D, B, device=device).t()  # non-contiguous queries
    table_nc = torch.cat([table, table], dim=1)[:, ::2] if table.shape[1] > 0 else table
    lo = torch.tensor([0, 1, 2], device=device)
    hi = torch.tensor([10, 20, 30], device=device)
    check_against_reference(q, pages, table, lo, hi, 5)
    check_against_reference(q, pages_strided, table, lo, hi, 5)
    lo2 = torch.zeros(6, dtype=torch.int64, device=device)[::2]
    check_against_reference(q, pages_strided, table_nc, lo2, torch.tensor([4, 5, 6], device=device), 3)


def test_results_are_deterministic(device):
    pages, table = make_paged(2, 32, [500, 700], 16, torch.bfloat16, device)
    q = torch.randn(2, 32, device=device).bfloat16()
    lo, hi = torch.tensor([0, 0], device=device), torch.tensor([500, 700], device=device)
    first = lrag_ext.cosine_topk(q, pages, table, lo, hi, 16)
    for _ in range(3):
        again = lrag_ext.cosine_topk(q, pages, table, lo, hi, 16)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 4), D=st.integers(1, 40), page_size=st.integers(1, 9), k=st.integers(1, 20),
       data=st.data())
def test_property_matches_reference(B, D, page_size, k, data):
    lengths = data.draw(st.lists(st.integers(0, 60), min_size=B, max_size=B))
    seed = data.draw(st.integers(0, 2**16))
    pages, table = make_paged(B, D, lengths, page_size, torch.float32, "cpu", seed=seed)
    los = [data.draw(st.integers(0, n)) for n in lengths]
    his = [data.draw(st.integers(lo_, n)) for lo_, n in zip(los, lengths)]
    q = torch.randn(B, D, generator=torch.Generator().manual_seed(seed + 1))
    # Quantised values create frequent exact ties, exercising the id tie-break.
    if seed % 2:
        pages = pages.round()
        q = q.round()
    check_against_reference(q, pages, table, torch.tensor(los), torch.tensor(his), k)


@pytest.mark.registration_only(reason="opcheck / torch.compile check the registration and fake kernels, not the CUDA code")
def test_opcheck(device):
    pages, table = make_paged(2, 16, [20, 33], 4, torch.float32, device)
    q = torch.randn(2, 16, device=device)
    args = (q, pages, table, torch.tensor([0, 3], device=device), torch.tensor([20, 33], device=device), 6)
    torch.library.opcheck(torch.ops.lrag_ext.cosine_topk.default, args)


@pytest.mark.registration_only(reason="opcheck / torch.compile check the registration and fake kernels, not the CUDA code")
def test_torch_compile_fullgraph(device):
    pages, table = make_paged(2, 16, [20, 33], 4, torch.float32, device)
    q = torch.randn(2, 16, device=device)
    lo, hi = torch.tensor([0, 3], device=device), torch.tensor([20, 33], device=device)

    @torch.compile(fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    def search(q, pages, table, lo, hi):
        scores, ids = lrag_ext.cosine_topk(q * 2.0, pages, table, lo, hi, 6)
        return scores + 0.0, ids

    got = search(q, pages, table, lo, hi)
    want = reference.cosine_topk(q * 2.0, pages, table, lo, hi, 6)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    assert torch.equal(got[1], want[1])


# --- errors: every message names the argument ---------------------------------------------------------------

def _ok_args():
    pages = torch.randn(3, 4, 8)
    return dict(queries=torch.randn(2, 8), pages=pages, page_table=torch.tensor([[0, 1], [2, 0]], dtype=torch.int32),
                lo=torch.tensor([0, 0]), hi=torch.tensor([8, 5]), k=3)


# The last VALUE_CHECKS cases are value checks (CPU kernel only); the others are metadata checks, which the fake
# kernel makes as well.
BAD_ARGS = [
    (dict(queries=torch.randn(8)), r"queries must be a 2-D tensor"),
    (dict(queries=torch.randn(2, 8).double()), r"queries must be float32, float16 or bfloat16"),
    (dict(pages=torch.randn(3, 8)), r"pages must be a 3-D tensor"),
    (dict(pages=torch.randn(3, 4, 8).half()), r"pages must have the dtype of queries"),
    (dict(pages=torch.randn(3, 4, 9)), r"pages.shape\[2\] must equal queries.shape\[1\]"),
    (dict(pages=torch.randn(3, 0, 8)), r"page_size\) must be >= 1"),
    (dict(page_table=torch.tensor([[0, 1], [2, 0]])), r"page_table must have dtype int32, got int64"),
    (dict(page_table=torch.tensor([[0, 1]], dtype=torch.int32)), r"page_table.shape\[0\] must equal queries.shape\[0\]"),
    (dict(lo=torch.tensor([0, 0], dtype=torch.int32)), r"lo must have dtype int64, got int32"),
    (dict(hi=torch.tensor([8])), r"hi.shape\[0\] must equal"),
    (dict(k=0), r"k must be >= 1"),
    (dict(k=-3), r"k must be >= 1"),
    (dict(lo=torch.tensor([-1, 0])), r"lo\[0\] must be >= 0"),
    (dict(lo=torch.tensor([0, 6])), r"lo\[1\] must be <= hi\[1\]"),
    (dict(hi=torch.tensor([9, 5])), r"hi\[0\] = 9 is beyond what page_table can address"),
    (dict(page_table=torch.tensor([[0, 3], [2, 0]], dtype=torch.int32)), r"page_table\[0, 1\] = 3 is outside the pool"),
]
VALUE_CHECKS = 4


@pytest.mark.parametrize("change, match", BAD_ARGS)
def test_errors_name_the_argument(change, match):
    args = _ok_args()
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        lrag_ext.cosine_topk(**args)


@pytest.mark.parametrize("change, match", BAD_ARGS[:-VALUE_CHECKS])
def test_fake_kernel_makes_the_same_checks(change, match):
    # All-meta arguments run the fake kernel (as torch.compile does): the same error, not a [B, k] result.
    args = _ok_args()
    args.update(change)
    args = {n: v.to("meta") if isinstance(v, torch.Tensor) else v for n, v in args.items()}
    with pytest.raises(RuntimeError, match=match):
        lrag_ext.cosine_topk(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch_error():
    args = _ok_args()
    args["pages"] = args["pages"].cuda()
    with pytest.raises(RuntimeError, match=r"pages must be on the same device as queries"):
        lrag_ext.cosine_topk(**args)


def test_inputs_are_not_modified():
    args = _ok_args()
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    lrag_ext.cosine_topk(**args)
    for name, t in before.items():
        assert torch.equal(args[name], t), name
