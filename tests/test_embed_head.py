"""lrag_ext.embed_head against reference.embed_head (GroupNorm -> SiLU -> GAP -> Linear -> L2-normalise)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lrag_ext
from lrag_ext import reference

TOL = {torch.float32: (2e-5, 2e-6), torch.bfloat16: (2e-2, 5e-3), torch.float16: (5e-3, 1e-3)}


def make(n, c, h, w, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g) * 2 + 0.5)
    params = [1 + 0.3 * torch.randn(c, generator=g), 0.2 * torch.randn(c, generator=g),
              torch.randn(d, c, generator=g) / c ** 0.5, 0.1 * torch.randn(d, generator=g)]
    return [t.to(device, dtype) for t in [x, *params]]


def check(args, groups, eps=1e-5):
    out = lrag_ext.embed_head(*args, groups, eps)
    ref = reference.embed_head(*args, groups, eps)
    rtol, atol = TOL[args[0].dtype]
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    return out


@pytest.mark.parametrize("shape,groups", [((3, 256, 8, 13), 32), ((2, 24, 7, 9), 8), ((1, 5, 1, 1), 5),
                                          ((4, 6, 3, 1), 1), ((1, 12, 1, 5), 4)])
def test_matches_reference(device, shape, groups):
    check(make(*shape, d=17, device=device), groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(device, dtype):
    check(make(3, 32, 8, 13, 64, dtype=dtype, device=device), 32)


def test_layouts(device):
    x, *p = make(3, 16, 6, 10, 9, device=device)
    base = reference.embed_head(x, *p, 4, 1e-5)
    for variant in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3),
                    torch.cat([x, x], 1)[:, :16], x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)):
        torch.testing.assert_close(lrag_ext.embed_head(variant, *p, 4, 1e-5), base, rtol=2e-5, atol=2e-6)
    wide = torch.randn(3, 16, 6, 20, device=device)[..., ::2]  # non-flat H/W strides: copied first
    torch.testing.assert_close(lrag_ext.embed_head(wide, *p, 4, 1e-5), reference.embed_head(wide, *p, 4, 1e-5),
                               rtol=2e-5, atol=2e-6)


def test_constant_and_large_offset(device):
    """Constant groups (variance 0 -> eps) and a large mean (cancellation) stay accurate."""
    x, *p = make(2, 8, 5, 5, 7, device=device)
    const = torch.full_like(x, 3.0)
    check([const, *p], 4)
    check([x, p[0] * 150, *p[1:]], 4)  # post-norm values far beyond +-87: the saturated ends of SiLU
    # At |mean| >> std float32 itself is the limit: be at most 2x as wrong as PyTorch's float32 path.
    big = x + 1000.0
    exact = reference.embed_head(big, *p, 2, 1e-5)
    torch_f32 = F.normalize(F.linear(F.silu(F.group_norm(big, 2, p[0], p[1], 1e-5)).mean((2, 3)), p[2], p[3]), dim=-1)
    err_op = (lrag_ext.embed_head(big, *p, 2, 1e-5) - exact).abs().max()
    assert err_op <= 2 * (torch_f32 - exact).abs().max() + 1e-6


def test_zero_output_row_stays_zero(device):
    x, gw, gb, fw, fb = make(2, 4, 3, 3, 5, device=device)
    out = lrag_ext.embed_head(x, gw, gb, torch.zeros_like(fw), torch.zeros_like(fb), 2, 1e-5)
    assert torch.equal(out, torch.zeros_like(out))


def test_empty_batch(device):
    x, *p = make(0, 8, 4, 4, 6, device=device)
    assert lrag_ext.embed_head(x, *p, 2, 1e-5).shape == (0, 6)


@pytest.mark.registration_only(reason="opcheck / torch.compile check the registration and fake kernels, not the CUDA code")
def test_opcheck(device):
    args = make(2, 8, 5, 6, 7, device=device)
    torch.library.opcheck(torch.ops.lrag_ext.embed_head.default, (*args, 4, 1e-5))


@pytest.mark.registration_only(reason="opcheck / torch.compile check the registration and fake kernels, not the CUDA code")
def test_compile(device):
    args = make(2, 8, 5, 6, 7, device=device)
    fn = torch.compile(lambda *a: lrag_ext.embed_head(*a, 4, 1e-5) * 2, fullgraph=True)
    torch.testing.assert_close(fn(*args), 2 * reference.embed_head(*args, 4, 1e-5), rtol=2e-5, atol=4e-6)


BAD_ARGS = [
    (lambda a: a.__setitem__(0, a[0][0]), r"feat must be a 4-D tensor"),
    (lambda a: a.__setitem__(0, a[0].long()), r"feat must be float32, float16 or bfloat16"),
    (lambda a: a.__setitem__(1, a[1].double()), r"gn_weight must have the dtype of the input"),
    (lambda a: a.__setitem__(2, a[2][:3]), r"gn_bias.shape\[0\] must equal feat.shape\[1\] \(C\)"),
    (lambda a: a.__setitem__(3, a[3][:, :3]), r"fc_weight.shape\[1\] must equal feat.shape\[1\] \(C\)"),
    (lambda a: a.__setitem__(3, a[3][0]), r"fc_weight must be a 2-D tensor"),
    (lambda a: a.__setitem__(4, a[4][:2]), r"fc_bias.shape\[0\] must equal fc_weight.shape\[0\] \(D\)"),
    (lambda a: a.__setitem__(0, a[0][:, :, :0]), r"feat must have at least one pixel"),
]


# meta: all-meta arguments run the fake kernel (as torch.compile does), which must make the same checks.
META = pytest.mark.parametrize("meta", [False, True], ids=["kernel", "fake"])


@META
@pytest.mark.parametrize("mutate,msg", BAD_ARGS)
def test_errors(mutate, msg, meta):
    args = make(2, 8, 4, 4, 6)
    mutate(args)
    if meta:
        args = [t.to("meta") for t in args]
    with pytest.raises(RuntimeError, match=msg):
        lrag_ext.embed_head(*args, 4, 1e-5)


@META
def test_bad_groups_and_eps(meta):
    args = make(2, 8, 4, 4, 6, device="meta" if meta else "cpu")
    with pytest.raises(RuntimeError, match=r"groups must be >= 1 and divide C \(8\), got 3"):
        lrag_ext.embed_head(*args, 3, 1e-5)
    with pytest.raises(RuntimeError, match=r"eps must be >= 0"):
        lrag_ext.embed_head(*args, 4, -1.0)
