"""write_kv / gather_kv (paged KV pool) against lrag_ext.reference, plus Wan's own RoPE as an oracle."""
from __future__ import annotations

import math

import pytest
import torch

import lrag_ext
from conftest import CUDA_KERNELS, cuda_code
from lrag_ext import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (layers, tokens, heads, head_dim): odd sizes, the degenerate ones, and a real head_dim.
GEOMETRIES = [(2, 3, 2, 8), (1, 1, 1, 2), (3, 5, 1, 128), (2, 2, 3, 12)]
# Tolerance of a rotated K against the float64 reference: the kernel may differ in the last ulp of sin/cos.
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


def rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def make_pool(num_slots, geom, dtype, device, gen):
    L, T, H, hd = geom
    return rand((num_slots, L, 2, T, H, hd), dtype, device, gen)


def random_gather_args(num_slots, B, m, F, device, gen, skip=0.25):
    """slots [B, m] distinct per stream with some -1, dst_frame a random injection into [0, F), delta in ±40."""
    slots = torch.stack([torch.randperm(num_slots, generator=gen)[:m] for _ in range(B)])
    slots[torch.rand((B, m), generator=gen) < skip] = -1
    dst_frame = torch.stack([torch.randperm(F, generator=gen)[:m] for _ in range(B)])
    delta = torch.randint(-40, 41, (B, m), generator=gen)
    delta[:, 0] = 0  # always exercise the plain-copy path too
    return slots.to(device), dst_frame.to(device), delta.to(device)


def run_both(pool, slots, dst_k, dst_v, dst_frame, delta, pairs, theta=10000.0):
    """Runs the op on (dst_k, dst_v) and the reference on clones; returns the reference results."""
    ref_k, ref_v = dst_k.clone(), dst_v.clone()
    reference.gather_kv(pool, slots, ref_k, ref_v, dst_frame, delta, pairs, theta)
    lrag_ext.gather_kv(pool, slots, dst_k, dst_v, dst_frame, delta, pairs, theta)
    return ref_k, ref_v


# ----------------------------------------------------------------------------------------------------------- write

@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("pool_dtype", DTYPES)
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_write_kv_matches_reference(device, src_dtype, pool_dtype, geom):
    gen = torch.Generator().manual_seed(1)
    L, T, H, hd = geom
    pool = make_pool(9, geom, pool_dtype, device, gen)
    n = 5
    src_k, src_v = rand((L, n, T, H, hd), src_dtype, device, gen), rand((L, n, T, H, hd), src_dtype, device, gen)
    slots = torch.tensor([7, -1, 0, 3, 8], device=device)
    expect = pool.clone()
    reference.write_kv(expect, src_k, src_v, slots)
    lrag_ext.write_kv(pool, src_k, src_v, slots)
    assert torch.equal(pool, expect)
    assert torch.equal(pool[3, :, 0], src_k[:, 3].to(pool_dtype))  # the reference is not vacuous


def test_write_kv_strided_sources_and_pool_view(device):
    gen = torch.Generator().manual_seed(2)
    L, T, H, hd = 3, 4, 2, 6
    big = make_pool(12, (L + 1, T, H, hd), torch.float32, device, gen)
    pool = big[2:, 1:]                                             # strided over slots and layers
    base = rand((n := 4, L, H, T, 2 * hd), torch.bfloat16, device, gen)
    src_k = base[..., :hd].permute(1, 0, 3, 2, 4)                  # [L, n, T, H, hd], dense last dim only
    src_v = rand((L, n, T, H, hd * 2), torch.bfloat16, device, gen)[..., ::2]   # last dim strided -> copied
    slots = torch.randperm(10, generator=gen)[:n].to(device)
    expect_big = big.clone()
    reference.write_kv(expect_big[2:, 1:], src_k, src_v, slots)
    lrag_ext.write_kv(pool, src_k, src_v, slots)
    assert torch.equal(big, expect_big)


def test_write_kv_empty_and_all_skipped(device):
    gen = torch.Generator().manual_seed(3)
    pool = make_pool(3, (1, 2, 1, 4), torch.float32, device, gen)
    before = pool.clone()
    lrag_ext.write_kv(pool, pool.new_zeros(1, 0, 2, 1, 4), pool.new_zeros(1, 0, 2, 1, 4),
                      torch.zeros(0, dtype=torch.long, device=device))
    lrag_ext.write_kv(pool, pool.new_zeros(1, 2, 2, 1, 4), pool.new_zeros(1, 2, 2, 1, 4),
                      torch.full((2,), -1, dtype=torch.long, device=device))
    assert torch.equal(pool, before)


# ---------------------------------------------------------------------------------------------------------- gather

