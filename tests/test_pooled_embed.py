"""lrag_ext.pooled_embed against reference.pooled_embed (adaptive avg pool -> Linear -> L2-normalise)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lrag_ext
from lrag_ext import reference

TOL = {torch.float32: (2e-5, 2e-6), torch.bfloat16: (2e-2, 5e-3), torch.float16: (5e-3, 1e-3)}


def make(n, c, h, w, grid, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g) + 0.3
    wt = torch.randn(d, c * grid * grid, generator=g) / (c * grid * grid) ** 0.5
    b = 0.1 * torch.randn(d, generator=g)
    return [t.to(device, dtype) for t in (x, wt, b)]


def check(x, w, b, grid):
    out = lrag_ext.pooled_embed(x, w, b, grid)
    ref = reference.pooled_embed(x, w, b, grid)
    rtol, atol = TOL[x.dtype]
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


def test_adaptive_bins_match_torch():
    """The bins reference.pooled_embed documents are those of adaptive_avg_pool2d (overlapping included)."""
    for size in range(1, 14):
        for grid in range(1, size + 1):
            x = torch.arange(size, dtype=torch.float64)[None, None, :, None].repeat(1, 1, 1, 1)
            bins = reference.adaptive_bins(size, grid)
            want = torch.tensor([sum(range(s, e)) / (e - s) for s, e in bins], dtype=torch.float64)
            got = F.adaptive_avg_pool2d(x, (grid, 1)).flatten()
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shape,grid", [((3, 16, 60, 104), 4), ((2, 5, 7, 11), 3), ((1, 3, 5, 5), 5),
                                        ((2, 4, 9, 4), 4), ((1, 2, 13, 7), 6), ((3, 1, 1, 1), 1), ((2, 16, 8, 8), 8)])
def test_matches_reference(device, shape, grid):
    check(*make(*shape, grid=grid, d=19, device=device), grid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(device, dtype):
    check(*make(3, 16, 30, 52, 4, 64, dtype=dtype, device=device), 4)


def test_strided_inputs(device):
    x, w, b = make(3, 6, 10, 14, 3, 8, device=device)
    for variant in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3),
                    torch.randn(3, 6, 10, 28, device=device)[..., ::2], torch.randn(6, 3, 10, 14, device=device).transpose(0, 1)):
        check(variant, w, b, 3)


def test_empty_batch(device):
    x, w, b = make(0, 4, 6, 6, 2, 5, device=device)
    assert lrag_ext.pooled_embed(x, w, b, 2).shape == (0, 5)


@pytest.mark.registration_only(reason="opcheck / torch.compile check the registration and fake kernels, not the CUDA code")
def test_opcheck(device):
    x, w, b = make(2, 4, 7, 9, 3, 5, device=device)
    torch.library.opcheck(torch.ops.lrag_ext.pooled_embed.default, (x, w, b, 3))


@pytest.mark.registration_only(reason="opcheck / torch.compile check the registration and fake kernels, not the CUDA code")
def test_compile(device):
    x, w, b = make(2, 4, 7, 9, 3, 5, device=device)
    fn = torch.compile(lambda x, w, b: lrag_ext.pooled_embed(x, w, b, 3) + 1, fullgraph=True)
    torch.testing.assert_close(fn(x, w, b), reference.pooled_embed(x, w, b, 3) + 1, rtol=2e-5, atol=2e-6)


BAD_ARGS = [
    (lambda a: a.__setitem__(0, a[0][0]), 2, r"x must be a 4-D tensor"),
    (lambda a: a.__setitem__(0, a[0].int()), 2, r"x must be float32, float16 or bfloat16"),
    (lambda a: a.__setitem__(1, a[1].half()), 2, r"weight must have the dtype of the input"),
    (lambda a: a.__setitem__(1, a[1][:, :5]), 2, r"weight.shape\[1\] must equal C \* grid \* grid \(16\)"),
    (lambda a: a.__setitem__(2, a[2][:1]), 2, r"bias.shape\[0\] must equal weight.shape\[0\] \(D\)"),
    (lambda a: None, 0, r"grid must be in \[1, min\(H, W\)\] = \[1, 5\], got 0"),
    (lambda a: None, 6, r"grid must be in \[1, min\(H, W\)\] = \[1, 5\], got 6"),
]


@pytest.mark.parametrize("meta", [False, True], ids=["kernel", "fake"])
@pytest.mark.parametrize("mutate,grid,msg", BAD_ARGS)
def test_errors(mutate, grid, msg, meta):
    # meta: all-meta arguments run the fake kernel (as torch.compile does), which must make the same checks.
    args = make(2, 4, 5, 6, 2, 3)
    mutate(args)
    if meta:
        args = [t.to("meta") for t in args]
    with pytest.raises(RuntimeError, match=msg):
        lrag_ext.pooled_embed(*args, grid)
