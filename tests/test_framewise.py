"""Frame-wise generation (1 latent frame per block) and per-block step lists against golden runs of Causal-Forcing's
own pipeline (tests/fixtures/README.md §11), and LongLive-RAG retrieval with F = 1 against a brute-force walk of
SPEC §3's policy."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_path
from lrag import block_memory
from lrag.checkpoint import load_generator
from lrag.config import tiny_from_run_json
from lrag.models.wan import CausalWanModel
from lrag.pipeline import Pipeline, mean_descriptor
from lrag_ext import MemoryConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CKPT = "cf_framewise_tiny_ckpt.pt"
RUNS = ("cf_framewise_tiny", "cf_framewise_window_tiny")


def _golden(name):
    run = json.load(open(fixture_path(f"{name}_run.json")))
    io = load_file(fixture_path(f"{name}_io.safetensors"))
    if run["local_attn_size"] == -1:
        # Causal-Forcing as released attends to every frame (a 32760-token cache): a window as long as the video
        # attends the same keys, and no frame is ever evicted, so there is no sink.
        cfg = tiny_from_run_json(run, window=run["num_output_frames"], sink=0)
    else:
        cfg = tiny_from_run_json(run)
        assert (cfg.window, cfg.sink) == (run["local_attn_size"], run["sink_size"])
    assert cfg.frames_per_block == 1
    model = load_generator(CausalWanModel(cfg), fixture_path(CKPT))      # --use_ema: generator_ema
    return run, io, model


def _steps(run):
    # the yaml's nominal lists (warped by the pipeline, as the official code does)
    cfg = run["resolved_config"]
    return cfg["denoising_step_list"], cfg.get("denoising_step_list_first_chunk")


@pytest.mark.parametrize("name", RUNS)
def test_framewise_run_reproduces_causal_forcing_bit_for_bit(name):
    run, io, model = _golden(name)
    steps, first = _steps(run)
    assert (steps, first) == ([1000, 500], [1000, 750, 500, 250])           # the 2-step model, 4-step first frame
    pipe = Pipeline(model, denoising_steps=steps, first_block_steps=first)
    assert pipe.timesteps.tolist() == run["denoising_step_list_warped"]
    assert pipe.first_timesteps.tolist() == run["denoising_step_list_first_chunk_warped"]
    res = pipe.generate(io["text_embeds"], run["num_output_frames"], mode="native", noise=io["init_noise"],
                        renoise=io["renoise"], trace=True)
    assert [len(pipe.block_timesteps(b)) for b in range(run["num_blocks"])] == run["steps_per_block"]
    assert torch.equal(res.x_in[:, :, 0], io["x_in_per_forward"])       # every forward, unused slots zero
    assert torch.equal(res.x0[:, :, 0], io["x0_per_forward"])
    assert torch.equal(res.latents, io["output_latents"])


def test_first_block_steps_matter():
    run, io, model = _golden("cf_framewise_tiny")
    steps, _ = _steps(run)
    res = Pipeline(model, denoising_steps=steps).generate(
        io["text_embeds"], run["num_output_frames"], mode="native", noise=io["init_noise"],
        renoise=io["renoise"][:, :1])
    assert (res.latents - io["output_latents"]).abs().max() > 1e-2


def test_renoise_extent_follows_the_longest_step_list():
    run, io, model = _golden("cf_framewise_tiny")
    steps, first = _steps(run)
    pipe = Pipeline(model, denoising_steps=steps, first_block_steps=first)
    assert pipe.max_steps == 4
    with pytest.raises(ValueError, match=r"renoise must be \[8, 3, \.\.\.\]"):
        pipe.generate(io["text_embeds"], 8, mode="native", noise=io["init_noise"], renoise=io["renoise"][:, :1])
    with pytest.raises(ValueError, match="first_block_steps: denoising steps must be non-empty"):
        Pipeline(model, denoising_steps=steps, first_block_steps=[])
    with pytest.raises(ValueError, match=r"denoising_steps: denoising steps must be .* in \[0, 1000\]"):
        Pipeline(model, denoising_steps=[1500])


# --------------------------------------------------------------------------------- retrieval with F = 1
def _brute_force_selection(frames, s, sink, window, k, r):
    """SPEC §3 written out: when ``s`` frames exist, the candidates are global frames ``[sink, sink +
    max(0, s - window) - r)``; the query is frame ``s - 1``'s embedding; cosine top-k, descending."""
    hi = sink + max(0, s - window) - r
    if s == 0 or hi <= sink:
        return None
    emb = torch.nn.functional.normalize(mean_descriptor(frames[: s].double()), dim=-1)
    cand = torch.arange(sink, hi)
    sims = emb[cand] @ emb[s - 1]
    top = torch.topk(sims, min(k, len(cand)))
    return cand[top.indices].tolist(), top.values.double()


