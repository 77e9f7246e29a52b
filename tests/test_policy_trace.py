"""The retrieval policy + cosine_topk reproduce the official release's 40-block retrieval trace exactly."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lrag_ext
from lrag_ext.policy import RetrievalPolicy

from conftest import fixture_path


@pytest.fixture(scope="module")
def trace():
    with open(fixture_path("retrieval_trace.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def descriptors():
    return load_file(fixture_path("retrieval_descriptors.safetensors"))


def policy_of(trace) -> RetrievalPolicy:
    kw = trace["resolved_config"]["model_kwargs"]
    return RetrievalPolicy(top_k=kw["memory_size"], recent_exclude=kw["recent_exclude"],
                           sink_frames=kw["sink_size"], window_frames=kw["local_attn_size"])


def test_policy_schedule_matches_trace(trace):
    policy = policy_of(trace)
    for block in trace["blocks"]:
        s = block["start_frame"]
        assert policy.num_evicted(s) == block["pool_size_at_block_start"]
        lo, hi = policy.eligible_range(s)
        assert hi - lo == block["num_eligible"]
        assert (block["retrieval"] is None) == (policy.num_selected(s) == 0)
        if block["retrieval"] is not None:
            assert policy.num_selected(s) == block["retrieval"]["k_sel"]


@pytest.mark.parametrize("page_size", [1, 4, 7])
def test_cosine_topk_reproduces_trace(trace, descriptors, device, page_size):
    policy = policy_of(trace)
    desc = descriptors["descriptors"]                                   # [frames, D], frame f = descriptor f
    frames, D = desc.shape
    # Store the history paged, in shuffled physical order, to exercise the page table.
    n_pages = -(-frames // page_size)
    padded = torch.zeros(n_pages * page_size, D)
    padded[:frames] = desc
    perm = torch.randperm(n_pages, generator=torch.Generator().manual_seed(page_size))
    pages = torch.empty(n_pages, page_size, D)
    pages[perm] = padded.view(n_pages, page_size, D)
    table = perm.int()[None].to(device)
    pages = pages.to(device)
    retrieved_blocks = 0
    for b, block in enumerate(trace["blocks"]):
        s = block["start_frame"]
        lo, hi = policy.eligible_range(s)
        if s == 0:
            continue
        query = desc[s - 1][None].to(device)                             # the last clean frame of the previous block
        scores, ids = lrag_ext.cosine_topk(query, pages, table, torch.tensor([lo], device=device),
                                           torch.tensor([hi], device=device), policy.top_k)
        n = policy.num_selected(s)
        assert (ids[0, n:] == -1).all()
        want_frames = descriptors["memory_global_frames"][b]
        want_sims = descriptors["memory_similarities"][b]
        assert ids[0, :n].cpu().tolist() == want_frames[:n].tolist(), f"block {b}"
        assert (want_frames[n:] == -1).all()
        torch.testing.assert_close(scores[0, :n].cpu(), want_sims[:n], atol=1e-6, rtol=0)
        if block["retrieval"] is not None:
            r = block["retrieval"]
            assert r["query_descriptor_frame"] == s - 1 and r["log_query_frame"] == s
            assert ids[0, :n].cpu().tolist() == r["selected_global_frames"]
            assert [i - policy.sink_frames for i in r["selected_global_frames"]] == r["selected_pool_indices"]
            retrieved_blocks += 1
    assert retrieved_blocks == 34


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(top_k=0), ValueError, "top_k must be >= 1"),
    (dict(recent_exclude=-1), ValueError, "recent_exclude must be >= 0"),
    (dict(sink_frames=-1), ValueError, "sink_frames must be >= 0"),
    (dict(window_frames=1, sink_frames=1), ValueError, r"window_frames \(1\) must exceed sink_frames \(1\)"),
    (dict(top_k=2.0), TypeError, "top_k must be an int"),
])
def test_policy_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        RetrievalPolicy(**kwargs)


def test_policy_rejects_bad_frame_count():
    with pytest.raises(ValueError, match="num_frames must be an int >= 0"):
        RetrievalPolicy().eligible_range(-1)
