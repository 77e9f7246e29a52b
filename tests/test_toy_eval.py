"""The toy evaluation (lrag.toy.evaluate, `lrag eval`) on a tiny untrained toy model: the report's contents and
JSON round trip, identical prefixes and noise across modes, the attention budgets, paired differences by hand,
an oracle rollout through the same scoring and aggregation, seed sets, refusals. Seconds on one core; nothing
is timed."""
from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")

from lrag import cli  # noqa: E402
from lrag.toy import evaluate as ev  # noqa: E402
from lrag.toy.metrics import bootstrap_ci  # noqa: E402
from lrag.toy.train import VAL_SEED, ToyConfig, export_weights, new_state  # noqa: E402
from lrag.toy.world import make_clip  # noqa: E402
from lrag_ext.reference import mean_descriptor  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(num_layers=1, dim=16, num_heads=1, ffn_dim=32, window_frames=12, val_clips=1)
# 2 test seeds, 2 blocks after the default 11-block prefix, 2 Euler steps, a long run of 3 blocks, a 2-policy grid
SMALL = ["--seeds", "0-1", "--val-seeds", "1000-1001", "--blocks", "2", "--long-blocks", "3", "--steps", "2",
         "--grid-embedders", "mean", "--grid-k", "3,6", "--grid-positions", "0", "--quiet"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = ToyConfig(**TINY)
    from lrag.models.wan import CausalWanModel  # noqa: PLC0415
    return CausalWanModel(cfg.wan_config()).eval(), cfg


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny toy generator exported the trainer's way (untrained)."""
    out = tmp_path_factory.mktemp("toy")
    export_weights(str(out), new_state(ToyConfig(**TINY), torch.device("cpu")), "test", {})
    return str(out / "toy_generator.safetensors")


@pytest.fixture(scope="module")
def report(weights, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("eval")
    assert ev.main(["--weights", weights, "--out", str(out), *SMALL]) == 0
    torch.set_num_threads(threads)
    return json.loads((out / ev.REPORT_NAME).read_text()), out


def test_report_has_every_mode_and_metric_with_intervals(report, weights):
    rep, out = report
    assert rep["format"] == ev.REPORT_FORMAT and rep["command"].startswith(ev.PROG + " --weights")
    with open(weights, "rb") as f:
        assert rep["weights"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    test = rep["test"]
    assert test["seeds"] == [0, 1] and list(test["metrics"]) == list(ev.MODES)
    for mode, metrics in test["metrics"].items():
        want = set(ev.ERROR_METRICS) | (set(ev.RAG_METRICS) if mode.startswith("rag") else set())
        assert set(metrics) == want, mode
        for name, v in metrics.items():
            assert len(v["values"]) == 2
            if v["mean"] is not None:       # the interval of the mean contains it
                assert v["low"] <= v["mean"] <= v["high"] and v["n"] >= 1, (mode, name)
        for name in ev.CURVES:
            assert len(test["curves"][mode][name]) == 2      # one value per generated block
    assert set(test["paired"]) == {"window", "rag", "rag-best"}        # against the baseline, sink
    assert set(test["paired"]["rag"]) == set(ev.ERROR_METRICS)
    # the same attention budget in every mode
    for mode, d in rep["config"]["modes"].items():
        assert sum(d["attended"].values()) == 12, mode
    assert rep["config"]["modes"]["window"]["attended"] == {"sink": 0, "retrieved": 0, "local": 12}
    assert rep["config"]["modes"]["rag"]["attended"] == {"sink": 1, "retrieved": 6, "local": 5}
    assert rep["config"]["prefix_frames"] == 33 and rep["config"]["num_frames"] == 39
    # the chance level of the hit rate is the world's, per seed's period
    chance = [min(1, 5 / p) for p in test["periods"]]
    assert test["metrics"]["rag"]["hit_rate_chance"]["values"] == pytest.approx(chance)
    # the long run: every mode, one curve value per block
    assert set(rep["long"]["metrics"]) == set(ev.MODES) and rep["long"]["seed"] == 0
    assert len(rep["long"]["curves"]["rag"]["revisit_truth"]) == 3
    if rep["plots"]:
        assert all(os.path.getsize(p) > 0 for p in rep["plots"])
    else:
        assert "matplotlib" in rep["plots_skipped"]


def test_selection_picks_the_best_validation_policy(report):
    rep, _ = report
    sel = rep["selection"]
    assert sel["seeds"] == [1000, 1001] and sel["metric"] == "revisit_truth"
    names = [c["policy"]["name"] for c in sel["candidates"]]
    assert names[0] == ev.REFERENCE.name and set(names) == {"mean/K6/R5/pos0", "mean/K3/R5/pos0"}
    best = min(sel["candidates"], key=lambda c: c["score"]["mean"])
    assert sel["chosen"] == best["policy"] == rep["config"]["modes"]["rag-best"]["policy"]
    if best["policy"]["name"] == ev.REFERENCE.name:        # the same policy: its test rollouts are rag's
        assert sel["same_as"] == "rag"
        assert rep["test"]["metrics"]["rag-best"] == rep["test"]["metrics"]["rag"]


def test_report_round_trips_through_json(report):
    rep, out = report
    text = json.dumps(rep)
    assert "NaN" not in text and json.loads(text) == rep
    assert ev.json_safe({"a": (1.0, float("nan"), np.float64(2.5), np.int64(3))}) == {"a": [1.0, None, 2.5, 3]}


@pytest.mark.parametrize("sampler", ["euler", "renoise"])
def test_modes_continue_the_same_prefix_with_the_same_noise(sampler):
    """Every mode starts from the clip's ground truth and the same noise (and re-noise): with a 1-block prefix the
    modes' blocks are identical, bit for bit, as long as their windows hold the same frames (window vs sink: until
    12 frames exist; rag vs sink: until 6 exist, rag's local part being 5 frames after the sink) and differ
    after."""
    model, cfg = tiny_model()
    setup = ev.Setup(model, cfg, prefix_blocks=1, steps=2, sampler=sampler, batch=2)
    out = {}
    for name, mode in ev.base_modes(cfg).items():
        (res, clips, _), = ev.rollouts(setup, mode, [0, 1], 5)
        out[name] = res.latents
        truth = torch.from_numpy(np.stack([frames[:3] for frames, _ in clips]))
        assert torch.equal(res.latents[:, :3], truth)
    same = lambda a, b, blk: torch.equal(out[a][:, 3 * blk:3 * blk + 3], out[b][:, 3 * blk:3 * blk + 3])  # noqa: E731
    assert [same("window", "sink", b) for b in range(1, 6)] == [True, True, True, False, False]
    assert [same("rag", "sink", b) for b in range(1, 6)] == [True, False, False, False, False]
    assert torch.equal(ev.seed_noise(3, 6, (4, 16, 16)), ev.seed_noise(3, 6, (4, 16, 16)))
    assert not torch.equal(ev.seed_noise(3, 6, (4, 16, 16)), ev.seed_noise(4, 6, (4, 16, 16)))


def test_window_mode_is_the_same_weights_without_a_sink():
    model, _ = tiny_model()
    assert ev.with_sink(model, 1) is model
    other = ev.with_sink(model, 0)
    assert other.cfg.sink == 0 and other.cfg.window == model.cfg.window
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in other.state_dict().items())


def record(seed, **metrics):
    curves = {name: [metrics.get(name, 0.0)] for name in ev.CURVES}
    return {"seed": seed, "period": 20, "metrics": metrics, "curves": curves}


def test_paired_differences_are_taken_per_seed():
    nan = float("nan")
    records = {"sink": [record(0, a=1.0), record(1, a=2.0), record(2, a=4.0), record(3, a=nan)],
               "rag": [record(0, a=0.5), record(1, a=3.0), record(2, a=nan), record(3, a=1.0)]}
    got = ev.summarise(records, "sink")
    p = got["paired"]["rag"]["a"]
    assert p["diffs"] == [-0.5, 1.0] and p["n"] == 2          # seeds 2 and 3 lack a value in one mode
    assert (p["mean"], p["low"], p["high"]) == bootstrap_ci([-0.5, 1.0], **ev.BOOTSTRAP)
    assert "sink" not in got["paired"]
    m = got["metrics"]["sink"]["a"]
    assert m["n"] == 3 and m["mean"] == pytest.approx(7 / 3) and m["values"][:3] == [1.0, 2.0, 4.0]
    assert got["curves"]["rag"]["revisit_truth"] == [0.0]
    with pytest.raises(ValueError, match="different seeds"):
        ev.summarise({"sink": [record(0, a=1.0)], "rag": [record(1, a=1.0)]}, "sink")


def test_an_oracle_rollout_scores_perfectly():
    """The ground-truth continuation, with a memory log that retrieves the block's own place one period earlier,
    through the same scoring and aggregation: every error 0, hit rate 1."""
    F, start, blocks = 3, 33, 14
    records = []
    for seed in (0, 1):
        frames, meta = make_clip(seed, start + blocks * F)
        P = meta.period
        log = [{"query_frame": s, "selected_global_frames": [[s - P, s + 1 - P]]} for s in range(18, len(frames), F)]
        records.append(ev.score(torch.from_numpy(frames), meta, start, F, 12, log, 0))
    got = ev.summarise({"oracle": records, "sink": records}, "sink")
    for name, v in got["metrics"]["oracle"].items():
        if name == "hit_rate":
            assert (v["mean"], v["low"], v["high"]) == (1.0, 1.0, 1.0)
        elif name != "hit_rate_chance" and v["n"]:
            assert v["mean"] == pytest.approx(0, abs=1e-12) and v["high"] == pytest.approx(0, abs=1e-12), name
    assert got["metrics"]["oracle"]["identity_truth"]["n"] == 2          # the clips have returns
    assert all(d == 0 for v in got["paired"]["oracle"].values() for d in v["diffs"])
    for name, curve in got["curves"]["oracle"].items():
        assert len(curve) == blocks
        assert all(c == pytest.approx(1.0 if name == "hit_rate" else 0.0, abs=1e-12) for c in curve if not
                   math.isnan(c)), name
    # the prefix blocks' retrievals are not counted: a log of misses there leaves the hit rate at 1
    frames, meta = make_clip(0, start + blocks * F)
    misses = [{"query_frame": 18, "selected_global_frames": [[1 + meta.period // 2]]}]
    log = misses + [{"query_frame": s, "selected_global_frames": [[s - meta.period]]} for s in range(start, 75, F)]
    assert ev.score(frames, meta, start, F, 12, log)["metrics"]["hit_rate"] == 1.0


def test_seed_sets_are_disjoint():
    test, val = ev.parse_seeds(ev.TEST_SEEDS, "--seeds"), ev.parse_seeds(ev.VAL_SEEDS, "--val-seeds")
    assert not set(test) & set(val) and len(test) == 20 and len(val) == 10
    assert val[0] == VAL_SEED and all(s < ev.RESERVED[0] for s in test)
    assert ev.parse_seeds("0-2, 7,9-10", "--seeds") == [0, 1, 2, 7, 9, 10]


def test_embedders():
    x = torch.randn(5, 4, 16, 16)
    assert ev.make_embedder("mean", 4, 16) is mean_descriptor
    key = ev.make_embedder("pool4", 4, 16)(x)
    assert key.shape == (5, 64)
    assert torch.allclose(key[:, ::16], x[:, :, :4, :4].mean(dim=(2, 3)), atol=1e-6)   # cell (0, 0) per channel
    for bad in ("pool0", "pool17", "median"):
        with pytest.raises(ValueError, match=bad):
            ev.make_embedder(bad, 4, 16)


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "5-3"], "--seeds must be seeds"),
    (["--seeds", "0-2,2"], "--seeds lists a seed twice"),
    (["--seeds", "1000-1003", "--val-seeds", "0-3"], "--seeds must not use 1000-1999"),
    (["--seeds", "0-3", "--val-seeds", "3-5"], "--seeds and --val-seeds must be disjoint"),
    (["--long-seed", "1001"], "--long-seed 1001 is a validation seed"),
    (["--modes", "sink,bogus"], "--modes must be distinct names"),
    (["--modes", "rag"], "--baseline 'sink' must be one of --modes"),
    (["--blocks", "0"], "--blocks must be >= 1"),
    (["--steps", "0"], "--steps must be in [1, 1000]"),
    (["--prefix-blocks", "0"], "--prefix-blocks must be >= 1"),
    (["--grid-k", "3,9"], "--grid-k values must be in [1, 8]"),
    (["--grid-k", "x"], "--grid-k must be a comma-separated list of int"),
    (["--grid-embedders", "mean,pool99"], "--grid-embedders: embedder 'pool99'"),
    (["--grid-positions", "middle"], "--grid-positions must be"),
])
def test_bad_options_are_refused_naming_the_option(weights, tmp_path, capsys, argv, message):
    assert ev.main(["--weights", weights, "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{ev.PROG}: error: {message}"), err
    assert not (tmp_path / "out").exists()


def test_the_lrag_command_and_file_errors(weights, tmp_path, capsys):
    assert cli.main(["eval", "--weights", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("lrag: error:") and not os.listdir(tmp_path)
    (tmp_path / "file").write_text("x")
    assert cli.main(["eval", "--weights", weights, "--out", str(tmp_path / "file")]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli.main(["eval", "--weights", str(tmp_path / "file"), "--out", str(tmp_path / "o")]) == 2
    assert "safetensors" in capsys.readouterr().err