@pytest.mark.parametrize("pool_dtype,dst_dtype", [(a, b) for a in DTYPES for b in DTYPES])
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_gather_kv_matches_reference(device, pool_dtype, dst_dtype, geom):
    gen = torch.Generator().manual_seed(4)
    L, T, H, hd = geom
    S, B, m, F = 11, 3, 4, 6
    pool = make_pool(S, geom, pool_dtype, device, gen)
    slots, dst_frame, delta = random_gather_args(S, B, m, F, device, gen)
    dst_k, dst_v = rand((L, B, F, T, H, hd), dst_dtype, device, gen), rand((L, B, F, T, H, hd), dst_dtype, device, gen)
    before_k = dst_k.clone()
    pairs = reference.wan_temporal_pairs(hd)
    ref_k, ref_v = run_both(pool, slots, dst_k, dst_v, dst_frame, delta, pairs)
    assert torch.equal(dst_v, ref_v)
    torch.testing.assert_close(dst_k, ref_k, **TOL[dst_dtype])
    # Entries with delta == 0 and untouched frames are exact copies; rotated ones really moved.
    plain = (slots >= 0) & (delta == 0)
    for b, j in plain.nonzero().tolist():
        assert torch.equal(dst_k[:, b, dst_frame[b, j]], pool[slots[b, j], :, 0].to(dst_dtype))
    moved = (slots >= 0) & (delta != 0)
    if moved.any():
        b, j = moved.nonzero()[0].tolist()
        assert not torch.equal(dst_k[:, b, dst_frame[b, j]].float(), pool[slots[b, j], :, 0].float())
    written = torch.zeros(B, F, dtype=torch.bool)
    for b, j in (slots >= 0).nonzero().tolist():
        written[b, dst_frame[b, j]] = True
    assert torch.equal(dst_k[:, ~written.to(device)], before_k[:, ~written.to(device)])


@pytest.mark.parametrize("pairs", [0, 1, 5, 64])
def test_gather_kv_rope_pairs_and_theta_are_parameters(device, pairs):
    gen = torch.Generator().manual_seed(5)
    geom = (2, 3, 2, 128)
    pool = make_pool(5, geom, torch.float32, device, gen)
    slots, dst_frame, delta = random_gather_args(5, 2, 3, 4, device, gen, skip=0.0)
    dst_k, dst_v = (torch.zeros(2, 2, 4, 3, 2, 128, device=device) for _ in range(2))
    ref_k, ref_v = run_both(pool, slots, dst_k, dst_v, dst_frame, delta, pairs, theta=500.0)
    torch.testing.assert_close(dst_k, ref_k, **TOL[torch.float32])
    assert torch.equal(dst_v, ref_v)
    # Dims past the temporal pairs are copied untouched.
    b, j = 0, 1
    assert torch.equal(dst_k[:, b, dst_frame[b, j], ..., 2 * pairs:], pool[slots[b, j], :, 0, ..., 2 * pairs:])


def test_gather_kv_into_views_of_a_larger_cache(device):
    gen = torch.Generator().manual_seed(6)
    L, T, H, hd, B, F = 2, 4, 3, 16, 2, 5
    pool = make_pool(8, (L, T, H, hd), torch.bfloat16, device, gen)
    cache = rand((L, 2, B, F + 3, H, T, hd), torch.float32, device, gen)   # K/V interleaved, heads before tokens
    dst_k = cache[:, 0, :, 1:F + 1].transpose(3, 4)                          # [L, B, F, T, H, hd], strided
    dst_v = cache[:, 1, :, 1:F + 1].transpose(3, 4)
    slots, dst_frame, delta = random_gather_args(8, B, 4, F, device, gen)
    expect = cache.clone()
    reference.gather_kv(pool, slots, expect[:, 0, :, 1:F + 1].transpose(3, 4),
                        expect[:, 1, :, 1:F + 1].transpose(3, 4), dst_frame, delta, 3, 10000.0)
    lrag_ext.gather_kv(pool, slots, dst_k, dst_v, dst_frame, delta, 3)
    torch.testing.assert_close(cache, expect, **TOL[torch.float32])
    assert torch.equal(cache[:, :, :, 0], expect[:, :, :, 0]) and torch.equal(cache[:, :, :, F + 1:],
                                                                            expect[:, :, :, F + 1:])


