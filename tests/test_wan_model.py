"""Unit tests of the causal Wan backbone: config presets, RoPE, the cache's window/position rules (fixture README
§6), the memory-slot API and argument errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import fixture_path
from lrag.config import WanConfig, tiny_from_run_json, wan_1_3b
from lrag.models.rope import Rope3D
from lrag.models.wan import CausalWanModel


@pytest.fixture(scope="module")
def cfg():
    return tiny_from_run_json(json.load(open(fixture_path("rag_tiny_run.json"))))


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return CausalWanModel(cfg).eval()


def test_presets(cfg):
    big = wan_1_3b()
    assert (big.tokens_per_frame, big.head_dim, big.grid) == (1560, 128, (30, 52))
    assert Rope3D(big.head_dim, big.grid).split == (22, 21, 21)
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.text_dim, cfg.text_len) == (64, 2, 2, 32, 16)
    assert (cfg.tokens_per_frame, cfg.frames_per_block, cfg.window, cfg.sink) == (16, 3, 12, 1)
    assert Rope3D(cfg.head_dim, cfg.grid).split == (6, 5, 5)


@pytest.mark.parametrize("changes, match", [
    (dict(num_heads=3), "divisible by num_heads"),
    (dict(sink=12), "sink must be in"),
    (dict(frames_per_block=12), "must fit in the non-sink window"),
    (dict(latent_height=7), "not divisible by the patch"),
    (dict(num_layers=0), "num_layers must be a positive int"),
])
def test_config_errors(cfg, changes, match):
    with pytest.raises(ValueError, match=match):
        cfg.replace(**changes)


def test_rope_against_closed_form():
    # independent real-arithmetic rotation: pair j of an axis with n pairs turns by pos * 10000^(-j/n)
    rope = Rope3D(32, (3, 4))
    x = torch.randn(1, 2, 12, 2, 32, dtype=torch.float64)
    pos = torch.tensor([5, 900])
    out = rope.apply(x, pos)
    hh, ww = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    angles = []
    for f in range(2):
        per_axis = []
        for p, n in ((torch.full((12,), int(pos[f])), 6), (hh.reshape(-1), 5), (ww.reshape(-1), 5)):
            per_axis.append(p[:, None].double() * 10000.0 ** (-torch.arange(n, dtype=torch.float64) / n))
        angles.append(torch.cat(per_axis, dim=1))
    ang = torch.stack(angles)[None, :, :, None, :]                       # [1, F, T, 1, 16]
    a, b = x[..., 0::2], x[..., 1::2]
    expect = torch.stack([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], dim=-1).flatten(-2)
    torch.testing.assert_close(out, expect, atol=1e-10, rtol=0)
    # re-positioning from a to b is a rotation of the temporal pairs only, by (b - a) w (SPEC §4)
    as_c = lambda t: torch.view_as_complex(t.reshape(*t.shape[:-1], 16, 2))  # noqa: E731
    ratio = as_c(rope.apply(x, pos + 7)) / as_c(out)
    w = 10000.0 ** (-torch.arange(6, dtype=torch.float64) / 6)
    torch.testing.assert_close(ratio[..., :6], torch.polar(torch.ones(6, dtype=torch.float64), 7 * w).expand_as(
        ratio[..., :6]), atol=1e-9, rtol=0)
    torch.testing.assert_close(ratio[..., 6:], torch.ones_like(ratio[..., 6:]), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="RoPE positions"):
        rope.apply(x, torch.tensor([0, 1024]))


def _drive(model, mode, slots, blocks):
    """Commits `blocks` blocks of dummy K/V (value = global frame id) and returns the cache."""
    cfg = model.cfg
    cache = model.new_cache(1, mode, memory_slots=slots)
    for _ in range(blocks):
        plan = cache.plan(cfg.frames_per_block)
        ids = torch.arange(cache.num_frames, cache.num_frames + cfg.frames_per_block, dtype=torch.float32)
        kv = ids.reshape(1, -1, 1, 1, 1).expand(1, -1, cfg.tokens_per_frame, cfg.num_heads, cfg.head_dim)
        cache.commit([kv] * cfg.num_layers, [-kv] * cfg.num_layers, plan)
    return cache


def _attended(cache, cfg):
    plan = cache.plan(cfg.frames_per_block)
    ids = torch.arange(cache.num_frames, cache.num_frames + cfg.frames_per_block, dtype=torch.float32)
    new = ids.reshape(1, -1, 1, 1, 1).expand(1, -1, cfg.tokens_per_frame, cfg.num_heads, cfg.head_dim)
    k, v, pos = cache.attention_kv(0, new, -new, plan)
    assert pos.shape == (1, k.shape[1])
    return k[0, :, 0, 0, 0].long().tolist(), pos[0].tolist(), plan.query_pos.tolist()


def test_window_mode_positions(model, cfg):
    # block 0: the sink is the block's own first frame
    assert _attended(_drive(model, "window", 6, 0), cfg) == ([0, 1, 2], [0, 1, 2], [0, 1, 2])
    # block 1: local budget = 12 - 1 - 6 = 5 frames -> everything
    assert _attended(_drive(model, "window", 6, 1), cfg) == ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [3, 4, 5])
    # block 2: the local window is already shortened (frames 1-3 dropped) though nothing was retrieved
    assert _attended(_drive(model, "window", 6, 2), cfg) == ([0, 4, 5, 6, 7, 8], [0, 4, 5, 6, 7, 8], [6, 7, 8])
    # block 4: window full -> slots 0..11, the block at 9, 10, 11, local = slots 7..11
    cache = _drive(model, "window", 6, 4)
    assert cache.frame_ids == list(range(12))
    assert _attended(cache, cfg) == ([0, 10, 11, 12, 13, 14], [0, 7, 8, 9, 10, 11], [9, 10, 11])
    # with two memory frames: [sink | memory at position 0 | local]
    mem = torch.full((cfg.num_layers, 2, cfg.tokens_per_frame, cfg.num_heads, cfg.head_dim), 99.0)
    cache.set_memory(mem, -mem, 0)
    assert _attended(cache, cfg) == ([0, 99, 99, 10, 11, 12, 13, 14], [0, 0, 0, 7, 8, 9, 10, 11], [9, 10, 11])
    cache.clear_memory()
    assert cache.mem_count == 0


def test_absolute_mode_positions(model, cfg):
    cache = _drive(model, "absolute", 0, 4)
    ids, pos, query = _attended(cache, cfg)
    assert ids == [0] + list(range(4, 15)) and pos == ids and query == [12, 13, 14]   # sink + last 11
    cache = _drive(model, "absolute", 0, 9)
    assert cache.frame_ids == [0] + list(range(16, 27))
    assert _attended(cache, cfg)[0] == [0] + list(range(19, 30))


def test_forward_commits_block_kv(model, cfg):
    cache = model.new_cache(1, "window", memory_slots=6)
    model.set_text(cache, torch.randn(1, 5, cfg.text_dim))
    with pytest.raises(RuntimeError, match="no block"):
        cache.block_kv()
    x = torch.randn(1, 3, cfg.in_dim, cfg.latent_height, cfg.latent_width)
    with torch.no_grad():
        flow = model(x, torch.full((1, 3), 1000.0), cache)
        assert cache.num_frames == 0 and flow.shape == x.shape
        model(x, torch.zeros(1, 3), cache, update_cache=True)
    k, v = cache.block_kv()
    assert k.shape == (cfg.num_layers, 1, 3, cfg.tokens_per_frame, cfg.num_heads, cfg.head_dim) == v.shape
    assert cache.num_frames == 3 and torch.equal(cache.k[:, :, :3], k)
    assert k.untyped_storage().data_ptr() == cache.k.untyped_storage().data_ptr()   # a view, not a copy


def test_memory_position_is_applied(model, cfg):
    torch.manual_seed(1)
    x = torch.randn(1, 3, cfg.in_dim, cfg.latent_height, cfg.latent_width)
    mem = torch.randn(cfg.num_layers, 1, cfg.tokens_per_frame, cfg.num_heads, cfg.head_dim)
    outs = []
    for pos in (0, 0, 5):
        cache = model.new_cache(1, "window", memory_slots=6)
        model.set_text(cache, torch.ones(1, 4, cfg.text_dim))
        cache.set_memory(mem, mem, pos)
        with torch.no_grad():
            outs.append(model(x, torch.full((1, 3), 500.0), cache))
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


def test_bf16_forward(cfg):
    torch.manual_seed(0)
    model = CausalWanModel(cfg).to(torch.bfloat16)
    cache = model.new_cache(1, "absolute")
    model.set_text(cache, torch.randn(1, 3, cfg.text_dim))
    x = torch.randn(1, 3, cfg.in_dim, cfg.latent_height, cfg.latent_width, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(x, torch.full((1, 3), 1000.0), cache, update_cache=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all() and cache.k.dtype == torch.bfloat16


def test_errors_leave_state_unchanged(model, cfg):
    cache = model.new_cache(1, "window", memory_slots=2)
    x = torch.randn(1, 3, cfg.in_dim, cfg.latent_height, cfg.latent_width)
    with pytest.raises(RuntimeError, match="set_text"):
        model(x, torch.zeros(1, 3), cache)
    with pytest.raises(ValueError, match="text must be"):
        model.set_text(cache, torch.randn(1, cfg.text_len + 1, cfg.text_dim))
    model.set_text(cache, torch.randn(1, 2, cfg.text_dim))
    with pytest.raises(ValueError, match="x must be"):
        model(x[..., :4], torch.zeros(1, 3), cache)
    with pytest.raises(ValueError, match="timestep must be"):
        model(x, torch.zeros(3), cache)
    with pytest.raises(ValueError, match="a block must have"):
        model(torch.randn(1, 12, cfg.in_dim, cfg.latent_height, cfg.latent_width), torch.zeros(1, 12), cache)
    mem = torch.zeros(cfg.num_layers, 3, cfg.tokens_per_frame, cfg.num_heads, cfg.head_dim)
    with pytest.raises(ValueError, match="exceed the cache's memory_slots"):
        cache.set_memory(mem, mem)
    with pytest.raises(ValueError, match="memory k/v must be"):
        cache.set_memory(mem[..., :4], mem[..., :4])
    with pytest.raises(ValueError, match=r"positions must be an int, \[m=2\]"):
        cache.set_memory(mem[:, :2], mem[:, :2], torch.tensor([0, 1, 2]))
    assert cache.mem_count == 0 and cache.num_frames == 0
    with pytest.raises(ValueError, match="position_mode"):
        model.new_cache(1, "relative")
    with pytest.raises(ValueError, match="memory_slots"):
        model.new_cache(1, "window", memory_slots=11)
    assert isinstance(WanConfig.from_wan_config({"num_layers": 1, "dim": 8, "num_heads": 2, "ffn_dim": 8,
                                                 "_class_name": "WanModel", "patch_size": [1, 2, 2]}), WanConfig)
    assert math.prod(cfg.grid) == cfg.tokens_per_frame


def test_rope_tables_are_built_once_per_positions():
    """apply() reuses the rotation table of positions it saw recently (every layer and forward of a block rotates
    by the same ones) and the result is exactly the uncached rotation."""
    rope = Rope3D(8, (2, 3), max_positions=64)
    x = torch.randn(2, 3, 6, 2, 8, dtype=torch.float32)
    built = []
    build = rope._build
    rope._build = lambda p: built.append(p.tolist()) or build(p)
    for positions in ([1, 2, 3], [4, 5, 6], [1, 2, 3], [[0, 1, 2], [7, 8, 9]]):
        pos = torch.tensor(positions)
        want = torch.view_as_real(torch.view_as_complex(x.double().reshape(2, 3, 6, 2, 4, 2))
                                  * build(pos)).flatten(-2).float()
        assert torch.equal(rope.apply(x, pos), want)
    assert built.count([1, 2, 3]) == 1  # seen twice, built once
    with pytest.raises(ValueError, match="RoPE positions must lie in"):
        rope.apply(x, torch.tensor([0, 1, 64]))
    for i in range(20):
        rope.apply(x, torch.tensor([i, i + 1, i + 2]))
    assert len(rope._factors) <= 8


def _frame_kv(cfg, ids, layer, sign=1.0, batch=1):
    """Dummy un-roped K (V: sign -1) ``[batch, n, T, H, d]`` whose every value identifies (stream, frame id, layer,
    token)."""
    T, H, d = cfg.tokens_per_frame, cfg.num_heads, cfg.head_dim
    token = torch.arange(T, dtype=torch.float32).reshape(1, 1, T, 1, 1) / 1000
    stream = 1000 * torch.arange(batch, dtype=torch.float32).reshape(batch, 1, 1, 1, 1)
    base = torch.tensor(ids, dtype=torch.float32).reshape(1, -1, 1, 1, 1) + 100 * layer + token + stream
    return sign * (base + torch.linspace(0, 0.5, H * d).reshape(1, 1, 1, H, d)).expand(batch, len(ids), T, H, d)


@pytest.mark.parametrize("window, sink, F, slots, mode, sizes, batch, heads, dim", [
    (12, 1, 3, 6, "window", [3], 1, 2, 16),            # the reference schedule
    (12, 1, 3, 0, "absolute", [3], 2, 1, 6),            # native; 2 streams, 1 head, head_dim 6 (RoPE tail path)
    (12, 1, 3, 6, "window", [3, 2, 1, 3], 1, 2, 16),    # blocks not aligned to the ring: wrapping runs, copies
    (7, 2, 2, 1, "window", [2, 1], 3, 3, 12),
    (5, 0, 1, 0, "absolute", [1], 1, 2, 16),            # no sink, frame-wise
    (9, 3, 4, 2, "window", [4, 3], 2, 2, 20),           # sink > half a block, head_dim 10
    (4, 1, 3, 0, "window", [3], 2, 2, 16),              # ring = one block
])
def test_ring_cache_matches_a_cache_that_keeps_everything(window, sink, F, slots, mode, sizes, batch, heads, dim):
    """Oracle: every frame's K/V kept in a list and the attended set rebuilt by concatenation. The ring cache's
    keys/values (general and per-block paths, roped and not, first and second forward of a block) and block_kv
    equal it exactly over 40 blocks, with memory frames set on some blocks; refused commits change nothing."""
    cfg = WanConfig(num_layers=2, dim=dim, num_heads=heads, ffn_dim=16, text_dim=8, text_len=4, in_dim=4, out_dim=4,
                    latent_height=4, latent_width=2, frames_per_block=F, window=window, sink=sink)
    cache = CausalWanModel(cfg).new_cache(batch, mode, memory_slots=slots)
    rope = Rope3D(cfg.head_dim, cfg.grid, 256)
    gen = torch.Generator().manual_seed(window * 100 + sink * 10 + F)
    local_budget = window - sink - slots if slots else window - sink
    kv = lambda ids, layer, sign=1.0: _frame_kv(cfg, ids, layer, sign, batch)  # noqa: E731
    for step in range(40):
        n = sizes[step % len(sizes)]
        m = int(torch.randint(0, slots + 1, (), generator=gen)) if slots and step % 3 else 0
        if m:
            mem = torch.randn(cfg.num_layers, batch, m, cfg.tokens_per_frame, cfg.num_heads, cfg.head_dim,
                              generator=gen)
            cache.set_memory(mem, -mem, torch.randint(0, 50, (batch, m), generator=gen))
        else:
            cache.clear_memory()
        N = cache.num_frames
        window_ids = list(range(min(sink, N))) + list(range(max(sink, N - (window - sink)), N))
        assert cache.frame_ids == window_ids
        total = window_ids + list(range(N, N + n))
        n_sink = min(sink, len(total))
        n_local = min(len(total) - n_sink, window - sink, local_budget)
        attended = total[:n_sink], total[len(total) - n_local:]
        plan = cache.plan(n)
        for layer in range(cfg.num_layers):
            want = [torch.cat([kv(attended[0], layer, sign), mem_part, kv(attended[1], layer, sign)], dim=1)
                    for sign, mem_part in ((1.0, cache.mem_k[layer, :, :m]), (-1.0, cache.mem_v[layer, :, :m]))]
            new_k, new_v = kv(total[-n:], layer), kv(total[-n:], layer, -1.0)
            k, v, pos = cache.attention_kv(layer, new_k, new_v, plan)
            assert torch.equal(k, want[0]) and torch.equal(v, want[1])
            for _ in range(2):   # the second forward reuses the block's roped prefix
                rk, rv = cache.roped_attention_kv(layer, new_k, new_v, plan, rope)
                assert torch.equal(rk, rope.apply(want[0], pos)) and torch.equal(rv, want[1])
        block = [kv(total[-n:], layer) for layer in range(cfg.num_layers)]
        before = (cache.k.clone(), cache.v.clone(), list(cache.frame_ids), cache.num_frames)
        for bad_k, match in ((block[:1], "one K and one V per layer"),
                             ([block[0], block[1][:, :, :1]], "commit needs K/V")):
            with pytest.raises(ValueError, match=match):
                cache.commit(bad_k, [-t for t in bad_k], plan)
            assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])
            assert (cache.frame_ids, cache.num_frames) == (before[2], before[3])
        cache.commit(block, [-t for t in block], plan)
        bk, bv = cache.block_kv()
        assert torch.equal(bk, torch.stack(block)) and torch.equal(bv, -bk)
        if sizes == [F]:   # aligned blocks: views of the cache, never copies
            assert bk.untyped_storage().data_ptr() == cache.k.untyped_storage().data_ptr()
    stale = cache.plan(sizes[0])
    block = [kv(list(range(cache.num_frames, cache.num_frames + sizes[0])), layer) for layer in range(cfg.num_layers)]
    cache.commit(block, block, stale)
    before = (cache.k.clone(), list(cache.frame_ids))
    with pytest.raises(ValueError, match="plan of this cache's current state"):
        cache.commit(block, block, stale)
    assert torch.equal(cache.k, before[0]) and cache.frame_ids == before[1]


def test_rope_into_a_buffer_of_another_dtype_rounds_like_the_activations():
    """apply(x, out=) equals out.copy_(apply(x)) bit for bit, also when out's dtype differs (a bf16 cache's keys
    written into a float32 attention buffer are rounded to bf16 first, as before the buffers existed)."""
    rope = Rope3D(12, (2, 2), max_positions=64)
    x = torch.randn(2, 3, 4, 2, 12)
    pos = torch.tensor([[0, 5, 9], [1, 2, 3]])
    for x_dtype, out_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                               (torch.float32, torch.float16)):
        xd = x.to(x_dtype)
        out = torch.full((2, 5, 4, 2, 12), float("nan"), dtype=out_dtype)
        assert rope.apply(xd, pos, out=out[:, 1:4]) is not None
        assert torch.equal(out[:, 1:4], rope.apply(xd, pos).to(out_dtype))
        assert out[:, 0].isnan().all() and out[:, 4].isnan().all()
    with pytest.raises(ValueError, match="out must have x's shape"):
        rope.apply(x, pos, out=torch.empty(2, 3, 4, 2, 10))
