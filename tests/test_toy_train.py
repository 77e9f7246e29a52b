"""Training the toy generator (lrag.toy.train) and sampling it (lrag.toy.sample), on a very small geometry:
gradients through the inference cache, the block schedule of the loss, loss decrease, bit-exact resume,
refusals, the exported weights, rollouts from a prefix. Seconds on one core; nothing is timed."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")

from lrag.pipeline import Pipeline  # noqa: E402
from lrag import cli  # noqa: E402
from lrag.checkpoint import build_generator  # noqa: E402
from lrag.models.wan import CausalWanModel  # noqa: E402
from lrag.scheduler import FlowMatchScheduler  # noqa: E402
from lrag.toy import sample  # noqa: E402
from lrag.toy.train import (LAST_NAME, WEIGHTS_NAME, ToyConfig, Validation, block_losses,  # noqa: E402
                            load_toy_generator, main, new_state, parse_args, train, train_step, training_timesteps)
from lrag.toy.world import make_clip  # noqa: E402

TINY = ["--layers", "1", "--dim", "16", "--heads", "1", "--ffn-dim", "32"]
RECIPE = ["--batch", "2", "--window-frames", "12", "--val-clips", "1", "--warmup", "1", "--lr", "3e-3", "--quiet"]
SCHED = FlowMatchScheduler(5.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**changes) -> ToyConfig:
    base = dict(num_layers=1, dim=16, num_heads=1, ffn_dim=32, window_frames=12, batch=2, warmup=1, lr=3e-3,
                val_clips=1)
    return ToyConfig(**{**base, **changes})


def tiny_model(layers=1, seed=0) -> CausalWanModel:
    torch.manual_seed(seed)
    return CausalWanModel(tiny_config(num_layers=layers).wan_config())


def fixed_batch(batch=2, frames=12, seed=5):
    x = torch.from_numpy(np.stack([make_clip(seed + i, frames)[0] for i in range(batch)]))
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=gen)
    t = training_timesteps(SCHED, (batch, frames // 3), gen, 8, 0.25)
    return x, t, noise


def run_args(out, *extra):
    return parse_args(["--out", str(out), *TINY, *RECIPE, *extra])


def test_training_forward_is_the_inference_forward_and_backpropagates_block_after_block():
    """A forward that records gradients gives the inference forward's numbers bit for bit, and every block can be
    differentiated after the previous ones committed their context (the in-place attention buffers carry no
    graph from one block to the next)."""
    model = tiny_model(layers=2)
    x, _, noise = fixed_batch(frames=15)
    for mode in ("window", "absolute"):
        cache = model.new_cache(2, mode)
        for s in range(0, 15, 3):
            t = torch.full((2, 3), 700.0)
            model.zero_grad()
            model.set_text(cache, sample.null_text(model, 2))
            with torch.no_grad():
                ref = model(x[:, s:s + 3] + noise[:, s:s + 3], t, cache)
            out = model(x[:, s:s + 3] + noise[:, s:s + 3], t, cache)
            assert torch.equal(out, ref)
            out.square().mean().backward()
            assert model.blocks[0].self_attn.k.weight.grad.abs().sum() > 0
            with torch.no_grad():
                model(x[:, s:s + 3], torch.zeros(2, 3), cache, update_cache=True)


def test_gradients_reach_every_parameter_but_the_null_text_paths():
    """Every parameter gets a finite gradient, of norm > 1e-4 (measured 5e-3 and more), but two paths the toy's
    null prompt makes constant: the first text Linear's weight (its input is zero: exactly 0) and the
    cross-attention's query/key path (a softmax over one text token is 1: rounding only, ~1e-8)."""
    model = tiny_model(layers=2)
    x, t, noise = fixed_batch()
    block_losses(model, x, t, noise, SCHED, backward=True)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    dead = {n for n, p in model.named_parameters() if p.grad.norm() < 1e-4}
    expected = {f"blocks.{i}.{n}" for i in range(2) for n in ("norm3.weight", "norm3.bias", "cross_attn.q.weight",
                                                             "cross_attn.q.bias", "cross_attn.k.weight",
                                                             "cross_attn.k.bias", "cross_attn.norm_q.weight",
                                                             "cross_attn.norm_k.weight")}
    assert dead == expected | {"text_embedding.0.weight"}
    assert float(model.text_embedding[0].weight.grad.abs().max()) == 0.0