@pytest.mark.parametrize("top_k, recent_exclude", [(3, 2), (1, 0), (4, 5)])
def test_framewise_retrieval_follows_the_policy(top_k, recent_exclude):
    run, io, model = _golden("cf_framewise_window_tiny")                # window 6, sink 1, F = 1
    steps, first = _steps(run)
    cfg = model.cfg
    pipe = Pipeline(model, denoising_steps=steps, first_block_steps=first,
                    retrieval=MemoryConfig(top_k=top_k, recent_exclude=recent_exclude))
    n = 20
    res = pipe.generate(io["text_embeds"], n, mode="rag", generator=torch.Generator().manual_seed(5))
    frames = res.latents[0]
    by_block = {rec["block"]: rec for rec in res.memory_log}
    expected_blocks = []
    for s in range(n):
        want = _brute_force_selection(frames, s, cfg.sink, cfg.window, top_k, recent_exclude)
        if want is None:
            assert s not in by_block
            continue
        expected_blocks.append(s)
        rec = by_block[s]
        assert rec["query_embedding_frame"] == s - 1 and rec["query_frame"] == s
        assert rec["num_evicted"] == max(0, s - cfg.window)
        assert rec["selected_global_frames"] == [want[0]], f"block {s}"
        torch.testing.assert_close(torch.tensor(rec["selected_similarities"][0], dtype=torch.float64), want[1],
                                   atol=1e-5, rtol=0)
    assert sorted(by_block) == expected_blocks and expected_blocks     # retrieval did happen


@pytest.mark.parametrize("every", [2, 3])
def test_retrieve_every_n_blocks_holds_the_slots_in_between(monkeypatch, every):
    run, io, model = _golden("cf_framewise_window_tiny")
    steps, first = _steps(run)
    seen = []
    original = block_memory.BlockMemory.retrieve

    def spy(self, s, cache, hold=False):
        before = cache.mem_positions.clone()
        plan = original(self, s, cache, hold=hold)
        seen.append((s, hold, before, cache.mem_positions.clone()))
        return plan

    monkeypatch.setattr(block_memory.BlockMemory, "retrieve", spy)
    config = MemoryConfig(top_k=3, recent_exclude=2)
    kwargs = dict(denoising_steps=steps, first_block_steps=first, retrieval=config)
    n = 20
    held = Pipeline(model, retrieve_every=every, **kwargs).generate(
        io["text_embeds"], n, mode="rag", generator=torch.Generator().manual_seed(5))
    assert [s for s, hold, _, _ in seen if not hold] == list(range(0, n, every))
    assert all(rec["block"] % every == 0 for rec in held.memory_log) and held.memory_log
    for s, hold, before, after in seen:
        if hold:
            assert torch.equal(before, after)                      # the slots keep the last retrieval's frames
    assert any(hold and after.shape[1] > 0 for _, hold, _, after in seen)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_retrieve_every_must_be_a_positive_int(bad):
    run, io, model = _golden("cf_framewise_tiny")
    with pytest.raises(ValueError, match="retrieve_every must be an int >= 1"):
        Pipeline(model, retrieve_every=bad)
