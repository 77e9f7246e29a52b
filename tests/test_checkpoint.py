"""Loading released generator checkpoints: outer formats, EMA choice, prefixes, and errors that list keys."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import fixture_path
from lrag.checkpoint import build_generator, load_generator, normalize_keys, select_state_dict
from lrag.config import tiny_from_run_json, wan_1_3b
from lrag.models.wan import CausalWanModel


@pytest.fixture(scope="module")
def cfg():
    return tiny_from_run_json(json.load(open(fixture_path("sf_tiny_run.json"))))


@pytest.fixture(scope="module")
def ckpt():
    return torch.load(fixture_path("sf_tiny_ckpt.pt"), map_location="cpu", weights_only=True)


def _same(model: CausalWanModel, sd: dict) -> bool:
    sd = normalize_keys(sd)
    return all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_ema_is_the_default(cfg, ckpt):
    model = load_generator(CausalWanModel(cfg), fixture_path("sf_tiny_ckpt.pt"))
    assert _same(model, ckpt["generator_ema"])
    assert not _same(model, ckpt["generator"])          # the decoy differs
    assert not model.training


def test_use_ema_false_picks_generator(cfg, ckpt):
    model = load_generator(CausalWanModel(cfg), ckpt, use_ema=False)
    assert _same(model, ckpt["generator"])


def test_fsdp_and_plain_formats(cfg, ckpt, tmp_path):
    ema = ckpt["generator_ema"]
    fsdp = {k.replace("model.", "model._fsdp_wrapped_module.", 1): v for k, v in ema.items()}
    plain = normalize_keys(ema)
    for obj in ({"generator_ema": fsdp}, plain, {"model": plain}, {"state_dict": ema}):
        assert _same(load_generator(CausalWanModel(cfg), obj), ema)
    path = tmp_path / "gen.safetensors"
    save_file({k: v.contiguous() for k, v in plain.items()}, str(path))
    assert _same(load_generator(CausalWanModel(cfg), str(path)), ema)
    path = tmp_path / "gen.pt"
    torch.save({"generator": ckpt["generator"], "generator_ema": fsdp}, path)
    assert _same(load_generator(CausalWanModel(cfg), str(path)), ema)


def test_dtype_cast(cfg, ckpt):
    model = load_generator(CausalWanModel(cfg), ckpt, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_mismatch_lists_keys_and_leaves_model_unchanged(cfg, ckpt):
    sd = dict(normalize_keys(ckpt["generator_ema"]))
    del sd["blocks.1.ffn.2.bias"]
    sd["blocks.2.extra.weight"] = torch.zeros(1)
    sd["head.head.weight"] = torch.zeros(3, 3)
    model = CausalWanModel(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="missing keys") as info:
        load_generator(model, sd)
    msg = str(info.value)
    assert "blocks.1.ffn.2.bias" in msg and "blocks.2.extra.weight" in msg and "head.head.weight" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_wrong_geometry_is_reported(cfg, ckpt):
    with pytest.raises(ValueError, match="missing keys"):
        load_generator(CausalWanModel(cfg.replace(num_layers=3)), ckpt)


def test_select_errors(ckpt, tmp_path):
    with pytest.raises(KeyError, match="generator_ema"):
        select_state_dict({"generator": ckpt["generator"]}, use_ema=True)
    with pytest.raises(KeyError, match="generator_ema"):
        select_state_dict(normalize_keys(ckpt["generator"]), use_ema=True)
    with pytest.raises(TypeError, match="dict"):
        select_state_dict([1, 2])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_generator(CausalWanModel(tiny_from_run_json(json.load(open(fixture_path("sf_tiny_run.json"))))),
                       str(tmp_path / "nope.pt"))


def test_build_generator_without_random_init(cfg, ckpt):
    model = build_generator(cfg, fixture_path("sf_tiny_ckpt.pt"))
    assert _same(model, ckpt["generator_ema"]) and model.device.type == "cpu"
    assert model.rope.temporal.device.type == "cpu" and not model.training
    half = build_generator(cfg, ckpt, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_full_size_layout_on_meta(ckpt):
    # Wan2.1-T2V-1.3B: 1,418,996,800 parameters, the same names as the released (tiny) checkpoints, 30 blocks
    with torch.device("meta"):
        model = CausalWanModel(wan_1_3b())
    assert sum(p.numel() for p in model.parameters()) == 1_418_996_800
    sd = model.state_dict()
    tiny = set(normalize_keys(ckpt["generator_ema"]))
    per_block = {k.split(".", 2)[2] for k in tiny if k.startswith("blocks.0.")}
    expect = {k for k in tiny if not k.startswith("blocks.")}
    expect |= {f"blocks.{i}.{n}" for i in range(30) for n in per_block}
    assert set(sd) == expect
    assert sd["patch_embedding.weight"].shape == (1536, 16, 1, 2, 2)
    assert sd["blocks.29.ffn.0.weight"].shape == (8960, 1536)
    assert sd["text_embedding.0.weight"].shape == (1536, 4096)
    assert sd["head.head.weight"].shape == (64, 1536)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ("", "the file is empty"),
    ('{"num_layers": 2}', "missing"),                                  # the other required fields
    ('{"num_layers": 2, "dim": 64, "num_heads": 3, "ffn_dim": 8}', "divisible by num_heads"),
])
def test_wan_config_file_errors_name_the_file(tmp_path, content, message):
    from lrag.config import WanConfig
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        WanConfig.from_wan_config(str(path))
    assert str(info.value).startswith(f"Wan config '{path}': ")


@pytest.mark.parametrize("content, message", [
    ("{}", "no 'resolved_config' entry"),
    ('{"resolved_config": []}', "'resolved_config' has the wrong type"),
    ('{"resolved_config": {"model_kwargs": 3}}', "model_kwargs must be an object"),
    ('{"resolved_config": {}, "tiny_model_config_json": "{oops"}', "Expecting property name"),
    ("nope", "not valid JSON"),
])
def test_run_json_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "run.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        tiny_from_run_json(str(path))
    assert str(info.value).startswith(f"run JSON '{path}': ")


def test_loader_errors_name_the_file(cfg, tmp_path):
    from lrag_ext.state_dicts import InputFileError
    path = tmp_path / "ema_only.pt"
    torch.save({"generator": {"w": torch.zeros(1)}}, path)
    with pytest.raises(InputFileError, match="has no 'generator_ema' entry") as info:
        load_generator(CausalWanModel(cfg), str(path), use_ema=True)
    assert info.value.path == str(path) and info.value.for_option("--checkpoint").startswith(f"--checkpoint '{path}'")
    torch.save({"generator_ema": [1, 2]}, path)
    with pytest.raises(InputFileError, match=r"checkpoint\['generator_ema'\] must be a state dict, got list"):
        build_generator(cfg, str(path))
    sd = normalize_keys(torch.load(fixture_path("sf_tiny_ckpt.pt"), weights_only=True)["generator_ema"])
    sd["head.head.bias"] = sd["head.head.bias"].to(torch.int64)
    torch.save(sd, path)
    with pytest.raises(InputFileError, match=r"not floating-point \(1\): \['head.head.bias'\]"):
        build_generator(cfg, str(path))