def test_loss_follows_the_block_schedule():
    """Block b's loss depends on its own noisy frames, on the clean frames of its window (sink + the last
    window - sink - F) and nothing else: not on later frames, not on the noise of the context blocks (the
    context is the clean ground truth), and, with one layer, not on frames that left the window."""
    model = tiny_model(layers=1)
    x, t, noise = fixed_batch(frames=24)
    base = block_losses(model, x, t, noise, SCHED)
    assert base.shape == (2, 8)

    def changed(frames=None, eps=None):
        return (block_losses(model, x if frames is None else frames, t, noise if eps is None else eps, SCHED)
                != base)[0]

    later = x.clone()
    later[:, 15:] += 1
    assert changed(frames=later).tolist() == [False] * 5 + [True] * 3          # causal
    eps = noise.clone()
    eps[:, 9:12] += 1
    assert changed(eps=eps).tolist() == [False] * 3 + [True] + [False] * 4     # block 3 only: clean context
    sink = x.clone()
    sink[:, 0] += 1
    assert changed(frames=sink).all()                                          # the sink: every block
    old = x.clone()
    old[:, 1] += 1                          # frame 1 leaves the window (sink + 8 + block) at block 4 (frames 12-14)
    assert changed(frames=old).tolist() == [True] * 4 + [False] * 4


def test_training_steps_reduce_the_loss_on_a_fixed_batch():
    state = new_state(tiny_config(seed=3), torch.device("cpu"))
    x, t, noise = fixed_batch(seed=100)
    with torch.no_grad():
        before = block_losses(state.model, x, t, noise, SCHED).mean()
    losses = [train_step(state, SCHED) for _ in range(12)]
    with torch.no_grad():
        after = block_losses(state.model, x, t, noise, SCHED).mean()
    assert state.step == 12 and all(np.isfinite(losses))
    assert after < 0.8 * before, (before, after, losses)


