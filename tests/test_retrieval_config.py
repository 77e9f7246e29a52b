"""One retrieval configuration: lrag_ext.MemoryConfig is what the generator takes (its model-derived fields filled in
from the backbone), its memory_position is the gather's default policy, and the old lrag.RetrievalConfig is a
deprecated factory of it."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

import lrag
from lrag.config import memory_config_for
from lrag.tiny import tiny_config, tiny_model
from lrag.pipeline import Pipeline, mean_descriptor
from lrag_ext import KVLayout, MemoryConfig, RetrievalMemory, memory_format, reference

# A backbone whose sink, window, RoPE theta and latent size all differ from MemoryConfig's defaults (sink 1,
# window 12): filled-in fields cannot pass by coinciding with a default.
CFG = tiny_config(8).replace(window=9, sink=2, rope_theta=500.0)
BLOCKS = 6           # retrieval from block 4 (frame 12: 3 evicted frames, 1 recency-excluded, 2 candidates)


@pytest.fixture(scope="module")
def model():
    return tiny_model(CFG)


@pytest.fixture(scope="module")
def text():
    return torch.randn(1, CFG.text_len, CFG.text_dim, generator=torch.Generator().manual_seed(1))


def embed5(x: torch.Tensor) -> torch.Tensor:
    """A 5-d embedder (not the 16-d spatial mean, not the default embed_dim 1024)."""
    return mean_descriptor(x)[:, :5]


def generate(pipe: Pipeline, text, frames: int = 3 * BLOCKS):
    return pipe.generate(text, frames, generator=torch.Generator().manual_seed(2))


# --- the pipeline fills in the model-derived fields ------------------------------------------------------------

def test_pipeline_memory_has_the_backbones_geometry_and_the_users_choices(model, text):
    user = MemoryConfig(top_k=2, recent_exclude=1, memory_position="ordered", storage="kv", device_frames=3,
                        host_frames=20, max_frames=100, page_size=8, pin_host=False)
    pipe = Pipeline(model, retrieval=user, embed=embed5)
    res = generate(pipe, text)
    assert [r["block"] for r in res.memory_log] == [4, 5]
    layout = KVLayout(num_layers=2, tokens_per_frame=16, num_heads=2, head_dim=32, rope_theta=500.0)
    want = MemoryConfig(top_k=2, recent_exclude=1, memory_position="ordered", storage="kv", device_frames=3,
                        host_frames=20, max_frames=100, page_size=8, pin_host=False,
                        sink_frames=2, window_frames=9, kv_layout=layout, latent_shape=(16, 8, 8),
                        device=torch.device("cpu"), dtype=torch.float32, embed_dim=5)
    assert pipe.memory.config == want
    # the pipeline's own config: the geometry filled in; device, dtype and the embedder's size are taken when a
    # generation builds its memory
    assert pipe.retrieval == dataclasses.replace(want, embed_dim=user.embed_dim, device=user.device,
                                                 dtype=user.dtype)
    assert pipe.memory.policy.sink_frames == 2 and pipe.memory.policy.window_frames == 9


def test_latent_storage_gets_the_latent_shape(model, text):
    pipe = Pipeline(model, retrieval=MemoryConfig(top_k=2, recent_exclude=1, storage="latent"))
    generate(pipe, text)
    cfg = pipe.memory.config
    assert (cfg.storage, cfg.latent_shape, cfg.embed_dim, cfg.dtype) == ("latent", (16, 8, 8), 16, torch.float32)


def test_default_valued_model_fields_are_filled_in(model, text):
    # sink_frames=1, window_frames=12, dtype=bfloat16, device="cpu", embed_dim=1024 are MemoryConfig's defaults:
    # indistinguishable from unset, so they are replaced by the backbone's values
    pipe = Pipeline(model, retrieval=MemoryConfig(sink_frames=1, window_frames=12, dtype=torch.bfloat16,
                                                  device="cpu"))
    assert (pipe.retrieval.sink_frames, pipe.retrieval.window_frames) == (2, 9)
    generate(pipe, text, 3)
    assert (pipe.memory.config.dtype, pipe.memory.config.embed_dim) == (torch.float32, 16)
    assert memory_config_for(CFG, pipe.retrieval, 5, "cpu", torch.float32).embed_dim == 5


def test_the_memory_follows_the_model_as_it_is_when_generating(text):
    """The model may be cast after the pipeline is built (its memory then stores the new dtype), and a float64
    model, which no memory can store, still generates natively; in rag mode it is refused before any block."""
    model = tiny_model(CFG)
    pipe = Pipeline(model, retrieval=MemoryConfig(top_k=2, recent_exclude=1))
    model.to(torch.bfloat16)
    res = generate(pipe, text.bfloat16())
    assert pipe.memory.config.dtype == torch.bfloat16 and [r["block"] for r in res.memory_log] == [4, 5]
    model.to(torch.float64)
    native = pipe.generate(text.double(), 6, generator=torch.Generator().manual_seed(2), mode="native")
    assert native.latents.dtype == torch.float64 and torch.isfinite(native.latents).all()
    blocks = []
    with pytest.raises(ValueError, match="dtype must be float32, float16, bfloat16"):
        pipe.generate(text.double(), 6, mode="rag", callback=blocks.append)
    assert blocks == []


@pytest.mark.parametrize("field, value", [
    ("sink_frames", 3), ("window_frames", 10), ("dtype", torch.float16), ("device", "cuda"),
    ("kv_layout", KVLayout(num_layers=2, tokens_per_frame=16, num_heads=2, head_dim=32)),   # rope_theta 1e4
    ("latent_shape", (16, 8, 4)),
])
def test_a_conflicting_model_field_is_refused_before_any_block(model, text, field, value):
    extra = dict(storage="latent") if field == "latent_shape" else {}
    match = f"MemoryConfig.{field}=.* conflicts with the backbone's"
    if field in ("dtype", "device"):   # taken from the model when generating: checked when generate starts
        pipe, blocks = Pipeline(model, retrieval=MemoryConfig(**{field: value}, **extra)), []
        with pytest.raises(ValueError, match=match):
            pipe.generate(text, 3, mode="rag", callback=blocks.append)
        assert blocks == []
    else:
        with pytest.raises(ValueError, match=match):
            Pipeline(model, retrieval=MemoryConfig(**{field: value}, **extra))


def test_agreeing_non_default_model_fields_are_accepted(model):
    layout = KVLayout(num_layers=2, tokens_per_frame=16, num_heads=2, head_dim=32, rope_theta=500.0)
    pipe = Pipeline(model, retrieval=MemoryConfig(sink_frames=2, window_frames=9, dtype=torch.float32,
                                                  kv_layout=layout, latent_shape=(16, 8, 8)))
    assert pipe.retrieval.kv_layout == layout


def test_a_conflicting_embed_dim_is_refused_at_the_first_block(model, text):
    with pytest.raises(ValueError, match="MemoryConfig.embed_dim=7 conflicts with the embedder's 5"):
        generate(Pipeline(model, retrieval=MemoryConfig(embed_dim=7), embed=embed5), text, 3)
    pipe = Pipeline(model, retrieval=MemoryConfig(embed_dim=5), embed=embed5)
    generate(pipe, text, 3)
    assert pipe.memory.config.embed_dim == 5


def test_embedding_storage_and_wrong_types_are_refused(model):
    with pytest.raises(ValueError, match="storage must be one of \\('kv', 'latent'\\) for the generator"):
        Pipeline(model, retrieval=MemoryConfig(storage="embedding"))
    with pytest.raises(TypeError, match="retrieval must be an lrag_ext.MemoryConfig"):
        Pipeline(model, retrieval=dict(top_k=2))


def test_memory_position_changes_the_video_as_the_old_config_did(model, text):
    base = Pipeline(model, retrieval=MemoryConfig(top_k=2, recent_exclude=1))
    new = Pipeline(model, retrieval=MemoryConfig(top_k=2, recent_exclude=1, memory_position="ordered"))
    with pytest.warns(DeprecationWarning):
        old_cfg = lrag.RetrievalConfig(k=2, recent_exclude=1, memory_position="ordered")
    old = Pipeline(model, retrieval=old_cfg)
    runs = [generate(p, text) for p in (base, new, old)]
    rec = runs[1].memory_log[0]                  # ordered: first_local 4 (sink 2 + K 2) - 2 frames + time rank
    assert rec["memory_positions"][0] == [2 + sorted(rec["selected_global_frames"][0]).index(f)
                                          for f in rec["selected_global_frames"][0]]
    assert runs[0].memory_log[0]["memory_positions"] == [[0, 0]]
    assert torch.equal(runs[1].latents, runs[2].latents)
    assert torch.equal(runs[0].latents[:, :12], runs[1].latents[:, :12])      # before the first retrieval
    assert not torch.equal(runs[0].latents, runs[1].latents)


# --- the deprecated factory ------------------------------------------------------------------------------------

def test_retrieval_config_is_a_deprecated_memory_config_factory():
    assert lrag.RetrievalConfig is lrag.config.RetrievalConfig
    with pytest.warns(DeprecationWarning, match="lrag.RetrievalConfig is deprecated"):
        cfg = lrag.RetrievalConfig(k=3, recent_exclude=2, memory_position="absolute", device_frames=5,
                                   host_frames=7, max_frames=99, storage="latent")
    assert cfg == MemoryConfig(top_k=3, recent_exclude=2, memory_position="absolute", device_frames=5,
                               host_frames=7, max_frames=99, storage="latent")
    with pytest.warns(DeprecationWarning):
        assert lrag.RetrievalConfig() == MemoryConfig()
    with pytest.warns(DeprecationWarning):
        assert lrag.RetrievalConfig(4, 1).top_k == 4          # positional, in the old field order
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="top_k must be >= 1"):
        lrag.RetrievalConfig(k=0)
    assert lrag.MemoryConfig is MemoryConfig


# --- the library: memory_position in the config, the gather's default policy -------------------------------------

LAYOUT = KVLayout(num_layers=2, tokens_per_frame=3, num_heads=2, head_dim=8)


def kv_memory(**kw) -> tuple[RetrievalMemory, torch.Tensor, torch.Tensor]:
    """A K/V memory with one stream of 8 frames (retrieving 2 of them); returns it and the stream's K and V."""
    base = dict(top_k=2, recent_exclude=0, sink_frames=1, window_frames=3, embed_dim=6, storage="kv",
                kv_layout=LAYOUT, dtype=torch.float32, max_frames=64, page_size=4, device_frames=4)
    mem = RetrievalMemory(MemoryConfig(**{**base, **kw}))
    g = torch.Generator().manual_seed(1)
    L, T, H, Dh = LAYOUT.frame_shape
    k, v = torch.randn(L, 8, T, H, Dh, generator=g), torch.randn(L, 8, T, H, Dh, generator=g)
    mem.append(mem.add_stream(), torch.randn(8, 6, generator=g), k=k, v=v)
    return mem, k, v


