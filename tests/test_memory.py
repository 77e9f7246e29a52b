"""TensorMemory (the pipeline's retrieval memory) against the official 40-block retrieval trace (fixture 2)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_path
from lrag.memory import Memory, Selection, TensorMemory, candidate_range


def _block_kv(start: int, frames: int = 3, layers: int = 2):
    """K/V whose every value is the global frame id (K) or minus it (V), so gathers can be checked."""
    ids = torch.arange(start, start + frames, dtype=torch.float32)
    k = ids.reshape(1, frames, 1, 1, 1).expand(layers, frames, 4, 2, 8).clone()
    return k, -k


def test_candidate_range():
    # SPEC §3: [sink, sink + max(0, n - window) - R); retrieval starts at block 6 with one candidate.
    assert [candidate_range(3 * b, 1, 12, 5) for b in (0, 5, 6, 7, 8)] == [(1, 1), (1, 1), (1, 2), (1, 5), (1, 8)]
    assert candidate_range(100, 2, 12, 0) == (2, 90)


def test_matches_official_trace():
    io = load_file(fixture_path("retrieval_descriptors.safetensors"))
    trace = json.load(open(fixture_path("retrieval_trace.json")))
    desc = io["descriptors"]
    mem = TensorMemory(k=6, recent_exclude=5, sink=1, window=12)
    assert isinstance(mem, Memory)
    for b, blk in enumerate(trace["blocks"]):
        s = 3 * b
        assert blk["start_frame"] == s
        if s:
            sel = mem.retrieve(desc[s - 1], s)
            assert sel.num_candidates == blk["num_eligible"]
            pool = io["memory_pool_indices"][b]
            expect = pool[pool >= 0]
            assert (sel.frames - 1).tolist() == expect.tolist(), f"block {b}"
            assert (sel.frames.tolist() == io["memory_global_frames"][b][: len(expect)].tolist())
            torch.testing.assert_close(sel.scores, io["memory_similarities"][b][: len(expect)], atol=1e-6, rtol=0)
            if len(sel):
                k, v = mem.gather(sel)
                assert k.shape == (2, len(sel), 4, 2, 8)
                assert k[:, :, 0, 0, 0].eq(sel.frames.float()).all() and v.eq(-k).all()
        mem.append(_block_kv(s), desc[s:s + 3])
    assert mem.num_frames == 120


def test_reset_and_growth():
    mem = TensorMemory(k=2, recent_exclude=0, sink=0, window=1)
    for s in range(0, 60, 3):
        mem.append(_block_kv(s), torch.randn(3, 5))
    assert mem.num_frames == 60
    k, _ = mem.gather(Selection(torch.tensor([59, 0, 17]), torch.zeros(3), 3))
    assert k[0, :, 0, 0, 0].tolist() == [59.0, 0.0, 17.0]
    mem.reset()
    assert mem.num_frames == 0 and len(mem.retrieve(torch.randn(5), 60)) == 0


def test_errors():
    with pytest.raises(ValueError, match="k >= 1"):
        TensorMemory(k=0)
    with pytest.raises(ValueError, match="sink < window"):
        TensorMemory(sink=12, window=12)
    mem = TensorMemory()
    with pytest.raises(ValueError, match="block_kv"):
        mem.append((torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="embeddings"):
        mem.append(_block_kv(0), torch.zeros(2, 5))
    mem.append(_block_kv(0), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="do not match"):
        mem.append(_block_kv(3), torch.zeros(3, 6))
    assert mem.num_frames == 3   # failed appends change nothing
    with pytest.raises(IndexError, match="outside"):
        mem.gather(Selection(torch.tensor([3]), torch.zeros(1), 1))
