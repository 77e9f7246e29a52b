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
    assert "epoch 1/1 [" in proc.stderr and "delta" in proc.stderr and "smooth" in proc.stderr
    assert sorted(os.listdir(out)) == ["ae_epoch_best.pt", "last.pt", "log.json"]