def test_gather_kv_defaults(device):
    gen = torch.Generator().manual_seed(7)
    pool = make_pool(4, (1, 2, 2, 128), torch.float32, device, gen)
    slots = torch.tensor([[2, 0]], device=device)
    frame = torch.tensor([[1, 0]], device=device)
    k, v = (torch.zeros(1, 1, 2, 2, 2, 128, device=device) for _ in range(2))
    lrag_ext.gather_kv(pool, slots, k, v, frame)                           # delta None: plain copy
    assert torch.equal(k[:, 0, 1], pool[2, :, 0]) and torch.equal(v[:, 0, 0], pool[0, :, 1])
    delta = torch.tensor([[3, -2]], device=device)
    lrag_ext.gather_kv(pool, slots, k, v, frame, delta)                    # Wan's 22 temporal pairs, theta 1e4
    ref_k = torch.zeros_like(k)
    reference.gather_kv(pool, slots, ref_k, torch.zeros_like(v), frame, delta, 22, 10000.0)
    torch.testing.assert_close(k, ref_k, **TOL[torch.float32])
    assert torch.equal(k[:, 0, 1, ..., 44:], pool[2, :, 0, ..., 44:]) and not torch.equal(k[:, 0, 1], pool[2, :, 0])


def test_rotation_round_trip(device):
    gen = torch.Generator().manual_seed(8)
    L, T, H, hd = 2, 7, 3, 128
    pool = make_pool(3, (L, T, H, hd), torch.float32, device, gen)
    slots = torch.tensor([[0, 1, 2]], device=device)
    frame = torch.tensor([[0, 1, 2]], device=device)
    delta = torch.tensor([[5, -17, 1000]], device=device)
    k, v = (torch.empty(L, 1, 3, T, H, hd, device=device) for _ in range(2))
    lrag_ext.gather_kv(pool, slots, k, v, frame, delta)
    back = lrag_ext.kv_pool_empty(3, L, T, H, hd, torch.float32, device)
    lrag_ext.write_kv(back, k[:, 0], v[:, 0], torch.tensor([0, 1, 2], device=device))
    k2, v2 = torch.empty_like(k), torch.empty_like(v)
    lrag_ext.gather_kv(back, slots, k2, v2, frame, -delta)
    torch.testing.assert_close(k2[:, 0], pool[:, :, 0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(v2[:, 0], pool[:, :, 1].transpose(0, 1))


# Wan's RoPE, written out the way the Wan DiT computes it (rope_params + complex multiply in float64), as an
# oracle independent of lrag_ext.reference.
def wan_rope_params(max_seq_len, dim, theta=10000.0):
    freqs = torch.outer(torch.arange(max_seq_len),
                        1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float64).div(dim)))
    return torch.polar(torch.ones_like(freqs), freqs)