def test_resume_continues_bit_for_bit(tmp_path):
    straight = train(run_args(tmp_path / "a", "--steps", "4", "--checkpoint-every", "2"))
    train(run_args(tmp_path / "b", "--steps", "2"))
    # the training options default to the checkpoint's: only the new total is given
    resumed = train(parse_args(["--out", str(tmp_path / "b"), "--steps", "4", "--resume",
                                str(tmp_path / "b" / LAST_NAME), "--quiet"]))
    assert resumed["state"].step == 4
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "a" / LAST_NAME), load_file(tmp_path / "b" / LAST_NAME)
    assert sorted(a) == sorted(b) and any(k.startswith("optim.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the exported weights are the same bytes (a reproducible checksum)
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == (tmp_path / "b" / WEIGHTS_NAME).read_bytes()
    assert [r["step"] for r in straight["log"]] == [2, 4]
    assert [r["step"] for r in resumed["log"]] == [2, 4]
    assert resumed["log"][-1]["val_loss"] == straight["log"][-1]["val_loss"]


def test_resume_refusals(tmp_path, capsys):
    train(run_args(tmp_path, "--steps", "1"))
    last = str(tmp_path / LAST_NAME)
    assert main(["--out", str(tmp_path), "--steps", "3", "--resume", last, "--dim", "32", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "another geometry" in err and "dim: 16 in the checkpoint, 32 asked" in err
    assert main(["--out", str(tmp_path), "--steps", "1", "--resume", last, "--quiet"]) == 2
    assert "already at step 1" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--resume", str(tmp_path / "log.json"), "--quiet"]) == 2
    assert "log.json" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--resume", str(tmp_path / WEIGHTS_NAME), "--quiet"]) == 2
    assert "not a toy training checkpoint" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    # the lrag command forwards to the same entry point
    assert cli.main(["train-toy", "--out", str(tmp_path), "--batch", "0"]) == 2
    assert capsys.readouterr().err.startswith("lrag: error: --batch must be >= 1")


def test_exported_weights_load_and_match_the_card(tmp_path):
    res = train(run_args(tmp_path, "--steps", "2"))
    model, cfg = load_toy_generator(str(tmp_path / WEIGHTS_NAME))
    ema = res["state"].ema.state_dict()
    assert cfg == res["state"].config
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    # a plain state dict: the project's generator loader reads it with the config's WanConfig
    other = build_generator(cfg.wan_config(), str(tmp_path / WEIGHTS_NAME))
    assert all(torch.equal(v, ema[k]) for k, v in other.state_dict().items())
    card = json.loads((tmp_path / "toy_generator.json").read_text())
    assert card["sha256"] == hashlib.sha256((tmp_path / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert card["step"] == 2 and card["validation"]["val_seeds"] == [1000, 1000]
    assert ToyConfig.from_dict(card["config"]) == cfg
    with pytest.raises(ValueError, match="unknown toy config fields"):
        ToyConfig.from_dict({**card["config"], "extra": 1})


def test_validation_is_fixed_and_uses_seeds_from_1000():
    cfg = tiny_config(val_clips=2)
    a, b = Validation.build(cfg, SCHED), Validation.build(cfg, SCHED)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.noise, b.noise) and torch.equal(a.timesteps, b.timesteps)
    assert torch.equal(a.frames[1], torch.from_numpy(make_clip(1001, 12)[0]))
    assert 1.5 < a.baseline < 3.0        # Var(noise - x0) ~ 1 + 1.1


def test_sampling_timesteps_and_the_euler_sampler():
    assert sample.sampling_timesteps(SCHED, 4).tolist() == pytest.approx([1000, 937.5, 833.333, 625], abs=1e-3)
    assert sample.nominal_steps(SCHED, 4) == [1000, 750, 500, 250]
    ts = sample.sampling_timesteps(SCHED, 16)
    assert len(ts) == 16 and bool((ts[1:] < ts[:-1]).all())
    model = tiny_model(layers=1)
    noise = torch.randn(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = sample.null_text(model, 1)
    # oracle: the Euler (= DDIM) update written out by hand on a fresh cache, steps 1000 and the 9th of 16
    steps = [sample.nominal_steps(SCHED, 16)[i] for i in (0, 8)]
    got = Pipeline(model, steps, SCHED, sampler="euler").generate(text, 3, noise=noise, mode="native",
                                                                 position_mode="window").latents
    cache = model.new_cache(1, "window")
    model.set_text(cache, text)
    t, t2 = (torch.full((1, 3), float(ts[i])) for i in (0, 8))
    with torch.no_grad():
        flow = model(noise, t, cache)
        sig = SCHED.sigma(ts[[0, 8]], torch.float64)
        x = (noise.double() + float(sig[1] - sig[0]) * flow.double()).float()
        assert torch.equal(got, SCHED.to_x0(model(x, t2, cache), x, t2))
    with pytest.raises(ValueError, match="sampler must be one of"):
        Pipeline(model, sampler="ddpm")


def test_rollout_continues_a_prefix():
    model = tiny_model(layers=1)
    prefix = torch.from_numpy(make_clip(7, 6)[0])[None]
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    out = sample.rollout(model, prefix, 12, steps=2, generator=gen()).latents
    assert out.shape == (1, 12, 4, 16, 16) and torch.equal(out[:, :6], prefix)
    assert torch.equal(out, sample.rollout(model, prefix, 12, steps=2, generator=gen()).latents)
    # a rollout given its own first 9 frames continues identically (same noise): the prefix went through the cache
    noise = torch.randn(1, 12, 4, 16, 16, generator=gen())
    full = sample.rollout(model, prefix, 12, steps=2, noise=noise).latents
    assert torch.equal(sample.rollout(model, full[:, :9], 12, steps=2, noise=noise).latents, full)
    with pytest.raises(ValueError, match="multiples"):
        sample.rollout(model, prefix[:, :4], 12)


def test_unseen_pixels_and_sink_probe():
    frames, meta = make_clip(1000, 40)
    P = meta.period
    assert not sample._unseen(meta, [P], [0], 16).any()      # the same place: everything seen
    assert sample._unseen(meta, [P // 2], [0], 16).all()      # the far side of the loop: nothing seen
    res = sample.sink_probe(tiny_model(layers=1), [1000, 1001], steps=2)
    assert res["clips"] == 2 and res["pixels"] > 0
    assert all(np.isfinite(res[k]) for k in ("matched", "control", "mean_colour", "seen_matched", "seen_control"))


def test_config_geometry():
    cfg = ToyConfig()
    wan = cfg.wan_config()
    assert (wan.in_dim, wan.latent_height, wan.tokens_per_frame) == (4, 16, 64)
    assert (wan.frames_per_block, wan.window, wan.sink) == (3, 12, 1)
    assert cfg.window_frames > cfg.world.period[1] + cfg.window
    with pytest.raises(ValueError, match="window_frames"):
        dataclasses.replace(cfg, window_frames=10)
    with pytest.raises(ValueError, match="position_mode"):
        dataclasses.replace(cfg, position_mode="relative")


def _brute_force_memory_losses(model, x, t, noise, top_k, recent):
    """:func:`block_losses` with memory slots, written out by hand: every committed frame's K/V kept, the
    reference's retrieval by brute force (spatial-mean key with the reference's ``+ 1e-8`` norms, candidates
    ``[sink, sink + max(0, s - window) - R)``, cosine top-k sorted descending), the selected K/V placed in the
    memory slots at temporal position 0."""
    cfg, F = model.cfg, model.cfg.frames_per_block
    B, L = x.shape[:2]
    cache = model.new_cache(B, "window", memory_slots=top_k)
    text = sample.null_text(model, B)
    keys = x.mean(dim=(3, 4)).double()                                         # [B, L, C]
    keys = keys / (keys.norm(dim=-1, keepdim=True) + 1e-8)
    ks, vs, losses, picked = [], [], torch.zeros(B, L // F), {}
    for b in range(L // F):
        s = b * F
        cache.clear_memory()
        hi = cfg.sink + max(0, s - cfg.window) - recent
        if s and hi > cfg.sink:
            m = min(top_k, hi - cfg.sink)
            sims = torch.einsum("bnc,bc->bn", keys[:, cfg.sink:hi], keys[:, s - 1])
            ids = sims.topk(m, dim=1).indices + cfg.sink                         # [B, m]
            picked[s] = ids.tolist()
            k_all, v_all = torch.stack(ks, 2), torch.stack(vs, 2)             # [layers, B, frames, T, H, d]
            sel = lambda a: torch.stack([a[:, i, ids[i]] for i in range(B)], 1)  # noqa: E731
            cache.set_memory(sel(k_all), sel(v_all), torch.zeros(B, m, dtype=torch.long))
        x0, eps = x[:, s:s + F], noise[:, s:s + F]
        tb = t[:, b, None].expand(B, F)
        model.set_text(cache, text)
        flow = model(SCHED.add_noise(x0, eps, tb), tb, cache)
        losses[:, b] = (flow - (eps - x0)).pow(2).mean(dim=(1, 2, 3, 4))
        model(x0, torch.zeros(B, F), cache, update_cache=True)
        k, v = cache.block_kv()
        ks += list(k.clone().unbind(2))
        vs += list(v.clone().unbind(2))
    return losses, picked


@torch.no_grad()
def test_training_with_memory_slots_attends_what_the_reference_retrieves():
    """``memory_top_k > 0``: each block's loss is the one computed with the frames the reference retrieval
    picks (brute force) in the memory slots at position 0; old frames then matter again, and without memory
    slots they do not."""
    from lrag_ext import MemoryConfig  # noqa: PLC0415
    model = tiny_model(layers=1)
    x, t, noise = fixed_batch(frames=33, seed=40)
    want, picked = _brute_force_memory_losses(model, x, t, noise, top_k=4, recent=2)
    assert sorted(picked) == [15, 18, 21, 24, 27, 30] and len(picked[30][0]) == 4
    got = block_losses(model, x, t, noise, SCHED, retrieval=MemoryConfig(top_k=4, recent_exclude=2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    old = x.clone()
    old[:, 1:4] += 1              # frames 1-3 are candidates from block 5 (s = 15) on
    changed = block_losses(model, old, t, noise, SCHED, retrieval=MemoryConfig(top_k=4, recent_exclude=2)) != got
    assert changed[:, 5:].any(dim=0).all()
    base = block_losses(model, x, t, noise, SCHED)
    assert ((block_losses(model, old, t, noise, SCHED) != base)[:, 6:] == False).all()  # noqa: E712


def test_memory_training_options():
    cfg = ToyConfig(memory_top_k=6)
    assert cfg.training_memory().top_k == 6 and cfg.training_memory().recent_exclude == 5
    assert ToyConfig().training_memory() is None
    assert ToyConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="memory_top_k"):
        ToyConfig(memory_top_k=9)          # window 12 - sink 1 - block 3 = 8 at most
    with pytest.raises(ValueError, match="memory_recent_exclude"):
        ToyConfig(memory_recent_exclude=-1)