def gathered(mem, plan, **kw) -> torch.Tensor:
    L, T, H, Dh = LAYOUT.frame_shape
    dst_k = torch.zeros(L, 1, 4, T, H, Dh)
    mem.gather(plan, dst_k, torch.zeros_like(dst_k), **kw)
    return dst_k


@pytest.mark.parametrize("policy", [0, 3, "sink", "absolute", "ordered"])
def test_gather_without_positions_uses_the_configs_policy(policy):
    mem, k, _ = kv_memory(memory_position=policy)
    plan = mem.retrieve(0)
    ids = plan.ids[0].tolist()
    assert plan.counts == [2]
    want_pos = {0: [0, 0], "sink": [0, 0], 3: [3, 3], "absolute": ids,
                "ordered": [1 + sorted(ids).index(i) for i in ids]}[policy]   # ordered: just before slot 1 + 2
    got = gathered(mem, plan)
    for j, frame in enumerate(ids):   # the oracle: the reference RoPE rotation of the stored K
        want = reference.rope_rotate_temporal(k[:, frame], torch.tensor(want_pos[j]),
                                              reference.wan_temporal_pairs(LAYOUT.head_dim)).float()
        torch.testing.assert_close(got[:, 0, 1 + j], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got, gathered(mem, plan, positions=policy))
    # an explicit policy wins over the config's: "sink" copies K as stored
    plain = gathered(mem, plan, positions="sink")
    for j, frame in enumerate(ids):
        assert torch.equal(plain[:, 0, 1 + j], k[:, frame])
    assert torch.equal(got, plain) == (want_pos == [0, 0])


