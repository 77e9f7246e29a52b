"""LongLive's LoRA adapter (lrag.lora) against the golden run of LongLive v1.0's own code with a tiny adapter
(tests/fixtures/README.md §10), against the formula written out independently, and on malformed adapters."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import fixture_path
from lrag.checkpoint import load_generator
from lrag.config import tiny_from_run_json
from lrag.lora import (LoraAdapter, apply_lora, attach_lora, check_lora, merge_lora, parse_lora, read_lora,
                       select_lora_state_dict)
from lrag.models.wan import CausalWanModel
from lrag.pipeline import Pipeline
from lrag_ext.state_dicts import InputFileError

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = "longlive_lora_tiny_run.json"
CKPT, LORA, IO = "longlive_lora_tiny_ckpt.pt", "longlive_lora_tiny_lora.pt", "longlive_lora_tiny_io.safetensors"
MERGED_TOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    run = json.load(open(fixture_path(RUN)))
    return run, load_file(fixture_path(IO))


def _base_model(run) -> CausalWanModel:
    model = CausalWanModel(tiny_from_run_json(run))
    assert run["use_ema"] is False                     # longlive_inference.yaml: use_ema false -> "generator"
    return load_generator(model, fixture_path(CKPT), use_ema=False)


def _generate(model, io, trace=False):
    return Pipeline(model).generate(io["text_embeds"], io["init_noise"].shape[1], mode="native",
                                    noise=io["init_noise"], renoise=io["renoise"], trace=trace)


def _alpha(run):
    return run["lora"]["alpha"]


# ------------------------------------------------------------------------------------------------- golden run
def test_the_file_is_what_longlive_wrote(golden):
    run, _ = golden
    adapter = read_lora(fixture_path(LORA))
    assert adapter.rank == run["lora"]["rank"]
    assert len(adapter.layers) * 2 == run["lora"]["num_tensors"]
    # every module peft wrapped, named as in our backbone (peft's "base_model.model." removed)
    assert sorted(adapter.layers) == sorted(m.removeprefix("base_model.model.") for m in run["lora"]["wrapped_modules"])
    assert adapter.scaling(_alpha(run)) == run["lora"]["scaling"]


def test_unmerged_adapter_reproduces_longlive_bit_for_bit(golden):
    run, io = golden
    model = _base_model(run)
    attach_lora(model, read_lora(fixture_path(LORA)), alpha=_alpha(run))
    res = _generate(model, io, trace=True)
    assert torch.equal(res.x_in[:, :, 0], io["x_in_per_forward"])        # every forward's input
    assert torch.equal(res.x0[:, :, 0], io["x0_per_forward"])            # and output, context reruns included
    assert torch.equal(res.latents, io["output_latents"])


def test_merged_adapter_reproduces_longlive_within_rounding(golden):
    # (W + s B A) x sums in another order than peft's W x + s B (A x): equal up to float32 rounding.
    run, io = golden
    model = _base_model(run)
    merge_lora(model, read_lora(fixture_path(LORA)), alpha=_alpha(run))
    res = _generate(model, io, trace=True)
    err = (res.x0[:, :, 0] - io["x0_per_forward"]).abs().max().item()
    assert err <= MERGED_TOL, f"merged adapter: max abs x0 error {err:.3g}"
    assert (res.latents - io["output_latents"]).abs().max().item() <= MERGED_TOL


def test_base_model_without_the_adapter_is_longlives_base_run(golden):
    # The same run without the adapter (LongLive v1's pipeline, sink 3) is reproduced too, and differs from the
    # adapted one by far more than rounding: the adapter is what the golden run measures.
    run, io = golden
    res = _generate(_base_model(run), io)
    assert torch.equal(res.latents, io["output_latents_no_lora"])
    assert (io["output_latents"] - io["output_latents_no_lora"]).abs().max() > 0.1


def test_wrong_alpha_or_entry_does_not_reproduce(golden):
    run, io = golden
    model = _base_model(run)
    attach_lora(model, read_lora(fixture_path(LORA)))                    # alpha = rank: scale 1, not 2
    assert (_generate(model, io).latents - io["output_latents"]).abs().max() > 1e-2
    critic = torch.load(fixture_path(LORA), weights_only=True)["critic_lora"]
    model = _base_model(run)
    attach_lora(model, parse_lora(critic), alpha=_alpha(run))            # the decoy entry
    assert (_generate(model, io).latents - io["output_latents"]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------- the arithmetic
def _small_model(seed=0):
    cfg = tiny_from_run_json(json.load(open(fixture_path(RUN))))
    torch.manual_seed(seed)
    return CausalWanModel(cfg).eval()


def _random_adapter(model, rank=3, layers=("blocks.0.self_attn.q", "blocks.1.ffn.2"), seed=1) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    return LoraAdapter({n: (torch.randn(rank, mods[n].in_features, generator=g),
                            torch.randn(mods[n].out_features, rank, generator=g)) for n in layers}, rank)


@pytest.mark.parametrize("alpha, scale", [(None, 1.0), (6.0, 1.0), (3.0, 0.5), (None, 0.0)])
def test_merge_adds_scaled_low_rank_product(alpha, scale):
    model = _small_model()
    adapter = _random_adapter(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model, adapter, alpha=alpha, scale=scale)
    s = scale * (alpha if alpha is not None else 3) / 3
    after = model.state_dict()
    for name in before:
        layer = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and layer in adapter.layers:
            a, b = adapter.layers[layer]
            want = before[name].double() + s * (b.double() @ a.double())
            torch.testing.assert_close(after[name].double(), want, rtol=0, atol=1e-5)
        else:
            assert torch.equal(after[name], before[name]), name


def test_attached_adapter_adds_the_low_rank_path_and_can_change_scale_and_be_removed():
    model = _small_model()
    adapter = _random_adapter(model, layers=("blocks.0.cross_attn.v",))
    layer = model.blocks[0].cross_attn.v
    x = torch.randn(5, layer.in_features)
    base = layer(x)
    handle = attach_lora(model, adapter, alpha=6.0)                     # s = 6 / 3 = 2
    a, b = adapter.layers["blocks.0.cross_attn.v"]
    torch.testing.assert_close(layer(x), base + 2.0 * (x @ a.T @ b.T), rtol=1e-5, atol=1e-5)
    handle.scale = 0.25
    torch.testing.assert_close(layer(x), base + 0.5 * (x @ a.T @ b.T), rtol=1e-5, atol=1e-5)
    handle.remove()
    assert torch.equal(layer(x), base)


def test_bf16_merge_rounds_once():
    # LongLive runs in bf16: the merge is computed in float32, then rounded to bf16 once.
    model = _small_model().to(torch.bfloat16)
    adapter = _random_adapter(model)
    w0 = model.blocks[0].self_attn.q.weight.clone()
    merge_lora(model, adapter, alpha=1.5)
    a, b = adapter.layers["blocks.0.self_attn.q"]
    assert torch.equal(model.blocks[0].self_attn.q.weight, (w0.float() + 0.5 * (b @ a)).to(torch.bfloat16))


def test_float64_merge_keeps_float64_precision():
    model = _small_model().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model, _random_adapter(model), scale=0.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())     # scale 0: exactly the base


def test_attached_hooks_compute_in_the_model_dtype():
    model = _small_model().to(torch.bfloat16)
    adapter = _random_adapter(model, layers=("blocks.0.self_attn.q",))
    layer = model.blocks[0].self_attn.q
    x = torch.randn(4, 64).to(torch.bfloat16)
    base = layer(x)
    attach_lora(model, adapter)
    a, b = (t.to(torch.bfloat16) for t in adapter.layers["blocks.0.self_attn.q"])
    assert torch.equal(layer(x), base + torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * 1.0)


def test_attach_that_fails_midway_leaves_no_hook(monkeypatch):
    model = _small_model()
    adapter = _random_adapter(model, layers=("blocks.0.self_attn.q", "blocks.0.self_attn.k", "blocks.1.ffn.0"))
    calls = []
    real_to = torch.Tensor.to

    def failing_to(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:                       # the second layer's B: as an out-of-memory copy would
            raise RuntimeError("simulated out of memory")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", failing_to)
    with pytest.raises(RuntimeError, match="simulated"):
        attach_lora(model, adapter)
    monkeypatch.undo()
    assert all(not m._forward_hooks for m in model.modules())


def test_scale_of_an_attached_adapter_is_checked():
    model = _small_model()
    handle = attach_lora(model, _random_adapter(model))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        handle.scale = float("nan")
    assert handle.scale == 1.0


# ------------------------------------------------------------------------------------------- formats
def test_plain_and_safetensors_adapters_read_the_same(tmp_path):
    ck = torch.load(fixture_path(LORA), weights_only=True)
    ref = read_lora(fixture_path(LORA))
    torch.save(ck["generator_lora"], tmp_path / "plain.pt")                # inference.py accepts both forms
    save_file(ck["generator_lora"], str(tmp_path / "lora.safetensors"))
    fsdp = {k.replace("blocks.", "_fsdp_wrapped_module.blocks."): v for k, v in ck["generator_lora"].items()}
    ddp = {f"module.{k}": v for k, v in ck["generator_lora"].items()}
    named = {k.replace(".weight", ".default.weight"): v for k, v in ck["generator_lora"].items()}   # raw peft names
    for source in (tmp_path / "plain.pt", str(tmp_path / "lora.safetensors"), fsdp, ddp, named):
        got = read_lora(source)
        assert got.rank == ref.rank and sorted(got.layers) == sorted(ref.layers)
        assert all(torch.equal(got.layers[n][i], ref.layers[n][i]) for n in ref.layers for i in (0, 1))


# ------------------------------------------------------------------------------------------- hostile input
def _sd():
    return dict(torch.load(fixture_path(LORA), weights_only=True)["generator_lora"])


KEY_A = "base_model.model.blocks.0.self_attn.q.lora_A.weight"
KEY_B = "base_model.model.blocks.0.self_attn.q.lora_B.weight"


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.update({"base_model.model.blocks.0.self_attn.q.lora_magnitude_vector": torch.ones(64)}),
     "not a LoRA adapter of lora_A / lora_B weights: 1 other keys"),
    (lambda sd: sd.pop(KEY_B), "layer 'blocks.0.self_attn.q' has lora_A but not lora_B"),
    (lambda sd: sd.update({KEY_B: torch.zeros(64, 5)}), "do not share a rank"),
    (lambda sd: sd.update({KEY_A: torch.zeros(2, 64), KEY_B: torch.zeros(64, 2)}), "different ranks"),
    (lambda sd: sd.update({KEY_A: torch.zeros(4, 64, dtype=torch.int64)}), "2-d floating-point tensor"),
    (lambda sd: sd.update({KEY_A: torch.zeros(4, 64, 1)}), "2-d floating-point tensor"),
    (lambda sd: sd.update({KEY_A: "weights"}), "2-d floating-point tensor, got str"),
    (lambda sd: sd.clear(), "holds no lora_A / lora_B weights"),
    (lambda sd: sd.update({KEY_A.replace("lora_A", "lora_A.default"): torch.zeros(4, 64)}),
     "layer 'blocks.0.self_attn.q' has two lora_A matrices"),
    (lambda sd: sd.update({"base_model.model.blocks.0.extra.lora_A.other.weight": torch.zeros(4, 64)}),
     "several peft adapters"),
    (lambda sd: sd.update({"base_model.model.blocks.0.self_attn.q.base_layer.weight": torch.zeros(64, 64)}),
     "a raw peft model state dict"),
    (lambda sd: sd.update({"generator": {}}), "this is a generator checkpoint"),
    (lambda sd: sd.update({"model.patch_embedding.weight": torch.zeros(1)}), "a model's weights"),
])
def test_malformed_adapters_are_refused_with_the_reason(edit, message):
    sd = _sd()
    edit(sd)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_lora(sd)


def test_non_dict_and_non_string_keys():
    with pytest.raises(TypeError, match="must hold a dict, got list"):
        select_lora_state_dict([1])
    with pytest.raises(TypeError, match="'generator_lora'.*must be a state dict"):
        select_lora_state_dict({"generator_lora": 3})
    with pytest.raises(TypeError, match="keys must be strings"):
        parse_lora({1: torch.zeros(1, 1)})


@pytest.mark.parametrize("layers, message", [
    ({"blocks.7.self_attn.q": (torch.zeros(4, 64), torch.zeros(64, 4))}, "blocks.7.self_attn.q: no such layer"),
    ({"blocks.1.ffn.2": (torch.zeros(4, 128), torch.zeros(64, 3))}, "are not \\[4, in\\] and \\[out, 4\\]"),
    ({"head.head": (torch.zeros(4, 64), torch.zeros(64, 4))}, "head.head: outside the attention blocks"),
    ({"blocks.0.norm3": (torch.zeros(4, 64), torch.zeros(64, 4))}, "a LayerNorm, not a Linear layer"),
    ({"blocks.0.ffn.0": (torch.zeros(4, 64), torch.zeros(64, 4))}, "adapter maps 64 -> 64 features, the layer 64 -> 128"),
])
def test_adapter_that_does_not_fit_leaves_the_model_unchanged(layers, message):
    model = _small_model()
    ok = _random_adapter(model, rank=4, layers=("blocks.0.self_attn.k",))
    adapter = LoraAdapter({**ok.layers, **layers}, 4)                   # the fitting layer is listed first
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for apply in (merge_lora, attach_lora):
        with pytest.raises(ValueError, match=message):
            apply(model, adapter)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match=message):
        check_lora(model, adapter)
    x = torch.randn(2, 64)
    assert torch.equal(model.blocks[0].self_attn.k(x), torch.nn.functional.linear(x, before["blocks.0.self_attn.k.weight"],
                                                                                 before["blocks.0.self_attn.k.bias"]))


@pytest.mark.parametrize("alpha, scale, message", [
    (0.0, 1.0, "alpha must be > 0"), (-4.0, 1.0, "alpha must be > 0"), (float("nan"), 1.0, "alpha must be a finite"),
    (None, float("inf"), "scale must be a finite"), (True, 1.0, "alpha must be a finite"),
])
def test_bad_alpha_or_scale(alpha, scale, message):
    model = _small_model()
    with pytest.raises(ValueError, match=message):
        apply_lora(model, fixture_path(LORA), alpha=alpha, scale=scale)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_lora(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"generator_lora": {"x.weight": torch.zeros(2, 2)}}, bad)
    with pytest.raises(InputFileError, match="bad.pt"):
        read_lora(bad)
    with pytest.raises(InputFileError, match="bad.pt"):
        apply_lora(_small_model(), bad)
    # a generator checkpoint given as the adapter
    with pytest.raises(InputFileError, match="this is a generator checkpoint"):
        read_lora(fixture_path(CKPT))
    # an adapter file for layers the model does not have: the file is named, the model unchanged
    wrong = tmp_path / "wrong.pt"
    torch.save({"base_model.model.blocks.5.ffn.0.lora_A.weight": torch.zeros(2, 64),
                "base_model.model.blocks.5.ffn.0.lora_B.weight": torch.zeros(128, 2)}, wrong)
    model = _small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputFileError, match="(?s)wrong.pt.*blocks.5.ffn.0: no such layer"):
        apply_lora(model, wrong)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
