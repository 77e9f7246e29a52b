"""Embedder losses against the official compute_losses values (fixtures/official/ae_tiny_losses.json)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import fixture_path

from lrag_ext.embedder import embedder_losses, load_latent_ae, smoothness_loss, window_temporal_delta_loss
from lrag_ext.embedder.losses import delta_hinge_per_offset

safetensors_torch = pytest.importorskip("safetensors.torch")
CASES = json.load(open(fixture_path("ae_tiny_losses.json")))["cases"]


@pytest.fixture(scope="module")
def setup():
    model = load_latent_ae(fixture_path("ae_tiny_ckpt.pt"))
    io = safetensors_torch.load_file(fixture_path("ae_tiny_io.safetensors"))
    return model, io


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_official_loss_cases(setup, case):
    model, io = setup
    chunk = io["x_seq"][:, :case["S"]]
    with torch.no_grad():
        t = embedder_losses(model, chunk, case["delta_margin"], case["delta_window"], case["delta_weight"],
                            case["smooth_weight"])
        z = model.encoder(chunk.flatten(0, 1)).view(chunk.shape[0], chunk.shape[1], -1)
    got = {"total": t.total, "L_rec": t.rec, "L_delta": t.delta, "L_smooth": t.smooth}
    for key, value in got.items():
        assert float(value) == pytest.approx(case[key], rel=1e-5, abs=1e-7), key
    hinge = delta_hinge_per_offset(z, case["delta_margin"], case["delta_window"]) * case["delta_weight"]
    assert hinge.tolist() == pytest.approx(case["diag_delta_per_offset"], rel=1e-5, abs=1e-7)


def test_terms_by_hand():
    """Brute-force loops over b, t, k for a random z."""
    z = torch.randn(2, 6, 5, dtype=torch.float64)
    m, w = 0.1, 4
    per_k = []
    for k in range(1, min(5, w) + 1):
        vals = [max(0.0, float(torch.dot(z[b, t + k], z[b, t]) / (z[b, t + k].norm() * z[b, t].norm())) - m)
                for b in range(2) for t in range(6 - k)]
        per_k.append(sum(vals) / len(vals))
    assert float(window_temporal_delta_loss(z, m, w, 0.5)) == pytest.approx(0.5 * sum(per_k) / len(per_k))
    sm = [float(torch.sqrt(((z[b, t + 2] - 2 * z[b, t + 1] + z[b, t]) ** 2).sum() + 1e-8))
          for b in range(2) for t in range(4)]
    assert float(smoothness_loss(z)) == pytest.approx(sum(sm) / len(sm))


def test_short_chunks_and_errors():
    z = torch.randn(3, 1, 4)
    assert float(window_temporal_delta_loss(z)) == 0.0 and float(smoothness_loss(z)) == 0.0
    assert float(smoothness_loss(torch.randn(3, 2, 4))) == 0.0
    with pytest.raises(ValueError, match=r"z must be \[B, S, D\]"):
        smoothness_loss(torch.randn(3, 4))
    with pytest.raises(ValueError, match="window must be >= 1"):
        window_temporal_delta_loss(torch.randn(1, 3, 4), window=0)


def test_gradients_flow(setup):
    model, io = setup
    chunk = io["x_seq"][:1, :4, :, :16, :16]
    from lrag_ext.embedder import LatentAE
    m = LatentAE(hidden_dims=[8, 16], latent_dim=8, spatial_h=16, spatial_w=16)
    t = embedder_losses(m, chunk)
    t.total.backward()
    assert all(p.grad is not None for p in m.parameters())
