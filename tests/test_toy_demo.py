"""The shipped toy generator (python/lrag/toy/weights/) and the built-in demo that runs it, ``lrag generate --demo``,
plus ``lrag inspect`` on the toy's files.

The shipped weights must be there: a checkout without them fails these tests (it does not skip them). The demo
runs end to end at a small size; its metrics are checked against :func:`lrag.toy.evaluate.score` of rollouts made
here independently (the toy's sampler driven directly, the reference policy written out), its video against the
preview of those rollouts. Nothing is timed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, cli_error, read_video

pytest.importorskip("imageio_ffmpeg")
pytest.importorskip("matplotlib")

from lrag import cli  # noqa: E402
from lrag.toy import shipped as shipped_mod  # noqa: E402
from lrag.toy.evaluate import score  # noqa: E402
from lrag.toy.metrics import hit_rate_chance  # noqa: E402
from lrag.toy.sample import rollout  # noqa: E402
from lrag.toy.train import ToyConfig, load_toy_generator  # noqa: E402
from lrag.toy.world import make_clip  # noqa: E402
from lrag.video import latent_preview  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = os.path.join(REPO, "python", "lrag", "toy", "weights", "toy_generator.safetensors")
CARD = os.path.join(REPO, "python", "lrag", "toy", "weights", "toy_generator.json")
BLOCKS, SEED = 3, 7                       # generated blocks of the test demo, its clip
PREFIX = 33                               # the evaluation's default prefix: longest period 30 + 1, rounded up to 3s
PANEL, GAP, LABEL, STRIP = 160, 16, 32, 16   # 16 px x 10, the gap between panels, label band, timeline strip


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def shipped():
    return shipped_mod.load_shipped_generator("cpu")


# ---------------------------------------------------------------------------------------------------------------
# the shipped weights
def test_shipped_weights_are_present_and_match_their_card():
    assert os.path.isfile(WEIGHTS), f"the shipped toy generator is missing: {WEIGHTS}"
    assert os.path.isfile(CARD), f"the shipped toy generator's card is missing: {CARD}"
    card = json.loads(open(CARD).read())
    assert card["sha256"] == _sha256(WEIGHTS)
    assert card["bytes"] == os.path.getsize(WEIGHTS) and card["weights"] == "toy_generator.safetensors"
    assert os.path.samefile(shipped_mod.shipped_generator_path(), WEIGHTS)
    from lrag import toy
    assert toy.shipped_generator_path is shipped_mod.shipped_generator_path
    assert toy.load_shipped_generator is shipped_mod.load_shipped_generator


def test_shipped_generator_is_the_trainers_file(shipped):
    model, cfg, card = shipped
    ref, ref_cfg = load_toy_generator(WEIGHTS)
    assert cfg == ref_cfg == ToyConfig.from_dict(card["config"]) and not model.training
    want = ref.state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert card["sha256"] == _sha256(WEIGHTS)


@pytest.mark.parametrize("mode", ["native", "rag"])
def test_shipped_generator_rollouts_are_finite_and_deterministic(shipped, mode):
    from lrag_ext import MemoryConfig
    model, cfg, _ = shipped
    frames, _ = make_clip(3, 18, cfg.world)
    prefix = torch.from_numpy(frames[None, :9])
    outs = []
    for _ in range(2):
        noise = torch.randn((1, 18, 4, 16, 16), generator=torch.Generator().manual_seed(3))
        extra = dict(retrieval=MemoryConfig(top_k=2, recent_exclude=0), mode="rag") if mode == "rag" else {}
        res = rollout(model, prefix, 18, steps=4, noise=noise, position_mode=cfg.position_mode, **extra)
        outs.append(res.latents)
    assert torch.equal(outs[0], outs[1])
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0][0, :9], prefix[0])                 # the prefix is kept, the rest generated
    assert not torch.equal(outs[0][0, 9:], noise[0, 9:])


def _use_weights_dir(monkeypatch, folder):
    monkeypatch.setattr(shipped_mod, "WEIGHTS_DIR", str(folder))


def test_missing_or_mismatched_weights_are_refused_clearly(tmp_path, monkeypatch):
    _use_weights_dir(monkeypatch, tmp_path)
    with pytest.raises(shipped_mod.ShippedWeightsError, match=r"toy generator .*toy_generator.safetensors is "
                                                              r"missing: .*lrag train-toy"):
        shipped_mod.shipped_generator_path()
    shutil.copy(WEIGHTS, tmp_path)
    with pytest.raises(shipped_mod.ShippedWeightsError, match=r"card .*toy_generator.json is missing"):
        shipped_mod.load_shipped_generator()
    card = json.loads(open(CARD).read())
    (tmp_path / "toy_generator.json").write_text(json.dumps({**card, "sha256": None}))
    with pytest.raises(shipped_mod.ShippedWeightsError, match="has no sha256"):
        shipped_mod.shipped_card()
    shutil.copy(CARD, tmp_path)
    assert shipped_mod.shipped_card()["sha256"] == card["sha256"]          # an intact copy is accepted
    raw = bytearray((tmp_path / "toy_generator.safetensors").read_bytes())
    raw[-1] ^= 1                                                           # one bit of one weight
    (tmp_path / "toy_generator.safetensors").write_bytes(bytes(raw))
    with pytest.raises(shipped_mod.ShippedWeightsError) as e:
        shipped_mod.load_shipped_generator()
    assert hashlib.sha256(bytes(raw)).hexdigest() in str(e.value) and card["sha256"] in str(e.value)
    assert "corrupt, truncated or was replaced" in str(e.value)


def test_demo_without_weights_is_a_one_linecli_error(tmp_path, monkeypatch, capsys):
    _use_weights_dir(monkeypatch, tmp_path / "empty")
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--demo", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lrag: error: the shipped toy generator ") and "is missing" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# the demo end to end
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["generate", "--demo", "--seconds", str(BLOCKS * 0.75), "--seed", str(SEED), "--out", str(out),
                     "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def oracle(shipped):
    """The two rollouts made here without the demo or the evaluation's helpers: the clip, its seeded noise, the
    sampler of lrag.toy.sample driven directly; the reference policy (K 6, R 5, position 0, spatial-mean key)
    written out."""
    from lrag_ext import MemoryConfig
    from lrag_ext.reference import mean_descriptor
    model, cfg, _ = shipped
    assert math.ceil((cfg.world.period[1] + 1) / cfg.frames_per_block) * cfg.frames_per_block == PREFIX
    T = PREFIX + 3 * BLOCKS
    frames, meta = make_clip(SEED, T, cfg.world)
    noise = torch.randn((1, T, 4, 16, 16), generator=torch.Generator().manual_seed(SEED))
    prefix = torch.from_numpy(frames[None, :PREFIX])
    common = dict(steps=cfg.sample_steps, sampler="euler", position_mode="window", noise=noise)
    native = rollout(model, prefix, T, mode="native", **common)
    rag = rollout(model, prefix, T, mode="rag", retrieval=MemoryConfig(top_k=6, recent_exclude=5, memory_position=0),
                  embed=mean_descriptor, **common)
    return {"frames": frames, "meta": meta, "native": native, "rag": rag}


def _json_round_trip(obj):
    return json.loads(json.dumps(obj, allow_nan=True).replace("NaN", "null"))


def test_demo_metrics_are_the_evaluations_scores_of_the_same_rollouts(demo_run, oracle):
    doc = json.loads((demo_run / "demo_metrics.json").read_text())
    meta = oracle["meta"]
    assert doc["clip"] == {"seed": SEED, "period": meta.period}
    assert (doc["prefix_frames"], doc["generated_blocks"], doc["generated_frames"]) == (PREFIX, BLOCKS, 3 * BLOCKS)
    assert (doc["steps"], doc["sampler"], doc["position_mode"]) == (16, "euler", "window")
    assert doc["weights"]["sha256"] == _sha256(WEIGHTS)
    assert list(doc["modes"]) == ["native", "rag"]
    assert {m: doc["modes"][m]["evaluation_mode"] for m in doc["modes"]} == {"native": "sink", "rag": "rag"}
    for mode in ("native", "rag"):
        res = oracle[mode]
        want = score(res.latents[0], meta, PREFIX, 3, 12, res.memory_log if mode == "rag" else None)
        assert doc["modes"][mode]["metrics"] == _json_round_trip(want["metrics"]), mode
        assert doc["modes"][mode]["curves"] == _json_round_trip(want["curves"]), mode
    rag = doc["modes"]["rag"]["metrics"]
    assert rag["hit_rate_chance"] == hit_rate_chance(meta.period, 3) and 0 <= rag["hit_rate"] <= 1
    assert "hit_rate" not in doc["modes"]["native"]["metrics"]
    assert "did not beat the native sink schedule" in doc["note"]


def test_demo_runs_the_evaluations_own_rollouts(demo_run, shipped):
    """The demo's numbers are what lrag eval's run_mode gives for that clip at batch 1."""
    from lrag.toy.evaluate import Setup, base_modes, run_mode
    model, cfg, _ = shipped
    doc = json.loads((demo_run / "demo_metrics.json").read_text())
    setup = Setup(model, cfg, PREFIX // 3, cfg.sample_steps, "euler", batch=1)
    for mode, name in (("native", "sink"), ("rag", "rag")):
        (rec,), _ = run_mode(setup, base_modes(cfg)[name], [SEED], BLOCKS)
        assert doc["modes"][mode]["metrics"] == _json_round_trip(rec["metrics"])


def test_demo_video_is_labelled_and_shows_the_rollouts(demo_run, oracle):
    n = (PREFIX + 3 * BLOCKS) * 4                       # every latent frame shown 4 times
    height = LABEL + PANEL + STRIP
    for name in ("ground_truth", "native", "rag"):
        video = read_video(demo_run / f"{name}.mp4")
        assert video.shape == (n, height, PANEL, 3), name
    sbs = read_video(demo_run / "side_by_side.mp4").astype(np.float32)
    assert sbs.shape == (n, height, 3 * PANEL + 2 * GAP, 3)
    columns = {"truth": 0, "native": PANEL + GAP, "rag": 2 * (PANEL + GAP)}
    want = {"truth": torch.from_numpy(oracle["frames"]), "native": oracle["native"].latents[0],
            "rag": oracle["rag"].latents[0]}
    for name, x0 in columns.items():
        got = sbs[:, LABEL:LABEL + PANEL, x0:x0 + PANEL]
        preview = latent_preview(want[name], scale=10, interpolation="nearest").astype(np.float32)
        err = np.abs(got - preview).mean()
        assert err < 8.0, (name, err)                                  # H.264, twice: lossy
        if name != "truth":
            shifted = np.roll(preview, 12, axis=0)                     # a block off: clearly worse
            assert np.abs(got[-12 * BLOCKS:] - shifted[-12 * BLOCKS:]).mean() > err + 2, name
    # the label bands: text on each panel, three different labels
    bands = [sbs[:, :LABEL, x0:x0 + PANEL].mean(axis=0) for x0 in columns.values()]
    assert all((b > 128).sum() > 100 for b in bands)
    assert all(np.abs(a - b).mean() > 5 for i, a in enumerate(bands) for b in bands[i + 1:])
    timings = json.loads((demo_run / "timings.json").read_text())
    assert timings["panels"] == [f"ground truth (clip {SEED})", "native (sink + window)", "LongLive-RAG (K=6)"]


def test_demo_logs_the_rag_rollouts_retrievals(demo_run, oracle):
    log = json.loads((demo_run / "memory_log.json").read_text())
    want = oracle["rag"].memory_log                      # prefix blocks included: they retrieve too
    assert not log["interrupted"] and log["mode"] == "rag" and log["blocks_done"] == PREFIX // 3 + BLOCKS
    assert [r["block"] for r in log["records"]] == [r["block"] for r in want]
    assert [r["selected_global_frames"] for r in log["records"]] == [r["selected_global_frames"] for r in want]
    assert (log["top_k"], log["recent_exclude"], log["memory_position"]) == (6, 5, 0)
    t = json.loads((demo_run / "timings.json").read_text())
    assert (t["prefix_blocks"], t["generated_blocks"], t["num_blocks"]) == (PREFIX // 3, BLOCKS, PREFIX // 3 + BLOCKS)
    for mode in ("rag", "native"):
        s = t["modes"][mode]["summary"]
        assert s["finished"] and s["blocks_done"] == PREFIX // 3 + BLOCKS
        assert s["blocks_with_retrieval"] == (len(want) if mode == "rag" else 0)
        assert s["video_frames"] == (PREFIX + 3 * BLOCKS) * 4
        per_block = t["modes"][mode]["per_block_s"]
        assert [b["block"] for b in per_block] == list(range(PREFIX // 3 + BLOCKS))
        assert all(b["total"] >= b["denoise"] + b["rerun"] and b["rerun"] > 0 for b in per_block)
    from lrag.plots import plot_retrieval
    points = plot_retrieval(log["records"], demo_run / "p.png", num_blocks=log["blocks_done"], frames_per_block=3)
    assert points == [(r["block"], f, sim) for r in log["records"]
                      for f, sim in zip(r["selected_global_frames"][0], r["selected_similarities"][0])]
    assert (demo_run / "retrieval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_prints_its_metrics_and_no_claim(demo_run):
    from lrag.demo import format_metrics
    doc = json.loads((demo_run / "demo_metrics.json").read_text())
    text = format_metrics(doc)
    row = next(line for line in text.splitlines() if line.strip().startswith("revisit_truth"))
    assert row.split()[1:3] == [f"{doc['modes'][m]['metrics']['revisit_truth']:.3f}" for m in ("native", "rag")]
    rag = doc["modes"]["rag"]["metrics"]
    assert f"hit rate {rag['hit_rate']:.3f}" in text and f"random pick: {rag['hit_rate_chance']:.3f}" in text
    assert "did not beat the native sink schedule" in text


# ---------------------------------------------------------------------------------------------------------------
# options
@pytest.mark.parametrize("extra, message", [
    (["--prompt", "a fox"], "--prompt does not apply to --demo: the toy world has no text"),
    (["--top-k", "3"], "--top-k does not apply to --demo: the demo runs lrag eval's reference retrieval policy"),
    (["--recent-exclude", "2"], "--recent-exclude does not apply to --demo"),
    (["--memory-position", "ordered"], "--memory-position does not apply to --demo"),
    (["--embedder", "e.pt"], "--embedder does not apply to --demo"),
    (["--storage", "latent"], "--storage does not apply to --demo"),
    (["--device-frames", "8"], "--device-frames does not apply to --demo"),
    (["--host-frames", "8"], "--host-frames does not apply to --demo"),
    (["--backbone", "longlive"], "--backbone does not apply to --demo: the demo runs the shipped toy generator"),
    (["--checkpoint", "c.pt"], "--checkpoint does not apply to --demo"),
    (["--no-ema"], "--no-ema does not apply to --demo"),
    (["--wan-dir", "wan"], "--wan-dir does not apply to --demo"),
    (["--dtype", "bf16"], "--dtype does not apply to --demo"),
    (["--height", "64"], "--height does not apply to --demo"),
    (["--width", "64"], "--width does not apply to --demo"),
    (["--num-heads", "2"], "--num-heads does not apply to --demo"),
    (["--text-len", "16"], "--text-len does not apply to --demo"),
    (["--frames-per-block", "1"], "--frames-per-block does not apply to --demo"),
    (["--seed", "1000"], "--seed must be in [0, 999] with --demo (it picks the world clip; clips 1000-1999 are the "
                         "trainer's validation clips), got 1000"),
    (["--seed", "-1"], "--seed must be in [0, 999]"),
    (["--seconds", "0"], "--seconds must be a finite number > 0, got 0"),
    (["--seconds", "nan"], "--seconds must be a finite number > 0"),
    (["--seconds", "abc"], "argument --seconds: invalid float value"),
    (["--mode", "turbo"], "argument --mode: invalid choice"),
    (["--device", "bogus"], "--device"),
])
def test_demo_refuses_options_that_do_not_apply(tmp_path, capsys, extra, message):
    err = cli_error(["generate", "--demo", "--out", str(tmp_path / "out"), *extra], capsys)
    assert message in err
    if not message.startswith("argument"):                 # argparse's own errors come with the usage
        assert err.startswith("lrag: error: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()                 # nothing written


def test_demo_refusal_as_a_program_has_no_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "lrag", "generate", "--demo", "--top-k", "3", "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("lrag: error: --top-k does not apply to --demo")
    assert "Traceback" not in res.stderr and len(res.stderr.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_demo_runs_one_mode(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["generate", "--demo", "--seconds", "0.75", "--mode", "native", "--out", str(out),
                     "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "native" in stdout and "LongLive-RAG hit rate" not in stdout
    doc = json.loads((out / "demo_metrics.json").read_text())
    assert list(doc["modes"]) == ["native"] and not (out / "rag.mp4").exists()
    assert read_video(out / "side_by_side.mp4").shape[2] == 2 * PANEL + GAP      # ground truth | native
    assert json.loads((out / "memory_log.json").read_text())["records"] == []


# ---------------------------------------------------------------------------------------------------------------
# lrag inspect on the toy's files
def test_inspect_describes_the_shipped_toy_generator(capsys):
    card = json.loads(open(CARD).read())
    assert cli.main(["inspect", WEIGHTS, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model, _ = load_toy_generator(WEIGHTS)
    assert info["kind"] == "toy generator" and info["format"] == "lrag-toy-generator/1"
    assert ToyConfig.from_dict(info["toy_config"]) == ToyConfig.from_dict(card["config"])
    assert info["step"] == card["step"]
    assert info["sha256"] == _sha256(WEIGHTS) and info["card"]["sha256_matches"]
    assert info["card"]["validation"] == card["validation"] and info["card"]["command"] == card["command"]
    assert info["num_params"] == sum(p.numel() for p in model.parameters())
    assert info["geometry"]["num_heads"] == card["config"]["num_heads"]
    assert cli.main(["inspect", WEIGHTS]) == 0
    text = capsys.readouterr().out
    for line in ("kind:        toy generator (lrag-toy-generator/1", f"step:        {card['step']} of",
                 f"sha256:      {card['sha256']} (matches the card", f"trained:     {card['command']}",
                 f"heads:       {card['config']['num_heads']} (from its config)",
                 f"validation:  flow-matching loss {card['validation']['val_loss']:.4f}"):
        assert line in text, line


def test_inspect_toy_files_without_or_against_their_card(tmp_path, capsys):
    weights = tmp_path / "toy_generator.safetensors"
    shutil.copy(WEIGHTS, weights)
    assert cli.main(["inspect", str(weights)]) == 0
    assert "(no card toy_generator.json beside it)" in capsys.readouterr().out
    card = json.loads(open(CARD).read())
    (tmp_path / "toy_generator.json").write_text(json.dumps({**card, "sha256": "0" * 64}))
    assert cli.main(["inspect", str(weights)]) == 0
    assert f"does NOT match: the card says {'0' * 64}" in capsys.readouterr().out
    (tmp_path / "toy_generator.json").write_text("{not json")
    assert cli.main(["inspect", str(weights)]) == 0
    assert "card:        unreadable: toy generator card" in capsys.readouterr().out


def test_inspect_toy_file_whose_config_does_not_fit_its_weights(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(WEIGHTS, "pt") as f:
        meta = json.loads(f.metadata()["lrag_toy"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["config"]["num_layers"] += 1
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"lrag_toy": json.dumps(meta)})
    err = cli_error(["inspect", str(bad)], capsys)
    assert err.startswith(f"lrag: error: checkpoint '{bad}': the weights do not match") and "blocks.4" in err


def test_inspect_toy_training_checkpoint(tmp_path, capsys):
    from lrag.toy.train import new_state, save_state
    cfg = ToyConfig(num_layers=1, dim=16, num_heads=1, ffn_dim=32, freq_dim=16, steps=5)
    path = tmp_path / "last.safetensors"
    save_state(str(path), new_state(cfg, torch.device("cpu")))
    assert cli.main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "toy training checkpoint" and info["step"] == 0 and info["ema"]
    assert ToyConfig.from_dict(info["toy_config"]) == cfg
    from lrag.models.wan import CausalWanModel
    assert info["num_params"] == sum(p.numel() for p in CausalWanModel(cfg.wan_config()).parameters())


@pytest.mark.parametrize("channels", [3, 4, 16])
def test_preview_map_has_orthonormal_rows_and_shows_the_mean_as_grey(channels):
    from lrag.video import preview_matrix
    m = preview_matrix(channels).double()
    assert torch.allclose(m @ m.T, torch.eye(3, dtype=torch.float64), atol=1e-6)   # the old map had rank 2
    grey = m @ torch.ones(channels, dtype=torch.float64)                            # every channel equal
    assert torch.allclose(grey, grey.mean().expand(3), atol=1e-6) and grey.abs().min() > 0.1
    with pytest.raises(ValueError, match="at least 3 channels"):
        preview_matrix(2)