def test_invalid_memory_position_is_refused_naming_the_field():
    for bad in ("sideways", -1, True, 2.0, [1], None):
        with pytest.raises(ValueError, match="memory_position must be an int >= 0"):
            MemoryConfig(memory_position=bad)


def test_geometry_may_be_unset_in_the_config_but_not_in_a_memory():
    cfg = MemoryConfig()                          # storage "kv", no kv_layout: a config for the generator to fill
    with pytest.raises(ValueError, match="storage='kv' needs kv_layout"):
        RetrievalMemory(cfg)
    with pytest.raises(ValueError, match="storage='latent' needs latent_shape"):
        RetrievalMemory(MemoryConfig(storage="latent"))
    with pytest.raises(ValueError, match="storage='kv' needs kv_layout"):
        MemoryConfig(kv_layout=(1, 2, 3, 4))
    assert MemoryConfig.from_dict(cfg.to_dict()) == cfg


# --- save / load ------------------------------------------------------------------------------------------------

def _edit_manifest(path: str, edit) -> None:
    manifest_file = os.path.join(path, "manifest.json")
    manifest = json.load(open(manifest_file))
    edit(manifest["config"])
    manifest["manifest_sha256"] = memory_format.manifest_digest(manifest)
    with open(manifest_file, "w") as f:
        json.dump(manifest, f)


