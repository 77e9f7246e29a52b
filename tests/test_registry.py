"""The checkpoint registry (lrag.registry): its facts against the configs recorded from the upstream code in the
golden runs, its validation, and matching files against it."""
from __future__ import annotations

import copy
import json
import re

import pytest

from conftest import fixture_path
from lrag import registry
from lrag.config import wan_1_3b

TINY_GEOMETRY = {"num_layers": 2, "dim": 64, "ffn_dim": 128, "text_dim": 32, "freq_dim": 256, "in_dim": 16,
                 "out_dim": 16, "patch_size": [1, 2, 2], "qk_norm": True, "cross_attn_norm": True, "num_heads": 2}


def tiny_registry_doc() -> dict:
    """The shipped registry with the tiny test geometry, so that the tiny golden checkpoints match it exactly."""
    doc = copy.deepcopy(registry._document())
    doc["geometries"] = {"wan2.1-t2v-1.3b": TINY_GEOMETRY}
    return doc


def _run(name):
    return json.load(open(fixture_path(f"{name}_run.json")))


# ------------------------------------------------------------------------------------- facts vs upstream runs
def test_framewise_2step_entry_is_what_causal_forcing_ran():
    e, run = registry.entry("causal-forcing-pp-framewise-2step"), _run("cf_framewise_tiny")
    cfg = run["resolved_config"]
    assert list(e.steps) == cfg["denoising_step_list"]
    assert list(e.first_block_steps) == cfg["denoising_step_list_first_chunk"]
    assert e.frames_per_block == cfg["num_frame_per_block"] == 1
    assert e.release_attention == {"local_attn_size": run["local_attn_size"], "sink_size": run["sink_size"]}
    assert e.use_ema is run["use_ema"] is True
    assert run["config_overrides"] == {}                      # the config as released


def test_longlive_entry_is_what_longlive_ran():
    e, run = registry.entry("longlive-base"), _run("longlive_lora_tiny")
    cfg = run["resolved_config"]
    assert list(e.steps) == cfg["denoising_step_list"] and e.frames_per_block == cfg["num_frame_per_block"]
    assert e.release_attention == {"local_attn_size": cfg["model_kwargs"]["local_attn_size"],
                                   "sink_size": cfg["model_kwargs"]["sink_size"]}
    assert (e.window, e.sink) == (12, 3)                      # LongLive's own rolling window and sink
    assert e.use_ema is cfg["use_ema"] is False               # the 'generator' entry
    assert e.lora is not None and "lora_ckpt" in cfg          # released with its adapter
    assert not {"model_kwargs.local_attn_size", "model_kwargs.sink_size", "use_ema"} & set(run["config_overrides"])


def test_self_forcing_entry_is_what_self_forcing_ran():
    e, run = registry.entry("self-forcing-dmd"), _run("sf_tiny")
    cfg = run["resolved_config"]
    assert list(e.steps) == cfg["denoising_step_list"] and e.frames_per_block == cfg["num_frame_per_block"]
    assert e.use_ema is run["use_ema"] is True


def test_every_entry_has_the_1_3b_geometry_and_a_backbone_default():
    known = registry.entries()
    assert len(known) == 6
    for e in known.values():
        for key in registry.GEOMETRY_FIELDS:
            want = getattr(wan_1_3b(), key)
            assert (tuple(e.geometry[key]) if key == "patch_size" else e.geometry[key]) == want
    for backbone in ("self-forcing", "causal-forcing", "longlive"):
        assert registry.backbone_default(backbone).backbone == backbone
        assert registry.backbone_default(backbone).frames_per_block == 3       # the chunk-wise release


