"""The few-step flow-matching sampler (SPEC §7) against closed forms and the recorded reference forwards."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_path
from lrag.scheduler import FlowMatchScheduler


@pytest.fixture(scope="module")
def sched():
    return FlowMatchScheduler(5.0)


def test_table_closed_form(sched):
    i = torch.arange(1000, dtype=torch.float64)
    s = 1 - i / 1000
    sigma = 5 * s / (1 + 4 * s)
    torch.testing.assert_close(sched.sigmas.double(), sigma, atol=1e-6, rtol=0)
    torch.testing.assert_close(sched.timesteps.double(), 1000 * sigma, atol=1e-3, rtol=0)
    assert sched.sigmas.dtype == torch.float32 and sched.timesteps.shape == (1000,)


def test_warped_steps(sched):
    warped = sched.warp([1000, 750, 500, 250, 0])
    assert warped.dtype == torch.float32
    assert warped.tolist() == [1000.0, 937.5, 833.3333129882812, 625.0, 0.0]   # the fixture's values, bit-exact


def test_sigma_is_nearest_table_entry(sched):
    # the four denoising timesteps: sigma = t / 1000 exactly
    t = sched.warp([1000, 750, 500, 250])
    torch.testing.assert_close(sched.sigma(t), t / 1000, atol=0, rtol=0)
    # t = 0 (the context rerun) is NOT sigma 0: the nearest entry is t ~ 4.98, sigma = 5e-3 / 1.004
    assert sched.sigma(torch.tensor([0.0])).item() == pytest.approx(0.005 / 1.004, rel=1e-5)
    # an off-table t picks the nearest entry, in float64 too
    t = torch.tensor([938.0, 700.0])
    idx = (sched.timesteps[None] - t[:, None]).abs().argmin(dim=1)
    assert sched.sigma(t).tolist() == sched.sigmas[idx].tolist()
    assert sched.sigma(t, torch.float64).dtype == torch.float64


def test_to_x0_float64(sched):
    g = torch.Generator().manual_seed(0)
    flow, xt = torch.randn(1, 3, 4, 2, 2, generator=g), torch.randn(1, 3, 4, 2, 2, generator=g)
    t = torch.tensor([[937.5, 833.3333129882812, 0.0]])
    x0 = sched.to_x0(flow, xt, t)
    sig = sched.sigmas.double()[(sched.timesteps.double()[None] - t.double().reshape(-1, 1)).abs().argmin(1)]
    expect = (xt.double() - sig.reshape(1, 3, 1, 1, 1) * flow.double()).float()
    assert x0.dtype == torch.float32 and torch.equal(x0, expect)


def test_add_noise_reproduces_reference_inputs(sched):
    # fixture README §4: x_in[b, j+1] == (1 - sigma) x0[b, j] + sigma renoise[b, j], bit-exactly in float32
    io = load_file(fixture_path("sf_tiny_io.safetensors"))
    steps = sched.warp([1000, 750, 500, 250])
    for b in (0, 5, 9):
        for j in range(3):
            t = torch.full((1, 3), float(steps[j + 1]))
            x = sched.add_noise(io["x0_per_forward"][b, j][None], io["renoise"][b, j][None], t)
            assert torch.equal(x[0], io["x_in_per_forward"][b, j + 1])


def test_errors(sched):
    with pytest.raises(ValueError, match="shift"):
        FlowMatchScheduler(0.0)
    with pytest.raises(ValueError, match="denoising steps"):
        sched.warp([1001])
    with pytest.raises(ValueError, match="denoising steps"):
        sched.warp([])
    with pytest.raises(ValueError, match="noise must have"):
        sched.add_noise(torch.zeros(1, 3, 4, 2, 2), torch.zeros(1, 3, 4, 2, 3), torch.zeros(1, 3))