def test_memory_position_is_saved_and_loaded(tmp_path):
    mem, _, _ = kv_memory(memory_position="absolute")
    mem.save(str(tmp_path / "m"))
    assert json.load(open(tmp_path / "m" / "manifest.json"))["config"]["memory_position"] == "absolute"
    loaded = RetrievalMemory.load(str(tmp_path / "m"))
    assert loaded.config == mem.config
    plan, loaded_plan = mem.retrieve(0), loaded.retrieve(0)
    assert torch.equal(gathered(mem, plan), gathered(loaded, loaded_plan))


def test_a_save_without_memory_position_loads_with_the_default(tmp_path):
    # saves written before the field existed have no config.memory_position (re-checksummed as they were written)
    mem, _, _ = kv_memory(memory_position=4)
    path = str(tmp_path / "old")
    mem.save(path)
    _edit_manifest(path, lambda c: c.pop("memory_position"))
    loaded = RetrievalMemory.load(path)
    assert loaded.config.memory_position == 0
    assert loaded.config == dataclasses.replace(mem.config, memory_position=0)
    plan = loaded.retrieve(0)
    assert torch.equal(gathered(loaded, plan), gathered(loaded, plan, positions=0))


@pytest.mark.parametrize("bad", ["sideways", -2, True, 1.5, [0]])
def test_a_save_with_an_invalid_memory_position_is_refused(tmp_path, bad):
    mem, _, _ = kv_memory()
    path = str(tmp_path / "bad")
    mem.save(path)
    _edit_manifest(path, lambda c: c.update(memory_position=bad))
    with pytest.raises(ValueError, match="field config is not a valid MemoryConfig: memory_position must be"):
        RetrievalMemory.load(path)


def test_streams_with_different_counts_attend_to_the_smallest():
    """A bounded host tier drops the oldest frames (stream 0's first in a batched append), so streams can have
    different numbers of retrievable frames; every stream's memory slots then hold the smallest count (no slot left
    with a previous block's frame), which the block record's memory_positions shows."""
    cfg = lrag.WanConfig(num_layers=1, dim=16, num_heads=2, ffn_dim=16, text_dim=8, text_len=4, in_dim=4, out_dim=4,
                         latent_height=4, latent_width=4, frames_per_block=3, window=6, sink=1)
    torch.manual_seed(0)
    model = lrag.models.wan.CausalWanModel(cfg).eval()
    pipe = Pipeline(model, retrieval=MemoryConfig(top_k=2, recent_exclude=0, device_frames=10, host_frames=12))
    res = pipe.generate(torch.randn(3, 3, 8), 30, generator=torch.Generator().manual_seed(2))
    unequal = 0
    for rec in res.memory_log:
        k_sel = [len(frames) for frames in rec["selected_global_frames"]]
        unequal += len(set(k_sel)) > 1
        assert [len(p) for p in rec["memory_positions"]] == [min(k_sel)] * 3
    assert unequal > 0 and torch.isfinite(res.latents).all()