# ------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format="x"), "not a checkpoint registry"),
    (lambda d: d["checkpoints"][0].update(frames_per_block=0), "'self-forcing-dmd': 'frames_per_block' must be"),
    (lambda d: d["checkpoints"][1].update(steps=[1000, 2000]), "'steps' must be a non-empty list of ints"),
    (lambda d: d["checkpoints"][2].update(ema_key="ema"), "'ema_key' must be one of"),
    (lambda d: d["checkpoints"][3].update(sink=12), "'sink' must be an int in [0, window)"),
    (lambda d: d["checkpoints"][4].update(geometry="wan-14b"), "'geometry' must be one of"),
    (lambda d: d["checkpoints"][5].update(lora={"file": "x"}), "'lora' must be null or {file, rank, alpha}"),
    (lambda d: d["checkpoints"][0].update(sha256="abc"), "'sha256' must be null or 64 hex digits"),
    (lambda d: d["checkpoints"].append(copy.deepcopy(d["checkpoints"][0])), "duplicate entry name"),
    (lambda d: d["backbone_defaults"].update(longlive="self-forcing-dmd"), "is not a longlive entry"),
])
def test_malformed_registry_is_refused(edit, message):
    doc = copy.deepcopy(registry._document())
    edit(doc)
    with pytest.raises(ValueError, match=re.escape(message)):
        registry.parse_registry(doc)


def test_unknown_entry_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="no registered checkpoint 'cf-3step'; known: self-forcing-dmd"):
        registry.entry("cf-3step")


# ------------------------------------------------------------------------------------- matching
FULL = dict(registry.entry("self-forcing-dmd").geometry)


@pytest.mark.parametrize("path, keys, expect", [
    ("/ckpt/chunkwise/causal_forcing.pt", ["generator", "generator_ema"], "causal-forcing-chunkwise"),
    ("/ckpt/framewise/causal_forcing.pt", ["generator", "generator_ema"], "causal-forcing-framewise"),
    ("framewise-2step.pt", ["generator", "generator_ema"], "causal-forcing-pp-framewise-2step"),
    ("/m/longlive_models/models/longlive_base.pt", ["generator"], "longlive-base"),
    ("/x/self_forcing_dmd.pt", ["generator_ema"], "self-forcing-dmd"),
    ("C:\\ckpts\\framewise\\causal_forcing.pt", ["generator", "generator_ema"], "causal-forcing-framewise"),
    ("D:/Downloads/Framewise/Causal_Forcing.PT", ["generator", "generator_ema"], "causal-forcing-framewise"),
    ("causal-forcing++/framewise-1step.pt", ["generator_ema"], "causal-forcing-pp-framewise-1step"),
])
def test_identify_by_path(path, keys, expect):
    match = registry.identify(path, FULL, keys)
    assert match.entry is not None and match.entry.name == expect, match.describe()


def test_identify_reports_ambiguity_differences_and_unknown_files():
    amb = registry.identify("/dl/causal_forcing.pt", FULL, ["generator", "generator_ema"])
    assert amb.entry is None and len(amb.candidates) == 2 and "ambiguous" in amb.describe()
    small = registry.identify("/dl/longlive_base.pt", {**FULL, "dim": 64}, ["generator"])
    assert small.entry is None and small.closest.name == "longlive-base"
    assert "dim 64 (the release: 1536)" in small.describe()
    no_entry = registry.identify("/dl/framewise-1step.pt", FULL, ["generator"])
    assert "no 'generator_ema' entry, which the release's inference reads" in no_entry.describe()
    plain = registry.identify("/dl/framewise-1step.pt", FULL, None)
    assert "a plain state dict" in plain.describe() and plain.only_entry_differs
    assert not small.only_entry_differs
    unknown = registry.identify("/dl/my_finetune.pt", FULL, ["generator_ema"])
    assert unknown.entry is None and unknown.closest is None and unknown.describe().startswith("unknown")


def test_identify_by_sha256_ignores_the_name(monkeypatch):
    doc = copy.deepcopy(registry._document())
    doc["checkpoints"][3]["sha256"] = "ab" * 32
    monkeypatch.setattr(registry, "_registry", lambda: registry.parse_registry(doc))
    match = registry.identify("/renamed.pt", FULL, ["generator_ema"], sha256="ab" * 32)
    assert match.entry.name == "causal-forcing-pp-framewise-2step" and match.how == "sha256"
