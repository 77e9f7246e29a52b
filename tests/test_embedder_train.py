"""python -m lrag_ext.embedder.train on tiny synthetic latents: loss decreases, checkpoints round-trip, resume."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lrag_ext.embedder import LatentAE, PooledEmbedder, load_embedder
from lrag_ext.embedder.train import main, parse_args, train

safetensors_torch = pytest.importorskip("safetensors.torch")


def smooth_video(frames, gen, c=4, h=8, w=8):
    """Temporally correlated smooth random fields [F, C, H, W]."""
    base = torch.nn.functional.avg_pool2d(torch.randn(frames + 4, c, h + 2, w + 2, generator=gen), 3, 1)
    return torch.stack([base[t:t + 4].mean(0) for t in range(frames)]) * 3


@pytest.fixture()
def data(tmp_path):
    gen = torch.Generator().manual_seed(0)
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(5):
        v = smooth_video(20, gen)
        if i % 2:
            safetensors_torch.save_file({"latents": v}, str(folder / f"v{i}.safetensors"))
        else:
            torch.save(v, folder / f"v{i}.pt")
    return folder


def run(data, out, *extra):
    args = parse_args(["--data", str(data), "--out", str(out), "--hidden-dims", "8,16", "--latent-dim", "16",
                       "--batch-size", "4", "--lr", "3e-3", "--seed", "1", "--quiet", *extra])
    return train(args)


def test_train_ae_loss_decreases_and_roundtrip(data, tmp_path):
    out = tmp_path / "run"
    res = run(data, out, "--epochs", "6", "--chunks-per-video", "4")
    totals = [r["train"]["total"] for r in res["log"]]
    assert totals[-1] < totals[0]
    ck = torch.load(out / "ae_epoch_best.pt", weights_only=True)
    assert sorted(ck) == sorted(["epoch", "model", "optimizer", "scaler", "config", "val_loss"])
    assert ck["epoch"] == res["best_epoch"] and ck["val_loss"] == pytest.approx(res["best_val"])
    model = load_embedder(out / "ae_epoch_best.pt")
    assert isinstance(model, LatentAE) and model.config.hidden_dims == [8, 16]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ck["model"].values()))
    log = json.load(open(out / "log.json"))
    assert len(log["epochs"]) == 6 and len(log["val_files"]) == 1 and len(log["train_files"]) == 4
    assert set(log["epochs"][0]["train"]) == {"total", "rec", "delta", "smooth"}
    frames = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(model.embed(frames), model.encode(frames), rtol=1e-5, atol=1e-6)


def test_resume_continues(data, tmp_path):
    out = tmp_path / "run"
    run(data, out, "--epochs", "2", "--chunks-per-video", "2")
    first = torch.load(out / "last.pt", weights_only=True)
    res = run(data, out, "--epochs", "4", "--chunks-per-video", "2", "--resume", str(out / "last.pt"))
    assert [r["epoch"] for r in res["log"]] == [0, 1, 2, 3]
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 3
    assert not torch.equal(last["model"]["encoder.fc.weight"], first["model"]["encoder.fc.weight"])
    assert last["optimizer"]["state"][0]["step"] > first["optimizer"]["state"][0]["step"]


def test_train_pooled(data, tmp_path):
    out = tmp_path / "pooled"
    res = run(data, out, "--encoder", "pooled", "--grid", "2", "--epochs", "5", "--chunks-per-video", "4")
    assert res["log"][-1]["train"]["total"] < res["log"][0]["train"]["total"]
    assert res["log"][0]["train"]["rec"] == 0.0
    model = load_embedder(out / "ae_epoch_best.pt")
    assert isinstance(model, PooledEmbedder) and model.config.grid == 2
    frames = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(model.embed(frames), model.encode(frames), rtol=1e-5, atol=1e-6)


def test_data_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--data", str(empty), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "holds no .pt or .safetensors" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(torch.randn(20, 4, 8, 8), bad / "a.pt")
    torch.save(torch.randn(4, 8, 8), bad / "b.pt")
    assert main(["--data", str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "b.pt" in err and "expected a float tensor [F, C, H, W]" in err
    os.remove(bad / "b.pt")
    (bad / "c.pt").write_bytes(b"not a checkpoint")
    assert main(["--data", str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "c.pt: cannot be read" in capsys.readouterr().err
    os.remove(bad / "c.pt")
    torch.save(torch.randn(5, 4, 8, 8), bad / "short.pt")
    assert main(["--data", str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "short.pt: has 5 frames, fewer than the chunk length 8" in capsys.readouterr().err
    os.remove(bad / "short.pt")
    torch.save(torch.randn(20, 4, 8, 6), bad / "narrow.pt")
    assert main(["--data", str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "narrow.pt: frame shape (4, 8, 6) differs" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_entry_point(data, tmp_path):
    """`python -m lrag_ext.embedder.train` runs as a program, prints progress to stderr and writes its outputs."""
    import subprocess
    import sys
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "lrag_ext.embedder.train", "--data", str(data), "--out", str(out),
                           "--encoder", "pooled", "--grid", "2", "--epochs", "1", "--batch-size", "4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "[epoch 1/1] |" in proc.stderr and "delta" in proc.stderr and "smooth" in proc.stderr
    assert sorted(os.listdir(out)) == ["ae_epoch_best.pt", "last.pt", "log.json"]


# ---------------------------------------------------------------------------------------------------------------
# every option is checked before anything is trained or written
def _refused(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m lrag_ext.embedder.train: error: ") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--latent-dim", "0"], "--latent-dim must be >= 1, got 0"),
    (["--val-split", "2"], "--val-split must be in [0, 1)"),
    (["--val-split", "-0.1"], "--val-split must be in [0, 1)"),
    (["--val-split", "nan"], "--val-split must be in [0, 1)"),
    (["--encoder", "pooled", "--grid", "9"], "--grid must be <= 8, the smaller side of the 8 x 8 latents"),
    (["--grid", "0"], "--grid must be >= 1"),
    (["--seq-len", "1"], "--seq-len must be >= 2"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--chunks-per-video", "-1"], "--chunks-per-video must be >= 0"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--grad-clip", "0"], "--grad-clip must be > 0"),
    (["--delta-margin", "1.5"], "--delta-margin must be in [-1, 1)"),
    (["--delta-window", "0"], "--delta-window must be >= 1"),
    (["--delta-weight", "inf"], "--delta-weight must be a finite number >= 0"),
    (["--smooth-weight", "nan"], "--smooth-weight must be a finite number >= 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**63)"),
    (["--hidden-dims", "8,abc"], "--hidden-dims must be comma-separated positive widths"),
    (["--hidden-dims", "8,0"], "--hidden-dims must be comma-separated positive widths"),
    (["--device", "bogus"], "--device 'bogus' is not a device"),
    (["--encoder", "pooled", "--delta-weight", "0", "--smooth-weight", "0"], "leave the pooled embedder no loss"),
])
def test_option_errors(data, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    err = _refused(["--data", str(data), "--out", str(out), "--quiet", "--epochs", "2", "--hidden-dims", "8",
                    "--latent-dim", "8", *extra], capsys)
    assert message in err
    assert not out.exists()


def test_path_errors(data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert f"--out '{blocker}' exists and is not a directory" in _refused(
        ["--data", str(data), "--out", str(blocker)], capsys)
    assert f"--out '{blocker / 'run'}' cannot be created" in _refused(
        ["--data", str(data), "--out", str(blocker / "run")], capsys)
    assert f"--data '{blocker}' does not exist or is not a folder" in _refused(
        ["--data", str(blocker), "--out", str(tmp_path / "o")], capsys)
    assert f"--resume '{tmp_path / 'nope.pt'}' does not exist" in _refused(
        ["--data", str(data), "--out", str(tmp_path / "o"), "--resume", str(tmp_path / "nope.pt")], capsys)
    assert not (tmp_path / "o").exists()


def test_fifo_in_the_data_folder_does_not_block(data, tmp_path, capsys):
    import threading
    fifo = data / "stream.pt"
    os.mkfifo(fifo)
    result = {}
    thread = threading.Thread(target=lambda: result.update(rc=main(["--data", str(data), "--out",
                                                                     str(tmp_path / "o"), "--quiet"])), daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))      # release the blocked reader
        pytest.fail("training opened the FIFO and blocked")
    assert result["rc"] == 2
    assert f"latent file '{fifo}': a FIFO (named pipe), not a regular file" in capsys.readouterr().err


def test_resume_errors(data, tmp_path, capsys):
    out = tmp_path / "run"
    run(data, out, "--epochs", "1", "--chunks-per-video", "1")
    last = str(out / "last.pt")
    before = sorted(os.listdir(out))
    base = ["--data", str(data), "--out", str(out), "--hidden-dims", "8,16", "--latent-dim", "16", "--quiet",
            "--resume", last]
    assert "--epochs 1: the --resume checkpoint has already finished epoch 1, nothing is left to train" in _refused(
        base + ["--epochs", "1"], capsys)
    assert f"--resume '{last}': a 'ae' embedder, not --encoder 'pooled'" in _refused(
        base + ["--encoder", "pooled"], capsys)
    other = tmp_path / "other"
    other.mkdir()
    torch.save(smooth_video(20, torch.Generator().manual_seed(1), h=6, w=6), other / "a.pt")
    assert f"--resume '{last}': trained on 8 x 8 latents, the data's are 6 x 6" in _refused(
        ["--data", str(other), "--out", str(out), "--resume", last], capsys)
    ck = torch.load(last, weights_only=True)
    ck["optimizer"] = {"state": {}, "param_groups": []}
    bad = tmp_path / "bad_opt.pt"
    torch.save(ck, bad)
    assert f"--resume '{bad}': " in _refused(["--data", str(data), "--out", str(out), "--resume", str(bad)], capsys)
    ck = torch.load(last, weights_only=True)  # moments of the wrong shape: used to fail at the first step
    first = next(iter(ck["optimizer"]["state"]))
    ck["optimizer"]["state"][first]["exp_avg"] = torch.zeros(3)
    torch.save(ck, bad)
    assert "optimizer state 'exp_avg' has shape [3]" in _refused(
        ["--data", str(data), "--out", str(out), "--resume", str(bad), "--epochs", "2"] + base[4:8], capsys)
    assert sorted(os.listdir(out)) == before


def test_load_latent_video_refuses_special_files_without_blocking(tmp_path):
    """The data loader itself (not only the trainer's option checks) refuses a FIFO, a device and an empty file."""
    from lrag_ext.embedder.data import DataError, load_latent_video

    fifo = tmp_path / "v.pt"
    os.mkfifo(fifo)
    zero = tmp_path / "z.pt"
    os.symlink("/dev/zero", zero)
    empty = tmp_path / "e.pt"
    empty.write_bytes(b"")
    for path, reason in ((fifo, "FIFO"), (zero, "character device"), (empty, "empty")):
        with pytest.raises(DataError, match=reason):
            load_latent_video(str(path))
