"""The toy world's retrieval embedder (lrag.toy.embedder) and the key quality measurement (lrag.toy.keys): the
training data's determinism and seeds, a training smoke run through the library trainer, refusals, the hit rate
on hand-made cases, and the shipped weights against their card. Seconds on one core; nothing is timed."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")

from lrag import cli  # noqa: E402
from lrag.toy import embedder as toy_emb  # noqa: E402
from lrag.toy.keys import Schedule, corrupt, hit_rates, oracle_hit_rate, retrieve  # noqa: E402
from lrag.toy.metrics import retrieval_hit_rate  # noqa: E402
from lrag.toy.shipped import WEIGHTS_DIR  # noqa: E402
from lrag.toy.world import make_clip  # noqa: E402
from lrag_ext.embedder import load_embedder  # noqa: E402
from lrag_ext.memory_format import sha256_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SHIPPED = os.path.join(WEIGHTS_DIR, toy_emb.WEIGHTS_NAME)
SHIPPED_CARD = os.path.join(WEIGHTS_DIR, toy_emb.CARD_NAME)
SMALL = ["--clips", "3", "--frames", "40", "--epochs", "4", "--batch-size", "8", "--eval-seeds", "2", "--quiet"]


def _files(folder):
    return {f: sha256_file(os.path.join(folder, f)) for f in sorted(os.listdir(folder))}


# ------------------------------------------------------------------------------------------------- data
def test_training_clips_are_deterministic_and_never_evaluation_seeds(tmp_path):
    seeds = toy_emb.clip_seeds(0, 500)
    assert seeds == toy_emb.clip_seeds(0, 500) and len(set(seeds)) == 500
    assert min(seeds) >= toy_emb.SEED_MIN >= 2000            # 0-999 test, 1000-1999 validation / probes
    assert toy_emb.clip_seeds(1, 3) != seeds[:3]
    paths = toy_emb.write_clips(str(tmp_path / "a"), seeds[:3], 35)
    toy_emb.write_clips(str(tmp_path / "b"), seeds[:3], 35)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")  # the same bytes
    from safetensors.torch import load_file
    for path, seed in zip(paths, seeds):
        assert np.array_equal(load_file(path)["latents"].numpy(), make_clip(seed, 35)[0])
    manifest = json.loads((tmp_path / "a" / toy_emb.MANIFEST).read_text())
    assert manifest["seeds"] == seeds[:3] and manifest["frames"] == 35


# ------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("encoder", ["ae", "pooled"])
def test_training_smoke_loss_decreases_and_the_export_embeds_frames(tmp_path, encoder):
    out = tmp_path / "run"
    argv = ["--out", str(out), "--encoder", encoder, "--hidden-dims", "8,16", "--latent-dim", "16", "--lr", "3e-3",
            *SMALL]
    assert toy_emb.main(argv) == 0
    log = json.loads((out / "log.json").read_text())
    totals = [e["train"]["total"] for e in log["epochs"]]
    assert len(totals) == 4 and totals[-1] < totals[0]
    assert log["config"]["delta_margin"] == 0.85 and log["config"]["delta_window"] == 3
    assert log["config"]["seq_len"] == 8 and log["config"]["smooth_weight"] == 1.0
    assert len(log["train_files"]) + len(log["val_files"]) == 3 and log["val_files"]
    model = load_embedder(str(out / toy_emb.WEIGHTS_NAME))
    assert model.config.in_channels == 4 and model.config.latent_dim == 16
    frames = torch.from_numpy(make_clip(1234, 10)[0])
    keys = model.embed(frames)
    assert keys.shape == (10, 16) and torch.isfinite(keys).all()
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(10))
    card = json.loads((out / toy_emb.CARD_NAME).read_text())
    assert card["sha256"] == sha256_file(str(out / toy_emb.WEIGHTS_NAME))
    assert set(card["hit_rates"]["hit_rate"]) == {"mean", "pool4", "embedder"}
    assert card["hit_rates"]["seeds"] == [1000, 1001]
    for row in card["hit_rates"]["hit_rate"].values():
        assert set(row) == set(toy_emb.CARD_CORRUPTIONS) and all(0 <= v <= 1 for v in row.values())
    assert json.loads((out / "data" / toy_emb.MANIFEST).read_text())["seeds"] == toy_emb.clip_seeds(0, 3)


def test_the_same_command_gives_the_same_weights(tmp_path):
    argv = ["--encoder", "pooled", "--latent-dim", "8", *SMALL, "--eval-seeds", "0", "--epochs", "2"]
    for name in ("a", "b"):
        assert toy_emb.main(["--out", str(tmp_path / name), *argv]) == 0
    assert sha256_file(str(tmp_path / "a" / toy_emb.WEIGHTS_NAME)) == sha256_file(str(tmp_path / "b" /
                                                                                      toy_emb.WEIGHTS_NAME))


@pytest.mark.parametrize("argv, fragment", [
    (["--clips", "1"], "--clips"),
    (["--frames", "20"], "--frames"),
    (["--grid", "17"], "--grid"),
    (["--epochs", "0"], "--epochs"),
    (["--threads", "-1"], "--threads"),
    (["--eval-seeds", "1001"], "--eval-seeds"),
])
def test_refusals_exit_2_naming_the_option_and_write_nothing(tmp_path, capsys, argv, fragment):
    out = tmp_path / "run"
    assert toy_emb.main(["--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{toy_emb.PROG}: error:") and fragment in err
    assert not out.exists()


def test_data_option_and_unknown_options_are_refused(tmp_path, capsys):
    for argv in (["--data", str(tmp_path)], ["--no-such-option"]):
        with pytest.raises(SystemExit) as e:
            toy_emb.main(["--out", str(tmp_path / "run"), *argv])
        assert e.value.code == 2
    assert not (tmp_path / "run").exists()


def test_cli_subcommand(tmp_path, capsys):
    assert cli.main(["train-toy-embedder", "--out", str(tmp_path / "run"), "--clips", "1"]) == 2
    assert capsys.readouterr().err.startswith("lrag: error: --clips")


# ------------------------------------------------------------------------------------------------- hit rate
def test_candidates_follow_the_reference_schedule():
    sched = Schedule()
    assert sched.block_starts()[0] == 33 and sched.block_starts()[-1] == 150 and len(sched.block_starts()) == 40
    assert sched.candidates(33) == (1, 17)                    # 16 candidates at the first generated block
    keys = torch.randn(153, 8, generator=torch.Generator().manual_seed(0))
    starts, retrieved = retrieve(keys, sched)
    assert starts == sched.block_starts()
    for s, ids in zip(starts, retrieved):
        lo, hi = sched.candidates(s)
        assert len(ids) == 6 and all(lo <= g < hi for g in ids)
    # fewer candidates than K: all of them; none: nothing
    starts, retrieved = retrieve(keys, Schedule(first_block=18, num_frames=24))
    assert starts == [18, 21] and [sorted(ids) for ids in retrieved] == [[1], [1, 2, 3, 4]]
    assert retrieve(keys, Schedule(first_block=15, num_frames=18))[1] == [[]]


def test_exact_frame_key_with_one_neighbour_always_hits():
    """Every frame of a world clip equals the frame one period earlier (and no other): the exact frame as key and
    K = 1 retrieve that copy, whose phase is the query's, s - 1: a hit (tolerance 1) for every block."""
    sched = Schedule(top_k=1)
    result = hit_rates(lambda x: x.flatten(1), seeds=[1000, 1001, 1002], schedule=sched)
    assert result["hit_rate"] == 1.0 and result["per_clip"] == [1.0, 1.0, 1.0]
    assert result["oracle"] == 1.0 and result["phase_key"] == 1.0


