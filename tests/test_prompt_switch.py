"""Prompt switches with KV re-cache against the golden run of LongLive v1.0's interactive pipeline
(tests/fixtures/README.md §12), and what the retrieval memory does across a switch."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_path
from lrag.checkpoint import load_generator
from lrag.config import tiny_from_run_json
from lrag.models.wan import CausalWanModel
from lrag.pipeline import Pipeline
from lrag_ext import MemoryConfig, RetrievalMemory

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def golden():
    run = json.load(open(fixture_path("longlive_switch_tiny_run.json")))
    io = load_file(fixture_path("longlive_switch_tiny_io.safetensors"))
    model = load_generator(CausalWanModel(tiny_from_run_json(run)), fixture_path("longlive_switch_tiny_ckpt.pt"),
                           use_ema=False)                              # use_ema: false -> "generator"
    return run, io, model


def _switches(run, io):
    return [(frame, io[f"text_embeds_{i + 1}"]) for i, frame in enumerate(run["switch_frame_indices"])]


def test_two_switches_reproduce_longlive_bit_for_bit(golden):
    run, io, model = golden
    assert run["global_sink"] is True and (model.cfg.window, model.cfg.sink) == (12, 3)
    res = Pipeline(model).generate(io["text_embeds_0"], run["num_output_frames"], mode="native",
                                   noise=io["init_noise"], renoise=io["renoise"], trace=True,
                                   switches=_switches(run, io))
    # switch 1 (frame 10) lands at block 4 = frame 12: the re-run starts at frame 0 and rewrites the sink too;
    # switch 2 (frame 21) at frame 21: frames 9-20 re-run, the sink keeps the first prompt's K/V
    assert res.switches == [{"frame": 10, "block": 4, "start_frame": 12}, {"frame": 21, "block": 7, "start_frame": 21}]
    recache = run["recache_forwards"]
    assert [(r["current_start"] // run["tokens_per_frame"], r["frames"]) for r in recache] == [(0, 12), (9, 12)]
    assert torch.equal(res.x_in[:, :, 0], io["x_in_per_forward"])
    assert torch.equal(res.x0[:, :, 0], io["x0_per_forward"])
    assert torch.equal(res.latents, io["output_latents"])


def test_the_recache_forwards_themselves_match(golden, monkeypatch):
    # the re-cache forwards' inputs and x0 (LongLive discards the x0; equal x0 means equal activations throughout)
    run, io, model = golden
    seen = []
    original = CausalWanModel.recache

    def spy(self, latents, cache, timestep=0.0):
        flow = original(self, latents, cache, timestep)
        t = torch.zeros(latents.shape[:2])
        seen.append((latents.clone(), pipe.scheduler.to_x0(flow, latents, t)))
        return flow

    monkeypatch.setattr(CausalWanModel, "recache", spy)
    pipe = Pipeline(model)
    pipe.generate(io["text_embeds_0"], 30, mode="native", noise=io["init_noise"], renoise=io["renoise"],
                  switches=_switches(run, io))
    assert len(seen) == 2
    for i, (latents, x0) in enumerate(seen):
        assert torch.equal(latents, io[f"recache_{i}_x_in"])
        assert torch.equal(x0, io[f"recache_{i}_x0"])


def test_the_recache_matters(golden):
    run, io, model = golden
    pipe = Pipeline(model)
    kw = dict(mode="native", noise=io["init_noise"], renoise=io["renoise"])
    plain = pipe.generate(io["text_embeds_0"], 30, **kw).latents
    assert torch.equal(plain[:, :12], io["output_latents"][:, :12])          # identical before the first switch
    assert (plain[:, 12:] - io["output_latents"][:, 12:]).abs().max() > 1e-2
    # switching the prompt without the re-cache (new text only) is not LongLive's result either
    original = CausalWanModel.recache
    try:
        CausalWanModel.recache = lambda self, latents, cache, timestep=0.0: None  # noqa: E731
        no_recache = pipe.generate(io["text_embeds_0"], 30, switches=_switches(run, io), **kw).latents
    finally:
        CausalWanModel.recache = original
    assert (no_recache[:, 12:] - io["output_latents"][:, 12:]).abs().max() > 1e-2


@pytest.mark.parametrize("switches, message", [
    ([(0, "T")], r"switches\[0\]: frame 0 must be in \[1, 27\]"),
    ([(28, "T")], r"frame 28 must be in \[1, 27\]: .*\(a later one would never happen\)"),
    ([(9, "T"), (9, "T")], r"switches\[1\]: frame 9 must be in \[10, 27\]"),
    ([(10, "T"), (11, "T")], r"switches\[1\]: frame 11 must be in \[13, 27\]: .*one switch per block"),
    ([(True, "T")], "the frame must be an int"),
    ([(9, "T", 1)], r"must be a \(frame, text_embeddings\) pair"),
    ([(9, torch.zeros(1, 16, 5))], r"text embeddings must be \[1, L <= 16, 32\]"),
    ([(9, torch.zeros(1, 40, 32))], r"text embeddings must be \[1, L <= 16, 32\], got \[1, 40, 32\]"),
])
def test_bad_switches_are_refused(golden, switches, message):
    run, io, model = golden
    text = io["text_embeds_1"]
    switches = [tuple(text if x == "T" else x for x in sw) for sw in switches]
    with pytest.raises(ValueError, match=message):
        Pipeline(model).generate(io["text_embeds_0"], 30, mode="native", switches=switches)


def test_recache_errors(golden):
    run, io, model = golden
    cache = model.new_cache(1)
    model.set_text(cache, io["text_embeds_0"])
    with pytest.raises(ValueError, match="nothing to re-cache"):
        model.recache(io["output_latents"][:, :3], cache)
    model(io["output_latents"][:, :3], torch.zeros(1, 3), cache, update_cache=True)
    with pytest.raises(ValueError, match=r"latents must be the last 3 frames \[1, 3, 16, 8, 8\]"):
        model.recache(io["output_latents"][:, :6], cache)


# ----------------------------------------------------------------------------- the retrieval memory at a switch
N_FRAMES, SWITCH = 60, 45


@pytest.fixture(scope="module")
def rag_runs(golden):
    """rag mode, 20 blocks, one switch at frame 45 (retrieval from block 6 on), under each memory policy; every
    call of ``recompute_kv`` recorded."""
    run, io, model = golden
    runs = {}
    for policy in ("keep", "recompute", "forget"):
        calls = []
        original = CausalWanModel.recompute_kv

        def spy(self, latents, cache, calls=calls, original=original):
            calls.append((latents.clone(), cache.text.k[0].clone()))
            return original(self, latents, cache)

        CausalWanModel.recompute_kv = spy
        try:
            pipe = Pipeline(model, retrieval=MemoryConfig(top_k=3, recent_exclude=2), switch_memory=policy)
            res = pipe.generate(io["text_embeds_0"], N_FRAMES, mode="rag", generator=torch.Generator().manual_seed(3),
                                switches=[(SWITCH, io["text_embeds_1"])])
        finally:
            CausalWanModel.recompute_kv = original
        runs[policy] = (pipe, res, calls)
    return runs


def test_every_policy_is_the_same_before_the_switch(rag_runs):
    latents = [res.latents[:, :SWITCH] for _, res, _ in rag_runs.values()]
    assert all(torch.equal(latents[0], x) for x in latents[1:])
    logs = [[{k: v for k, v in r.items() if k != "retrieval_s"} for r in res.memory_log if r["block"] < SWITCH // 3]
            for _, res, _ in rag_runs.values()]
    assert logs[0] and all(log == logs[0] for log in logs[1:])


def test_keep_gathers_the_stored_kv(rag_runs):
    _, res, calls = rag_runs["keep"]
    assert calls == [] and any(r["block"] >= SWITCH // 3 for r in res.memory_log)


def test_recompute_reruns_the_older_retrieved_latents_under_the_new_prompt(rag_runs, golden):
    _, io, model = golden
    _, res, calls = rag_runs["recompute"]
    after = [r for r in res.memory_log if r["block"] >= SWITCH // 3]
    with_older = [r for r in after if any(f < SWITCH for f in r["selected_global_frames"][0])]
    assert len(calls) == len(with_older) > 0           # one recompute per retrieval that selected an older frame
    cache = model.new_cache(1)
    model.set_text(cache, io["text_embeds_1"])
    for rec, (latents, text_k) in zip(with_older, calls):
        frames = rec["selected_global_frames"][0]
        assert torch.equal(latents[0], res.latents[0, frames])     # the frames' own latents, selection order
        assert torch.equal(text_k, cache.text.k[0])               # under the new prompt


def test_a_switch_block_retrieves_afresh_even_when_retrieval_is_held(golden, monkeypatch):
    # retrieve_every=4 holds the slots at block 15 (frame 45); a switch there forces a new retrieval, which under
    # "forget" finds nothing eligible: no frame from before the switch stays in the slots
    from lrag import block_memory
    run, io, model = golden
    seen = {}
    original = block_memory.BlockMemory.retrieve

    def spy(self, s, cache, hold=False):
        plan = original(self, s, cache, hold=hold)
        seen[s] = (hold, cache.mem_count)
        return plan

    monkeypatch.setattr(block_memory.BlockMemory, "retrieve", spy)
    pipe = Pipeline(model, retrieval=MemoryConfig(top_k=3, recent_exclude=2), switch_memory="forget",
                    retrieve_every=4)
    gen = lambda switches: pipe.generate(io["text_embeds_0"], N_FRAMES, mode="rag",  # noqa: E731
                                         generator=torch.Generator().manual_seed(3), switches=switches)
    gen([])
    assert seen[SWITCH] == (True, 3)                                  # held: the block-12 retrieval's 3 frames
    res = gen([(SWITCH, io["text_embeds_1"])])
    assert res.switches[0]["block"] == 15 and seen[SWITCH] == (False, 0)
    assert all(f >= SWITCH for r in res.memory_log if r["block"] >= 15 for f in r["selected_global_frames"][0])


def test_forget_never_retrieves_frames_from_before_the_switch(rag_runs, tmp_path):
    pipe, res, calls = rag_runs["forget"]
    after = [r for r in res.memory_log if r["block"] >= SWITCH // 3]
    assert calls == []
    assert all(f >= SWITCH for r in after for f in r["selected_global_frames"][0])
    assert any(r["selected_global_frames"][0] for r in after)   # retrieval resumed once the new frames aged
    keep_after = [r for r in rag_runs["keep"][1].memory_log if r["block"] >= SWITCH // 3]
    assert any(f < SWITCH for r in keep_after for f in r["selected_global_frames"][0])   # keep does use them
    mem = pipe.memory
    stream = mem.streams()[0]
    assert all(mem._code_of(stream, f) == -1 for f in range(SWITCH))                # their K/V freed
    mem.save(str(tmp_path / "m"))
    back = RetrievalMemory.load(str(tmp_path / "m"))
    assert back.num_frames(stream) == N_FRAMES
    ids = back.retrieve(stream).ids[0].tolist()
    assert ids and all(f == -1 or f >= SWITCH for f in ids)              # still forgotten after a reload


def test_unknown_switch_memory_policy(golden):
    with pytest.raises(ValueError, match="switch_memory must be one of"):
        Pipeline(golden[2], switch_memory="drop")
