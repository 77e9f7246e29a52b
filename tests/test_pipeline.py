"""Pipeline behaviour beyond the single-stream parity runs: batches, drawn noise, argument errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_path
from lrag.checkpoint import load_generator
from lrag.config import tiny_from_run_json
from lrag.models.wan import CausalWanModel
from lrag.pipeline import Pipeline, mean_descriptor
from lrag_ext import MemoryConfig
from test_wan_parity import LookupEmbedder


@pytest.fixture(scope="module")
def setup():
    run = json.load(open(fixture_path("rag_tiny_run.json")))
    model = load_generator(CausalWanModel(tiny_from_run_json(run)), fixture_path("rag_tiny_ckpt.pt"))
    return model, load_file(fixture_path("rag_tiny_io.safetensors"))


def test_batch_of_two_streams_matches_reference(setup):
    # two identical streams, each with its own memory: both reproduce the reference's retrieval run (8 blocks)
    model, io = setup
    nb = 8
    renoise = io["renoise"][:nb].unsqueeze(2).expand(-1, -1, 2, -1, -1, -1, -1).reshape(nb, 3, 6, 16, 8, 8)
    pipe = Pipeline(model, embed=LookupEmbedder(io["output_latents"][0], io["descriptors"]))
    res = pipe.generate(io["text_embeds"].expand(2, -1, -1), 3 * nb, mode="rag",
                        noise=io["init_noise"][:, :3 * nb].expand(2, -1, -1, -1, -1), renoise=renoise)
    for b in range(2):
        err = (res.latents[b] - io["output_latents"][0, :3 * nb]).abs().max().item()
        assert err <= 1e-4, f"stream {b}: {err}"
    rec = res.memory_log[-1]
    assert rec["block"] == 7 and rec["selected_global_frames"] == [[4, 3, 1, 2]] * 2


def test_drawn_noise_is_reproducible(setup):
    model, io = setup
    pipe = Pipeline(model, embed=mean_descriptor, retrieval=MemoryConfig(top_k=2, recent_exclude=0))
    runs = [pipe.generate(io["text_embeds"], 6, generator=torch.Generator().manual_seed(s)).latents for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_errors(setup):
    model, io = setup
    pipe = Pipeline(model)
    text = io["text_embeds"]
    with pytest.raises(ValueError, match="mode must be"):
        pipe.generate(text, 6, mode="memory")
    with pytest.raises(ValueError, match="multiple of frames_per_block"):
        pipe.generate(text, 7)
    with pytest.raises(ValueError, match="noise must be"):
        pipe.generate(text, 6, noise=io["init_noise"])
    with pytest.raises(ValueError, match="renoise must be"):
        pipe.generate(text, 6, noise=io["init_noise"][:, :6], renoise=io["renoise"])


@pytest.mark.parametrize("policy, block6", [(0, [0]), ("sink", [0]), ("absolute", [1]), ("ordered", [6])])
def test_memory_position_policies(setup, policy, block6):
    # Block 6 retrieves frame 1 whatever the policy; later selections depend on the (now different) frames, so
    # there the positions are checked against the policy's rule. The embedder is lenient here: from block 6 on
    # the frames differ from the recorded ones except for policy 0.
    model, io = setup
    pipe = Pipeline(model, embed=LookupEmbedder(io["output_latents"][0], io["descriptors"], tol=float("inf")),
                    retrieval=MemoryConfig(memory_position=policy))
    res = pipe.generate(io["text_embeds"], 27, noise=io["init_noise"][:, :27], renoise=io["renoise"][:9])
    assert [rec["block"] for rec in res.memory_log] == [6, 7, 8]
    assert res.memory_log[0]["memory_positions"] == [block6]
    for rec in res.memory_log:
        frames, pos = torch.tensor(rec["selected_global_frames"][0]), rec["memory_positions"][0]
        if policy == "absolute":
            assert pos == frames.tolist()
        elif policy == "ordered":   # the local window starts at slot 7: memory on slots 7-m..6, oldest first
            assert pos == (7 - len(frames) + frames.argsort().argsort()).tolist()
        else:
            assert pos == [0] * len(frames)
    same = torch.equal(res.latents, io["output_latents"][:, :27])
    assert same == (policy in (0, "sink"))


def test_retrieval_config_errors():
    for bad in ("sideways", True, -1, 1.5, None):
        with pytest.raises(ValueError, match="memory_position must be an int >= 0"):
            MemoryConfig(memory_position=bad)
    with pytest.raises(ValueError, match="top_k must be"):
        MemoryConfig(top_k=0)


def test_mode_and_position_overrides(setup):
    # rag on an absolute-RoPE cache (e.g. Self-Forcing weights) with memory at the frames' own indices, and
    # native on window-relative positions: both run, retrieve where expected and differ from the defaults
    model, io = setup
    args = dict(noise=io["init_noise"][:, :24], renoise=io["renoise"][:8])
    pipe = Pipeline(model, retrieval=MemoryConfig(memory_position="absolute"))
    res = pipe.generate(io["text_embeds"], 24, mode="rag", position_mode="absolute", **args)
    assert [rec["block"] for rec in res.memory_log] == [6, 7]
    assert res.memory_log[0]["memory_positions"] == [[1]]
    native_window = Pipeline(model).generate(io["text_embeds"], 24, mode="native", position_mode="window", **args)
    native = Pipeline(model).generate(io["text_embeds"], 24, mode="native", **args)
    assert native_window.memory_log == [] and torch.isfinite(native_window.latents).all()
    assert torch.equal(native_window.latents[:, :3], native.latents[:, :3])   # block 0: same positions either way
    assert not torch.equal(native_window.latents, native.latents)


def test_memory_records_are_read_only_when_used(setup, monkeypatch):
    """The loop never reads a block's selection back from the device unless someone looks at its record; records
    read late (at the end) equal records read right after their block."""
    from lrag_ext.memory import RetrievalMemory

    model, io = setup
    reads = []
    original = RetrievalMemory.records
    monkeypatch.setattr(RetrievalMemory, "records",
                        lambda self, *a, **kw: reads.append(1) or original(self, *a, **kw))
    args = dict(noise=io["init_noise"][:, :27], renoise=io["renoise"][:9])
    pipe = Pipeline(model, embed=LookupEmbedder(io["output_latents"][0], io["descriptors"]))
    reads_at_block = []
    lazy = pipe.generate(io["text_embeds"], 27, callback=lambda blk: reads_at_block.append(len(reads)), **args)
    assert reads_at_block == [0] * 9 and len(reads) == 3  # blocks 6-8 retrieved; read once each, at the end
    eager_records = []
    eager = pipe.generate(io["text_embeds"], 27, callback=lambda blk: eager_records.append(blk.memory_record), **args)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "retrieval_s"} for r in recs]  # noqa: E731
    assert strip(lazy.memory_log) == strip(eager.memory_log) == strip([r for r in eager_records if r is not None])
    assert torch.equal(lazy.latents, eager.latents)


def test_a_kept_block_record_reads_its_own_run(setup):
    """A BlockResult kept from an interrupted run and read after the pipeline ran again describes its own run (the
    record is bound to that run's memory, not to whatever memory the pipeline holds when it is read)."""
    model, io = setup
    pipe = Pipeline(model, embed=LookupEmbedder(io["output_latents"][0], io["descriptors"], tol=float("inf")))
    args = dict(noise=io["init_noise"][:, :27], renoise=io["renoise"][:9])
    kept = []

    def keep_then_stop(blk):
        kept.append(blk)
        if blk.index == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe.generate(io["text_embeds"], 27, callback=keep_then_stop, **args)
    pipe.generate(io["text_embeds"], 24, generator=torch.Generator().manual_seed(5))
    late = [blk.memory_record for blk in kept if blk._record is not None]
    full = Pipeline(model, embed=LookupEmbedder(io["output_latents"][0], io["descriptors"], tol=float("inf")))
    strip = lambda recs: [{k: v for k, v in r.items() if k != "retrieval_s"} for r in recs]  # noqa: E731
    assert strip(late) == strip(full.generate(io["text_embeds"], 27, **args).memory_log)


@pytest.mark.parametrize("mode", ["rag", "native"])
def test_a_run_continued_from_its_own_prefix_reproduces_itself(setup, mode):
    """Oracle: the run itself. Given its first P generated frames as `prefix` (and the same noise), a generation
    must reproduce every later frame and every retrieval exactly (the prefix blocks go through retrieval, the context
    rerun and the memory like generated ones); another prefix changes what follows, and is kept as given."""
    model, io = setup
    args = dict(noise=io["init_noise"][:, :27], renoise=io["renoise"][:9], mode=mode)
    strip = lambda log: [{k: v for k, v in r.items() if k != "retrieval_s"} for r in log]  # noqa: E731
    full = Pipeline(model).generate(io["text_embeds"], 27, **args)
    for P in (3, 12, 21, 27):
        cont = Pipeline(model).generate(io["text_embeds"], 27, prefix=full.latents[:, :P].clone(), **args)
        assert torch.equal(cont.latents, full.latents), P
        assert strip(cont.memory_log) == strip(full.memory_log)
    other = full.latents[:, :12].flip(1).contiguous()
    cont = Pipeline(model).generate(io["text_embeds"], 27, prefix=other, **args)
    assert torch.equal(cont.latents[:, :12], other) and not torch.equal(cont.latents[:, 12:], full.latents[:, 12:])


def test_bad_prefix_is_refused_by_name(setup):
    model, io = setup
    pipe = Pipeline(model)
    good = torch.zeros(1, 6, 16, 8, 8)
    for bad in (good[:, :4], torch.zeros(1, 30, 16, 8, 8), good[..., :4], good.long(), good[0], [1.0]):
        with pytest.raises(ValueError, match="prefix must be a float"):
            pipe.generate(io["text_embeds"], 27, noise=io["init_noise"][:, :27], prefix=bad)
    assert pipe.memory is None