def test_a_constant_key_ties_and_takes_the_oldest_candidates():
    """A constant key scores every candidate the same; ties go to the lower frame id (cosine_topk), so each block
    retrieves the K oldest candidates, frames 1..6, whatever the block: its hit rate is that of this fixed set."""
    sched = Schedule()
    seeds = [1000, 1001]
    result = hit_rates(lambda x: torch.ones(x.shape[0], 3), seeds=seeds, schedule=sched)
    expected = []
    for seed in seeds:
        _, meta = make_clip(seed, sched.num_frames)
        starts = sched.block_starts()
        expected.append(retrieval_hit_rate(meta, starts, [list(range(1, 7))] * len(starts)))
    assert result["per_clip"] == expected
    assert result["hit_rate"] == pytest.approx(np.mean(expected))


def test_oracle_counts_the_blocks_hit_candidates():
    # P = 30 (a seed chosen for it), one block at s = 33: frames 33..35 have phases 3..5, within 1: phases 2..6;
    # the candidates [1, 17) hold 5 of them (frames 2..6), and K = 6 of the 16 are retrieved: at best 5 of 6
    seed = next(s for s in range(1000, 1100) if make_clip(s, 1)[1].period == 30)
    _, meta = make_clip(seed, 153)
    assert oracle_hit_rate(meta, Schedule(num_frames=36)) == pytest.approx(5 / 6)
    # in general: per block, min(k, candidates that are hits one by one) / k
    sched = Schedule()
    hits = total = 0
    for s in sched.block_starts():
        ids = range(*sched.candidates(s))
        good = sum(retrieval_hit_rate(meta, [s], [[g]]) == 1.0 for g in ids)
        hits, total = hits + min(6, good), total + min(6, len(ids))
    assert oracle_hit_rate(meta, sched) == pytest.approx(hits / total)