def wan_rope_apply_one_frame(x, grid_hw, t_pos):
    """x [h*w, heads, head_dim] float32, one latent frame at temporal position t_pos -> float32."""
    d = x.shape[-1]
    freqs = torch.cat([wan_rope_params(1024, d - 4 * (d // 6)), wan_rope_params(1024, 2 * (d // 6)),
                       wan_rope_params(1024, 2 * (d // 6))], dim=1)
    c = d // 2
    ft, fh, fw = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    h, w = grid_hw
    xc = torch.view_as_complex(x.to(torch.float64).reshape(h * w, x.shape[1], -1, 2))
    f = torch.cat([ft[t_pos].view(1, 1, -1).expand(h, w, -1), fh[:h].view(h, 1, -1).expand(h, w, -1),
                   fw[:w].view(1, w, -1).expand(h, w, -1)], dim=-1).reshape(h * w, 1, -1)
    return torch.view_as_real(xc * f).flatten(2).float()


@pytest.mark.parametrize("head_dim", [128, 12])
def test_gather_kv_equals_wan_rope_at_the_new_position(device, head_dim):
    gen = torch.Generator().manual_seed(9)
    h, w, heads, L = 2, 3, 2, 2
    raw = torch.randn(L, h * w, heads, head_dim, generator=gen)
    positions = [0, 1, 9, 11, 37]
    # Stored without temporal RoPE (spatial RoPE applied, temporal at 0 = identity), as a K at position 0.
    stored = torch.stack([wan_rope_apply_one_frame(raw[l], (h, w), 0) for l in range(L)])
    pool = lrag_ext.kv_pool_empty(1, L, h * w, heads, head_dim, torch.float32, device)
    lrag_ext.write_kv(pool, stored[:, None].to(device), stored[:, None].to(device), torch.tensor([0], device=device))
    B = len(positions)
    k, v = (torch.zeros(L, B, 1, h * w, heads, head_dim, device=device) for _ in range(2))
    lrag_ext.gather_kv(pool, torch.zeros(B, 1, dtype=torch.long, device=device), k, v,
                       torch.zeros(B, 1, dtype=torch.long, device=device),
                       torch.tensor(positions, device=device)[:, None])
    for b, p in enumerate(positions):
        want = torch.stack([wan_rope_apply_one_frame(raw[l], (h, w), p) for l in range(L)])
        torch.testing.assert_close(k[:, b, 0].cpu(), want, rtol=1e-6, atol=1e-6)


def test_reference_rotation_equals_wan_rope():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(3, 4, 2, 128, generator=gen)
    got = reference.rope_rotate_temporal(x, torch.tensor([0, 5, 700]), 22).float()
    for e, p in enumerate([0, 5, 700]):
        want = wan_rope_apply_one_frame(x[e], (1, 4), p)
        # the spatial axes are not applied by the rotation: compare temporal dims, and the rest verbatim
        torch.testing.assert_close(got[e][..., :44], want.reshape(4, 2, 128)[..., :44], rtol=0, atol=0)
        assert torch.equal(got[e][..., 44:], x[e][..., 44:])


# --------------------------------------------------------------------------------------------- errors, no change

def gather_setup(device):
    gen = torch.Generator().manual_seed(11)
    pool = make_pool(4, (2, 3, 2, 8), torch.float32, device, gen)
    slots = torch.tensor([[1, 3]], device=device)
    frame = torch.tensor([[0, 2]], device=device)
    delta = torch.tensor([[2, -1]], device=device)
    k, v = rand((2, 1, 3, 3, 2, 8), torch.float32, device, gen), rand((2, 1, 3, 3, 2, 8), torch.float32, device, gen)
    return pool, slots, k, v, frame, delta


GATHER_BAD = [
    (lambda a: a.update(pool=a["pool"][0]), r"pool must be a 6-D tensor"),
    (lambda a: a.update(pool=a["pool"].repeat(1, 1, 2, 1, 1, 1)), r"pool.shape\[2\] must be 2"),
    (lambda a: a.update(pool=a["pool"][..., :7]), r"head_dim\) must be even"),
    (lambda a: a.update(pool=a["pool"].long()), r"pool must be float32, float16, bfloat16 or float8_e4m3fn"),
    (lambda a: a.update(pool=a["pool"].transpose(4, 5)), r"pool must be dense in its last dim"),
    (lambda a: a.update(dst_k=a["dst_k"][:, :, :, :2]), r"dst_k.shape\[3\] must equal pool.shape\[3\] \(tokens\)"),
    (lambda a: a.update(dst_k=a["dst_k"][:1]), r"dst_k.shape\[0\] must equal pool.shape\[1\] \(layers\)"),
    (lambda a: a.update(dst_v=a["dst_v"].half()), r"dst_v must have the dtype of dst_k"),
    (lambda a: a.update(dst_v=a["dst_v"][:, :, :2]), r"dst_v must have the shape of dst_k"),
    (lambda a: a.update(slots=a["slots"].int()), r"slots must have dtype int64"),
    (lambda a: a.update(slots=a["slots"][0]), r"slots must be a 2-D tensor"),
    (lambda a: a.update(slots=a["slots"].repeat(2, 1)), r"slots.shape\[0\] must equal dst_k.shape\[1\] \(B\)"),
    (lambda a: a.update(dst_frame=a["dst_frame"][:, :1]), r"dst_frame must have the shape of slots"),
    (lambda a: a.update(delta=a["delta"].float()), r"delta must have dtype int64"),
    (lambda a: a.update(rope_temporal_pairs=5), r"rope_temporal_pairs must be in \[0, head_dim / 2 = 4\]"),
    (lambda a: a.update(rope_temporal_pairs=-1), r"rope_temporal_pairs must be in"),
    (lambda a: a.update(rope_theta=0.0), r"rope_theta must be a positive finite number"),
    # value errors (CPU): the first entry is valid, so a partial write would be visible
    (lambda a: a["slots"].__setitem__((0, 1), 4), r"slots\[0, 1\] = 4 is outside the pool"),
    (lambda a: a["slots"].__setitem__((0, 1), -2), r"slots\[0, 1\] = -2 is outside the pool"),
    (lambda a: a["dst_frame"].__setitem__((0, 1), 3), r"dst_frame\[0, 1\] = 3 is outside the cache"),
    (lambda a: a["dst_frame"].__setitem__((0, 1), 0), r"dst_frame\[0, 1\] = 0 is also the destination of dst_frame\[0, 0\]"),
]


# The last VALUE_CHECKS cases of each list are value checks, made on CPU only (CUDA skips such entries instead).
VALUE_CHECKS = {"gather": 4, "write": 2}


def skip_value_check_on_cuda(device, cases, i, op):
    if cuda_code(device) and i >= len(cases) - VALUE_CHECKS[op]:
        pytest.skip("value checks are CPU-only (they would synchronise a GPU)")


def as_meta(args: dict) -> dict:
    """The arguments as meta tensors of the same shapes, strides and dtypes: a call runs the fake kernel."""
    return {n: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            if isinstance(t, torch.Tensor) else t for n, t in args.items()}


def gather_bad_args(device, case):
    pool, slots, k, v, frame, delta = gather_setup(device)
    args = dict(pool=pool, slots=slots, dst_k=k, dst_v=v, dst_frame=frame, delta=delta, rope_temporal_pairs=2,
                rope_theta=10000.0)
    GATHER_BAD[case][0](args)
    return args


WRITE_BAD = [
    (lambda a: a.update(src_k=a["src_k"][0]), r"src_k must be a 5-D tensor"),
    (lambda a: a.update(src_k=a["src_k"][:, :, :1]), r"src_k.shape\[2\] must equal pool.shape\[3\] \(tokens\)"),
    (lambda a: a.update(src_v=a["src_v"].half()), r"src_v must have the dtype of src_k"),
    (lambda a: a.update(src_v=a["src_v"][:, :1]), r"src_v must have the shape of src_k"),
    (lambda a: a.update(src_k=a["src_k"].int(), src_v=a["src_v"].int()), r"src_k must be float32, float16"),
    (lambda a: a.update(slots=a["slots"][:1]), r"slots.shape\[0\] must equal src_k.shape\[1\] \(n\)"),
    (lambda a: a.update(slots=a["slots"].int()), r"slots must have dtype int64"),
    (lambda a: a.update(pool=a["pool"][:, :, :1]), r"pool.shape\[2\] must be 2"),
    (lambda a: a["slots"].__setitem__(1, 4), r"slots\[1\] = 4 is outside the pool"),
    (lambda a: a["slots"].__setitem__(1, 2), r"slots\[1\] = 2 is listed more than once"),
]


def write_bad_args(device, case):
    gen = torch.Generator().manual_seed(12)
    pool = make_pool(4, (2, 3, 2, 8), torch.float32, device, gen)
    args = dict(pool=pool, src_k=rand((2, 2, 3, 2, 8), torch.float32, device, gen),
                src_v=rand((2, 2, 3, 2, 8), torch.float32, device, gen), slots=torch.tensor([2, 0], device=device))
    WRITE_BAD[case][0](args)
    return args


# op: (its bad cases, their arguments, the op).
BAD = {"gather": (GATHER_BAD, gather_bad_args, lrag_ext.gather_kv),
       "write": (WRITE_BAD, write_bad_args, lrag_ext.write_kv)}


@pytest.mark.parametrize("op,case", [(op, i) for op, (cases, _, _) in BAD.items() for i in range(len(cases))])
def test_errors_name_the_argument_and_change_nothing(device, op, case):
    cases, make, fn = BAD[op]
    skip_value_check_on_cuda(device, cases, case, op)
    args = make(device, case)
    snap = {n: t.clone() for n, t in args.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(RuntimeError, match=cases[case][1]):
        fn(**args)
    for n, t in snap.items():
        assert torch.equal(args[n], t), f"{n} changed by a failed call"


# The metadata errors (all but the value checks) are made by the fake kernels too: with all-meta arguments (as
# under torch.compile) a bad call raises the same error instead of passing.
@pytest.mark.parametrize("op,case", [(op, i) for op, (cases, _, _) in BAD.items()
                                     for i in range(len(cases) - VALUE_CHECKS[op])])
def test_fake_kernels_make_the_same_checks(op, case):
    cases, make, fn = BAD[op]
    with pytest.raises(RuntimeError, match=cases[case][1]):
        fn(**as_meta(make("cpu", case)))


# --------------------------------------------------------------------------------------------------------- fp8

def fp8_pool_with_frames(device, geom, n_slots, gen, src_dtype=torch.float32):
    """An fp8 pool whose slots were all written by write_kv (per-frame scales differ: frames have other ranges)."""
    L, T, H, hd = geom
    pool = lrag_ext.kv_pool_empty(n_slots, L, T, H, hd, torch.float8_e4m3fn, device)
    scale = lrag_ext.kv_pool_scale_empty(pool)
    mag = torch.logspace(-3, 2, n_slots)[None, :, None, None, None]
    src_k = (rand((L, n_slots, T, H, hd), torch.float32, "cpu", gen) * mag).to(device=device, dtype=src_dtype)
    src_v = (rand((L, n_slots, T, H, hd), torch.float32, "cpu", gen) * mag).to(device=device, dtype=src_dtype)
    lrag_ext.write_kv(pool, src_k, src_v, torch.arange(n_slots, device=device), pool_scale=scale)
    return pool, scale, src_k, src_v


@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("geom", [(2, 3, 2, 8), (1, 1, 1, 2), (2, 5, 3, 128)])
def test_fp8_write_matches_reference(device, src_dtype, geom):
    gen = torch.Generator().manual_seed(20)
    L, T, H, hd = geom
    pool, scale, _, _ = fp8_pool_with_frames(device, geom, 6, gen, src_dtype)
    src_k, src_v = rand((L, 4, T, H, hd), src_dtype, device, gen), rand((L, 4, T, H, hd), src_dtype, device, gen)
    src_v[:, 2] = 0  # an all-zero frame gets scale 1
    slots = torch.tensor([5, -1, 0, 2], device=device)
    want, want_scale = pool.clone(), scale.clone()
    reference.write_kv(want, src_k, src_v, slots, want_scale)
    lrag_ext.write_kv(pool, src_k, src_v, slots, pool_scale=scale)
    assert torch.equal(pool.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(scale, want_scale)
    assert torch.equal(scale[0, :, 1], torch.ones(L, device=device))
    amax = src_k[:, 0].float().abs().flatten(1).amax(1)
    torch.testing.assert_close(scale[5, :, 0], amax / 448, rtol=0, atol=0)
    # dequantised values are within fp8's half-ulp (2^-4 relative) plus the smallest subnormal step
    back = pool[5, :, 0].float() * scale[5, :, 0][:, None, None, None]
    err = (back - src_k[:, 0].float()).abs()
    assert (err <= src_k[:, 0].float().abs() * 2 ** -4 + scale[5, :, 0][:, None, None, None] * 2 ** -9).all()


@pytest.mark.parametrize("src_dtype", DTYPES)
def test_fp8_nan_and_inf_do_not_poison_the_frame_scale(device, src_dtype):
    """A frame with NaN / inf values: its scale is the amax of its finite values (as for the same frame without
    them), its finite values are quantised exactly as without them, NaN stays NaN and +-inf saturates to
    +-448 * scale. Same bytes on every backend and in the reference."""
    gen = torch.Generator().manual_seed(27)
    geom = (2, 3, 2, 8)
    pool, scale, _, _ = fp8_pool_with_frames(device, geom, 4, gen, src_dtype)
    L, T, H, hd = geom
    src_k, src_v = rand((L, 2, T, H, hd), src_dtype, device, gen), rand((L, 2, T, H, hd), src_dtype, device, gen)
    clean_k = src_k.clone()
    bad = [(0, 0, 1, 0, 3), (1, 0, 2, 1, 7), (0, 1, 0, 0, 0)]
    for idx, value in zip(bad, [float("nan"), float("inf"), -float("inf")]):
        src_k[idx] = value
    slots = torch.tensor([3, 1], device=device)
    want, want_scale = pool.clone(), scale.clone()
    reference.write_kv(want, src_k, src_v, slots, want_scale)
    lrag_ext.write_kv(pool, src_k, src_v, slots, pool_scale=scale)
    assert torch.equal(pool.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(scale, want_scale)
    # the scale and the finite values are those of the frame without its NaN / inf
    clean, clean_scale = pool.clone(), scale.clone()
    lrag_ext.write_kv(clean, clean_k, src_v, slots, pool_scale=clean_scale)
    assert torch.equal(scale, clean_scale)
    stored = pool[:, :, 0].float()  # [slot, layer, T, H, hd]
    poisoned = torch.zeros_like(stored, dtype=torch.bool)
    for l, e, t, h, d in bad:
        poisoned[slots[e], l, t, h, d] = True
    got = [stored[slots[e], l, t, h, d].item() for l, e, t, h, d in bad]
    assert math.isnan(got[0]) and got[1:] == [448.0, -448.0]
    assert torch.equal(stored[~poisoned], clean[:, :, 0].float()[~poisoned])


@pytest.mark.parametrize("dst_dtype", DTYPES)
def test_fp8_gather_matches_reference(device, dst_dtype):
    gen = torch.Generator().manual_seed(21)
    geom = (3, 4, 2, 128)
    pool, scale, _, _ = fp8_pool_with_frames(device, geom, 9, gen)
    slots, dst_frame, delta = random_gather_args(9, 2, 5, 7, device, gen)
    dst_k, dst_v = (rand((3, 2, 7, 4, 2, 128), dst_dtype, device, gen) for _ in range(2))
    ref_k, ref_v = dst_k.clone(), dst_v.clone()
    reference.gather_kv(pool, slots, ref_k, ref_v, dst_frame, delta, 22, 10000.0, pool_scale=scale)
    lrag_ext.gather_kv(pool, slots, dst_k, dst_v, dst_frame, delta, pool_scale=scale)
    assert torch.equal(dst_v, ref_v)
    torch.testing.assert_close(dst_k, ref_k, **TOL[dst_dtype])


@pytest.mark.parametrize("meta", [False, True], ids=["kernel", "fake"])
def test_fp8_scale_errors(meta):
    gen = torch.Generator().manual_seed(22)
    pool, scale, src_k, src_v = fp8_pool_with_frames("cpu", (2, 3, 2, 8), 4, gen)
    if meta:  # the fake kernels make the same checks
        pool, scale, src_k, src_v = as_meta(dict(p=pool, s=scale, k=src_k, v=src_v)).values()
    slots = torch.tensor([1, 3], device=pool.device)
    k = torch.zeros(2, 1, 3, 3, 2, 8, device=pool.device)
    args = (pool, slots[None], k, k.clone(), torch.tensor([[0, 2]], device=pool.device))
    with pytest.raises(RuntimeError, match="a float8_e4m3fn pool needs pool_scale"):
        lrag_ext.write_kv(pool, src_k[:, :2], src_v[:, :2], slots)
    with pytest.raises(RuntimeError, match="a float8_e4m3fn pool needs pool_scale"):
        lrag_ext.gather_kv(*args)
    with pytest.raises(RuntimeError, match=r"pool_scale.shape\[1\] must equal pool.shape\[1\] \(layers\)"):
        lrag_ext.gather_kv(*args, pool_scale=scale[:, :1])
    with pytest.raises(RuntimeError, match="pool_scale must have dtype (Float|float32)"):
        lrag_ext.write_kv(pool, src_k[:, :2], src_v[:, :2], slots, pool_scale=scale.double())
    with pytest.raises(RuntimeError, match="pool_scale is only used with a float8_e4m3fn pool"):
        lrag_ext.write_kv(pool.float(), src_k[:, :2], src_v[:, :2], slots, pool_scale=scale)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        lrag_ext.kv_pool_empty(1, 1, 1, 1, 2, torch.float8_e5m2)


@pytest.mark.registration_only(reason="opcheck / torch.compile check the registration and fake kernels, not the CUDA code")
def test_fp8_opcheck(device):
    # test_schema compares tensors with ops torch lacks for float8 ("mul" on CPU); the schema itself is
    # checked by test_opcheck on float pools.
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    gen = torch.Generator().manual_seed(23)
    pool, scale, src_k, src_v = fp8_pool_with_frames(device, (2, 3, 2, 8), 4, gen)
    k = torch.zeros(2, 1, 3, 3, 2, 8, device=device)
    slots = torch.tensor([[1, 3]], device=device)
    torch.library.opcheck(torch.ops.lrag_ext.gather_kv.default,
                          (pool, slots, k, k.clone(), torch.tensor([[0, 2]], device=device), slots - 1, 2, 10000.0),
                          {"pool_scale": scale}, test_utils=utils)
    torch.library.opcheck(torch.ops.lrag_ext.write_kv.default,
                          (pool, src_k[:, :2], src_v[:, :2], slots[0]), {"pool_scale": scale}, test_utils=utils)


@pytest.mark.registration_only(reason="opcheck / torch.compile check the registration and fake kernels, not the CUDA code")
def test_fp8_torch_compile_fullgraph(device):
    gen = torch.Generator().manual_seed(24)
    pool, scale, src_k, src_v = fp8_pool_with_frames(device, (2, 3, 2, 8), 4, gen)
    slots = torch.tensor([[1, 3]], device=device)
    frame = torch.tensor([[0, 2]], device=device)

    def step(pool, scale, k, v):
        lrag_ext.write_kv(pool, src_k[:, :2] * 3, src_v[:, :2], torch.tensor([3, 0], device=device), pool_scale=scale)
        lrag_ext.gather_kv(pool, slots, k, v, frame, slots + 2, 2, pool_scale=scale)
        return k.sum() + v.sum()

    k = torch.zeros(2, 1, 3, 3, 2, 8, device=device)
    runs = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        p, sc, kk, vv = pool.clone(), scale.clone(), k.clone(), k.clone()
        runs.append((fn(p, sc, kk, vv), p.view(torch.uint8), sc, kk, vv))
    torch.testing.assert_close(runs[0][0], runs[1][0])  # the sums may be reduced in another order
    for a, b in zip(runs[0][1:], runs[1][1:]):
        assert torch.equal(a, b)


needs_cuda_kernels = pytest.mark.skipif(not CUDA_KERNELS, reason="no CUDA device/kernels")


def test_cuda_skips_out_of_range_entries_instead_of_synchronising(cuda_code_device):
    dev = cuda_code_device
    pool, slots, k, v, frame, delta = gather_setup(dev)
    slots = torch.tensor([[1, 4], [-3, 2]], device=dev)       # 4 and -3 are outside the pool
    frame = torch.tensor([[0, 2], [1, 9]], device=dev)        # 9 is outside the cache
    delta = torch.tensor([[2, -1], [0, 5]], device=dev)
    k, v = k.repeat(1, 2, 1, 1, 1, 1), v.repeat(1, 2, 1, 1, 1, 1)
    keep = torch.tensor([[1, -1], [-1, -1]], device=dev)      # only entry (0, 0) is valid
    ref_k, ref_v = k.clone(), v.clone()
    reference.gather_kv(pool, keep, ref_k, ref_v, frame, delta, 2, 10000.0)
    lrag_ext.gather_kv(pool, slots, k, v, frame, delta, 2)
    torch.testing.assert_close(k, ref_k, **TOL[torch.float32])
    assert torch.equal(v, ref_v)
    before = pool.clone()
    src = torch.randn(2, 2, 3, 2, 8, device=dev)
    lrag_ext.write_kv(pool, src, src, torch.tensor([7, -5], device=dev))
    assert torch.equal(pool, before)


@needs_cuda_kernels
@pytest.mark.parametrize("pool_dtype,dst_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)])
def test_cuda_pinned_host_pool(pool_dtype, dst_dtype):
    gen = torch.Generator().manual_seed(13)
    geom = (3, 5, 2, 128)
    host = make_pool(7, geom, pool_dtype, "cpu", gen).pin_memory()
    slots, dst_frame, delta = random_gather_args(7, 2, 4, 6, "cuda", gen)
    dst_k, dst_v = (torch.zeros(3, 2, 6, 5, 2, 128, dtype=dst_dtype, device="cuda") for _ in range(2))
    ref_k, ref_v = run_both(host, slots, dst_k, dst_v, dst_frame, delta, 22)
    torch.testing.assert_close(dst_k, ref_k, **TOL[dst_dtype])
    assert torch.equal(dst_v, ref_v)
    # writing into the pinned pool from device frames, then reading it back on the host
    src = torch.randn(3, 2, 5, 2, 128, device="cuda")
    lrag_ext.write_kv(host, src, -src, torch.tensor([6, 0], device="cuda"))
    torch.cuda.synchronize()
    assert torch.equal(host[6, :, 0], src[:, 0].cpu().to(pool_dtype))
    assert torch.equal(host[0, :, 1], (-src[:, 1]).cpu().to(pool_dtype))
    with pytest.raises(RuntimeError, match="pool is in host memory that is not pinned"):
        lrag_ext.gather_kv(host.clone(), slots, dst_k, dst_v, dst_frame, delta)


def test_kv_pool_empty():
    p = lrag_ext.kv_pool_empty(3, 2, 5, 4, 8, torch.float16)
    assert p.shape == (3, 2, 2, 5, 4, 8) and p.dtype == torch.float16 and p.is_contiguous()
    with pytest.raises(ValueError, match="head_dim must be even"):
        lrag_ext.kv_pool_empty(3, 2, 5, 4, 7)
    with pytest.raises(ValueError, match="tokens must be an int >= 0"):
        lrag_ext.kv_pool_empty(3, 2, -5, 4, 8)
    p8 = lrag_ext.kv_pool_empty(3, 2, 5, 4, 8, torch.float8_e4m3fn)
    sc = lrag_ext.kv_pool_scale_empty(p8)
    assert sc.shape == (3, 2, 2) and sc.dtype == torch.float32 and torch.equal(sc, torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match="dtype must be float32"):
        lrag_ext.kv_pool_empty(3, 2, 5, 4, 8, torch.int8)
    with pytest.raises(ValueError, match="pin_memory=True needs device='cpu'"):
        lrag_ext.kv_pool_empty(3, 2, 5, 4, 8, device="meta", pin_memory=True)


# ----------------------------------------------------------------------------------------- opcheck and compile

@pytest.mark.registration_only(reason="opcheck / torch.compile check the registration and fake kernels, not the CUDA code")
def test_opcheck(device):
    pool, slots, k, v, frame, delta = gather_setup(device)
    torch.library.opcheck(torch.ops.lrag_ext.gather_kv.default, (pool, slots, k, v, frame, delta, 2, 10000.0))
    src = torch.randn(2, 2, 3, 2, 8, device=device)
    torch.library.opcheck(torch.ops.lrag_ext.write_kv.default, (pool, src.half(), src.half() + 1, torch.tensor([3, -1], device=device)))


@pytest.mark.registration_only(reason="opcheck / torch.compile check the registration and fake kernels, not the CUDA code")
def test_torch_compile_fullgraph(device):
    pool, slots, k, v, frame, delta = gather_setup(device)
    src_k, src_v = torch.randn(2, 2, 3, 2, 8, device=device), torch.randn(2, 2, 3, 2, 8, device=device)
    new = torch.tensor([0, 2], device=device)

    def step(pool, k, v):
        lrag_ext.write_kv(pool, src_k, src_v, new)
        lrag_ext.gather_kv(pool, slots, k, v, frame, delta, 2)
        return k.sum() + v.sum()

    p1, k1, v1 = pool.clone(), k.clone(), v.clone()
    eager = step(p1, k1, v1)
    p2, k2, v2 = pool.clone(), k.clone(), v.clone()
    compiled = torch.compile(step, fullgraph=True)(p2, k2, v2)
    assert torch.equal(p1, p2) and torch.equal(k1, k2) and torch.equal(v1, v2)
    torch.testing.assert_close(eager, compiled)
