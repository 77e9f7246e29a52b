"""LatentAE parity with the official release (fixtures/official) and the checkpoint loader."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import fixture_path

from lrag_ext.embedder import AEConfig, LatentAE, load_embedder, load_latent_ae, mean_descriptor, num_groups

safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def tiny():
    return load_latent_ae(fixture_path("ae_tiny_ckpt.pt"))


@pytest.fixture(scope="module")
def io():
    return safetensors_torch.load_file(fixture_path("ae_tiny_io.safetensors"))


def test_group_rule():
    assert [num_groups(c) for c in (8, 16, 24, 32, 64, 12, 6, 7)] == [8, 16, 8, 32, 32, 4, 1, 1]


def test_full_default_keys_shapes_counts():
    spec = json.load(open(fixture_path("ae_full_keys.json")))
    model = LatentAE()
    sd = model.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(k, list(s)) for k, s in spec["keys"]]
    counts = {"encoder": sum(p.numel() for p in model.encoder.parameters()),
              "decoder": sum(p.numel() for p in model.decoder.parameters())}
    counts["total"] = counts["encoder"] + counts["decoder"]
    assert counts == spec["num_params"]
    assert list(model.encoder.feat_shape) == spec["encoder_feat_shape"]


def test_checkpoint_format(tiny):
    ck = torch.load(fixture_path("ae_tiny_ckpt.pt"), weights_only=True)
    spec = json.load(open(fixture_path("ae_full_keys.json")))
    assert sorted(ck) == sorted(spec["checkpoint_top_level_keys"])
    assert tiny.config.hidden_dims == [8, 16, 32] and tiny.config.latent_dim == 64
    assert not tiny.training


def test_tiny_outputs_match_official(tiny, io):
    x = io["x_seq"][0, :6]
    with torch.no_grad():
        recon, z = tiny(x)
        feat = tiny.encoder.trunk(x)
        gap = tiny.encoder.final_norm(feat).mean(dim=(2, 3))
        norm = tiny.encode(x)
        seq = tiny.encoder(io["x_seq"].flatten(0, 1)).view(2, 8, -1)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feat, io["enc_conv_stack_out"], **tol)
    torch.testing.assert_close(gap, io["enc_gap_out"], **tol)
    torch.testing.assert_close(z, io["embed_raw"], **tol)
    torch.testing.assert_close(norm, io["embed_norm"], **tol)
    torch.testing.assert_close(recon, io["recon"], **tol)
    torch.testing.assert_close(seq, io["embed_seq_raw"], **tol)


def test_fused_embed_matches_official(tiny, io):
    x = io["x_seq"][0, :6]
    out = tiny.embed(x)
    assert out.dtype == torch.float32 and out.shape == (6, 64)
    torch.testing.assert_close(out, io["embed_norm"], rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(tiny.embed(x.to(memory_format=torch.channels_last)), io["embed_norm"],
                               rtol=1e-5, atol=2e-6)


def test_embed_writes_history_rows(tiny, io):
    x = io["x_seq"][0, :3]
    hist = torch.zeros(7, 64, dtype=torch.bfloat16)
    rows = torch.tensor([5, 0, 2])
    res = tiny.embed(x, out=hist, rows=rows)
    torch.testing.assert_close(hist[rows].float(), res.to(torch.bfloat16).float())
    assert hist[[1, 3, 4, 6]].abs().sum() == 0


def test_rag_tiny_descriptors(io):
    """The 2-stage 8x8 AE the latentmem run used: per-frame encode reproduces its descriptors bit for bit."""
    model = load_embedder(fixture_path("rag_tiny_ae_ckpt.pt"))
    run = safetensors_torch.load_file(fixture_path("rag_tiny_io.safetensors"))
    frames = run["output_latents"][0]
    with torch.no_grad():
        per_frame = torch.cat([model.encode(frames[i:i + 1]) for i in range(frames.shape[0])])
    assert torch.equal(per_frame, run["descriptors"])
    torch.testing.assert_close(model.embed(frames), run["descriptors"], rtol=1e-4, atol=2e-5)


def test_plain_state_dict_and_config_override(tiny):
    sd = tiny.state_dict()
    model = load_latent_ae(sd, config=tiny.config.to_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), sd.values()))
    with pytest.raises(ValueError, match="plain state dict carries no architecture"):
        load_latent_ae(sd)


def test_loader_lists_bad_keys(tiny):
    sd = dict(tiny.state_dict())
    sd["encoder.extra.weight"] = torch.zeros(1)
    del sd["encoder.fc.bias"]
    with pytest.raises(KeyError, match=r"missing keys \['encoder.fc.bias'\], unknown keys \['encoder.extra.weight'\]"):
        load_latent_ae(sd, config=tiny.config)
    sd = dict(tiny.state_dict())
    sd["encoder.fc.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"encoder.fc.bias: expected \(64,\), got \(3,\)"):
        load_latent_ae(sd, config=tiny.config)


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_latent_ae(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="neither the released format"):
        load_latent_ae({"foo": 1})
    with pytest.raises(ValueError, match="hidden_dims must be"):
        AEConfig.from_dict({"hidden_dims": []})


def test_weights_only(tmp_path):
    """A pickle with arbitrary objects is refused (weights_only=True)."""
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {"x": object.__new__(AEConfig)}}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_latent_ae(path)


def test_mean_descriptor():
    x = torch.randn(3, 16, 5, 7)
    torch.testing.assert_close(mean_descriptor(x), x.mean(dim=(2, 3)))
    assert mean_descriptor(x).shape == (3, 16)


def test_embed_compiles_fullgraph():
    """The inference paths trace whole under torch.compile (trunk convs + the custom op)."""
    from lrag_ext.embedder import PooledEmbedder
    x = torch.randn(3, 16, 16, 16)
    ae = LatentAE(hidden_dims=[8, 16], latent_dim=16, spatial_h=16, spatial_w=16).eval()
    pooled = PooledEmbedder(grid=2, latent_dim=8).eval()
    with torch.no_grad():
        for model in (ae, pooled):
            out = torch.compile(model.embed, fullgraph=True)(x)
            torch.testing.assert_close(out, model.encode(x), rtol=1e-5, atol=1e-6)


def test_embed_out_rows_errors(tiny, io):
    x = io["x_seq"][0, :2]
    with pytest.raises(ValueError, match="rows given without out"):
        tiny.embed(x, rows=torch.tensor([0, 1]))
    hist = torch.zeros(4, 64)
    with pytest.raises(ValueError, match="rows must be a 1-D index tensor of length 2"):
        tiny.embed(x, out=hist, rows=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"out must be \[M, 64\]"):
        tiny.embed(x, out=torch.zeros(4, 8), rows=torch.tensor([0, 1]))
    assert hist.abs().sum() == 0