def test_corruptions_are_seeded_and_named():
    x = torch.from_numpy(make_clip(1000, 4)[0])
    assert corrupt(x, "truth", 0) is x
    torch.testing.assert_close(corrupt(x, "noise0.5", 3), corrupt(x, "noise0.5", 3))
    assert not torch.equal(corrupt(x, "noise0.5", 3), corrupt(x, "noise0.5", 4))
    assert (corrupt(x, "noise1", 3) - x).std() == pytest.approx(1.0, abs=0.05)
    blurred = corrupt(x, "blur3", 0)
    torch.testing.assert_close(blurred[:, :, 5, 5], x[:, :, 4:7, 4:7].mean(dim=(2, 3)))
    shifted = corrupt(x, "shift2", 0)
    assert shifted.shape == x.shape
    assert corrupt(x, "blur3+noise0.5", 1).shape == x.shape
    for bad in ("noise", "blur4", "fog1", "truth+"):
        with pytest.raises(ValueError, match="corruption"):
            corrupt(x, bad, 0)


# ------------------------------------------------------------------------------------------------- shipped weights
@pytest.mark.skipif(not os.path.exists(SHIPPED_CARD), reason="no toy embedder shipped")
def test_shipped_embedder_matches_its_card():
    card = json.loads(open(SHIPPED_CARD).read())
    path = os.path.join(WEIGHTS_DIR, card["weights"])
    assert sha256_file(path) == card["sha256"] and os.path.getsize(path) == card["bytes"] < 2 ** 20
    model = load_embedder(path)
    assert model.config.to_dict() == card["config"]
    keys = model.embed(torch.from_numpy(make_clip(1000, 12)[0]))
    assert torch.isfinite(keys).all()
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(12))
    # its hit rate on the ground truth, as the card reports it (deterministic: no noise in "truth")
    table = card["hit_rates"]
    assert hit_rates(model.embed, seeds=table["seeds"])["hit_rate"] == pytest.approx(
        table["hit_rate"]["embedder"]["truth"], abs=1e-9)
