"""Hostile files for every checkpoint loader and every command that loads one.

Each loader x hostile file: the documented error (``InputFileError``, a ``ValueError``) naming the file, within a
timeout (a FIFO or /dev/zero must not block or be read), nothing unpickled beyond tensors (``weights_only``). The
commands (``lrag inspect``, ``lrag generate --checkpoint/--embedder``, ``lrag train-embedder --resume``) exit 2
with ``lrag: error: ...`` naming the option and the file, write nothing, and raise nothing else.
"""
from __future__ import annotations

import json
import os
import random
import stat
import struct
import threading

import pytest
import torch
from safetensors.torch import save_file

from conftest import fixture_path
from lrag import cli
from lrag.checkpoint import build_generator, check_generator, load_generator, normalize_keys
from lrag.ckpt_info import describe_checkpoint
from lrag.config import tiny_from_run_json
from lrag.models.wan import CausalWanModel
from lrag_ext.embedder.checkpoint import check_embedder, load_embedder, load_latent_ae
from lrag_ext.state_dicts import InputFileError, read_checkpoint

TIMEOUT_S = 20


class Evil:
    """Unpickling this would create the file ``marker``: weights_only must refuse it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _st_bytes(tensors: dict, tmp) -> bytes:
    path = os.path.join(tmp, "_valid.safetensors")
    save_file(tensors, path)
    data = open(path, "rb").read()
    os.remove(path)
    return data


def _past_eof(tmp) -> bytes:
    """A safetensors header whose (consistent) offsets point past the end of the file."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 16


def _generator_sd():
    return normalize_keys(torch.load(fixture_path("sf_tiny_ckpt.pt"), weights_only=True)["generator_ema"])


# name -> builder(path_without_suffix, tmp_path) -> the hostile path. Broken files: every loader refuses them.
def _broken_files():
    gen = open(fixture_path("sf_tiny_ckpt.pt"), "rb").read()
    rand = random.Random(0).randbytes(4096)

    def data(suffix, content):
        def make(tmp_path):
            path = tmp_path / f"hostile{suffix}"
            path.write_bytes(content(tmp_path) if callable(content) else content)
            return path
        return make

    def legacy_truncated(tmp_path):
        path = tmp_path / "legacy.pt"
        torch.save({"w": torch.zeros(64)}, path, _use_new_zipfile_serialization=False)
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) // 2])
        return path

    def evil(zip_format):
        def make(tmp_path):
            path = tmp_path / "evil.pt"
            torch.save({"model": {"w": torch.zeros(1)}, "config": Evil(tmp_path / "PWNED")}, path,
                       _use_new_zipfile_serialization=zip_format)
            return path
        return make

    def non_dict(tmp_path):
        path = tmp_path / "list.pt"
        torch.save([torch.zeros(2), "text"], path)
        return path

    def directory(tmp_path):
        path = tmp_path / "dir.pt"
        path.mkdir()
        return path

    def fifo(tmp_path):
        path = tmp_path / "fifo.pt"
        os.mkfifo(path)
        return path

    def dev_zero(tmp_path):
        path = tmp_path / "zero.safetensors"
        path.symlink_to("/dev/zero")
        return path

    def st(cut):
        return data(".safetensors", lambda tmp: _st_bytes({"a": torch.zeros(8), "b": torch.ones(4, 4)}, tmp)[:cut])

    return {
        "empty": data(".pt", b""),
        "pt_truncated_10_bytes": data(".pt", gen[:10]),
        "pt_truncated_half": data(".pt", gen[:len(gen) // 2]),
        "pt_truncated_last_byte": data(".pt", gen[:-1]),
        "legacy_pt_truncated": legacy_truncated,
        "st_truncated_in_length": st(5),
        "st_truncated_in_header": st(40),
        "st_truncated_in_data": st(-7),
        "st_header_past_eof": data(".safetensors", _past_eof),
        "random_bytes_pt": data(".pt", rand),
        "random_bytes_safetensors": data(".safetensors", rand),
        "pickle_of_objects_zip": evil(True),
        "pickle_of_objects_legacy": evil(False),
        "not_a_dict": non_dict,
        "json_pt": data(".pt", json.dumps({"model": {"w": [1, 2]}, "config": {}}).encode()),
        "json_safetensors": data(".safetensors", json.dumps({"model": {"w": [1, 2]}}).encode()),
        "directory": directory,
        "fifo": fifo,
        "dev_zero_symlink": dev_zero,
    }


def _content_files():
    """Well-formed checkpoints with the wrong content for the model loaders."""
    def wrong_keys(suffix):
        def make(tmp_path):
            path = tmp_path / f"keys{suffix}"
            tensors = {"foo.weight": torch.zeros(3), "bar": torch.ones(2, 2)}
            if suffix == ".pt":
                torch.save(tensors, path)
            else:
                save_file(tensors, str(path))
            return path
        return make

    def generator_bad_shape(tmp_path):
        sd = _generator_sd()
        sd["blocks.1.ffn.2.bias"] = torch.zeros(5)
        path = tmp_path / "gen_bad_shape.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path

    def generator_missing_key(tmp_path):
        sd = _generator_sd()
        del sd["blocks.1.self_attn.norm_k.weight"]
        path = tmp_path / "gen_missing_key.pt"
        torch.save({"generator_ema": sd}, path)
        return path

    def embedder_bad_shape(tmp_path):
        ck = torch.load(fixture_path("ae_tiny_ckpt.pt"), weights_only=True)
        ck["model"]["encoder.fc.bias"] = torch.zeros(3)
        path = tmp_path / "ae_bad_shape.pt"
        torch.save(ck, path)
        return path

    def generator_sparse_blocks(tmp_path):
        """A block index of 10^9: building that model (even on the meta device) would never end."""
        sd = _generator_sd()
        sd["blocks.999999999.ffn.0.bias"] = torch.zeros(1)
        path = tmp_path / "gen_sparse.pt"
        torch.save(sd, path)
        return path

    def embedder_deep_config(tmp_path):
        """A config of 10^5 stages for a tiny state dict."""
        path = tmp_path / "ae_deep.pt"
        torch.save({"model": {"encoder.fc.weight": torch.zeros(2, 2)}, "config": {"hidden_dims": [8] * 100_000}}, path)
        return path

    return {"wrong_keys_pt": wrong_keys(".pt"), "wrong_keys_safetensors": wrong_keys(".safetensors"),
            "generator_bad_shape": generator_bad_shape, "generator_missing_key": generator_missing_key,
            "generator_sparse_blocks": generator_sparse_blocks, "embedder_bad_shape": embedder_bad_shape,
            "embedder_deep_config": embedder_deep_config}


BROKEN = _broken_files()
CONTENT = _content_files()
# what the error says after "'<path>': " for each broken file
REASON = {"empty": "the file is empty (0 bytes)",
          "pt_truncated_10_bytes": "cannot be read as a PyTorch checkpoint: truncated",
          "pt_truncated_half": "cannot be read as a PyTorch checkpoint: truncated",
          "pt_truncated_last_byte": "cannot be read as a PyTorch checkpoint: truncated",
          "legacy_pt_truncated": "cannot be read as a PyTorch checkpoint: truncated",
          "st_truncated_in_length": "truncated: 5 bytes, shorter than the 8-byte length of a safetensors header",
          "st_truncated_in_header": "truncated: the safetensors header is ",
          "st_truncated_in_data": "truncated: tensor 'b' ends at byte 96 of the data, but the file holds only 89",
          "st_header_past_eof": "truncated: tensor 'w' ends at byte 4000 of the data, but the file holds only 16",
          "random_bytes_pt": "not a PyTorch or safetensors checkpoint",
          "random_bytes_safetensors": "not a safetensors file",
          "pickle_of_objects_zip": "holds pickled objects other than tensors",
          "pickle_of_objects_legacy": "holds pickled objects other than tensors",
          "not_a_dict": "holds a list, not a dict of tensors",
          "json_pt": "not a PyTorch or safetensors checkpoint",
          "json_safetensors": "not a safetensors file",
          "directory": "a directory, not a regular file",
          "fifo": "a FIFO (named pipe), not a regular file",
          "dev_zero_symlink": "a character device, not a regular file"}


@pytest.fixture(scope="module")
def cfg():
    return tiny_from_run_json(fixture_path("sf_tiny_run.json"))


def _loaders(cfg):
    return {
        "read_checkpoint": read_checkpoint,
        "read_checkpoint_lazy": lambda p: read_checkpoint(p, lazy=True),
        "load_generator": lambda p: load_generator(CausalWanModel(cfg), p),
        "build_generator": lambda p: build_generator(cfg, p),
        "check_generator": lambda p: check_generator(cfg, p),
        "load_embedder": load_embedder,
        "load_latent_ae": load_latent_ae,
        "check_embedder": check_embedder,
        "describe_checkpoint": describe_checkpoint,
    }


LOADERS = ["read_checkpoint", "read_checkpoint_lazy", "load_generator", "build_generator", "check_generator",
           "load_embedder", "load_latent_ae", "check_embedder", "describe_checkpoint"]
# the content files a loader accepts: a generic reader reads any well-formed file; inspect describes a state dict
# it does not know as "unknown" (test_readers_accept_well_formed_files)
ACCEPTS = {"read_checkpoint": set(CONTENT), "read_checkpoint_lazy": set(CONTENT),
           "describe_checkpoint": {"wrong_keys_pt", "wrong_keys_safetensors", "embedder_deep_config"}}
REFUSED_CONTENT = [(loader, hostile) for loader in LOADERS for hostile in sorted(CONTENT)
                   if hostile not in ACCEPTS.get(loader, ())]


def _in_thread(fn, path):
    """``fn()`` in a thread, joined with a timeout: returns ``(result, exception)``; fails if it blocks."""
    out = {}

    def target():
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    if thread.is_alive():
        if path and os.path.exists(path) and stat.S_ISFIFO(os.stat(path).st_mode):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))      # end the read the loader is blocked in
        pytest.fail(f"loading {path} did not return within {TIMEOUT_S} s")
    return out.get("result"), out.get("error")


def _assert_refused(error, path, tmp_path):
    assert not (tmp_path / "PWNED").exists(), "a pickled object was executed"
    assert isinstance(error, InputFileError), f"{type(error).__name__}: {error}"
    assert isinstance(error, ValueError) and str(error).startswith(f"checkpoint '{path}': ") and error.path == str(path)


@pytest.mark.parametrize("hostile", sorted(BROKEN))
@pytest.mark.parametrize("loader", LOADERS)
def test_loaders_refuse_broken_files(loader, hostile, cfg, tmp_path):
    path = BROKEN[hostile](tmp_path)
    _, error = _in_thread(lambda: _loaders(cfg)[loader](path), path)
    _assert_refused(error, path, tmp_path)
    assert error.reason.startswith(REASON[hostile]), error.reason


@pytest.mark.parametrize("loader, hostile", REFUSED_CONTENT)
def test_loaders_refuse_wrong_content(loader, hostile, cfg, tmp_path):
    path = CONTENT[hostile](tmp_path)
    _, error = _in_thread(lambda: _loaders(cfg)[loader](path), path)
    _assert_refused(error, path, tmp_path)


def test_readers_accept_well_formed_files(cfg, tmp_path):
    """The other side of the matrix: the generic readers read any well-formed checkpoint, and inspect describes
    a state dict it does not know (a guard, not a regression test)."""
    for loader, accepted in ACCEPTS.items():
        for hostile in accepted:
            result = _loaders(cfg)[loader](CONTENT[hostile](tmp_path))
            assert isinstance(result, dict) and (loader != "describe_checkpoint" or result["kind"].startswith("unknown"))


def test_missing_file_is_named(cfg, tmp_path):
    path = tmp_path / "nope.pt"
    for name, loader in _loaders(cfg).items():
        with pytest.raises(FileNotFoundError, match="does not exist") as info:
            loader(path)
        assert str(path) in str(info.value), name


# ---------------------------------------------------------------------------------------------------------------
# the commands
def _cli(argv, capsys, path=None) -> str:
    """Runs ``lrag argv`` in-process: it must exit 2 (SystemExit or return value) and print one ``lrag: error``
    line; any other exception fails the test (it would be a traceback)."""
    def run():
        try:
            return cli.main(argv)
        except SystemExit as e:
            return e.code

    code, error = _in_thread(run, path or "")
    assert error is None, f"{type(error).__name__}: {error}"
    err = capsys.readouterr().err
    assert code == 2, err
    assert "lrag: error: " in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    from test_cli import fake_wan_dir
    return fake_wan_dir(tmp_path_factory.mktemp("wan"))


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    folder = tmp_path_factory.mktemp("latents")
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        torch.save(torch.randn(10, 4, 8, 8, generator=gen), folder / f"v{i}.pt")
    return folder


COMMANDS = ["inspect", "generate_checkpoint", "generate_embedder", "train_embedder_resume"]


def _command(name, path, tmp_path, wan, latents):
    out = str(tmp_path / "out")
    real = ["generate", "--backbone", "self-forcing", "--wan-dir", str(wan), "--prompt", "a cat", "--num-heads", "2",
            "--height", "64", "--width", "64", "--text-len", "16", "--device", "cpu", "--seconds", "3", "--out", out,
            "--quiet"]
    return {"inspect": (["inspect", str(path)], None),
            "generate_checkpoint": (real + ["--checkpoint", str(path)], "--checkpoint"),
            "generate_embedder": (real + ["--checkpoint", fixture_path("sf_tiny_ckpt.pt"), "--embedder", str(path)],
                                  "--embedder"),
            "train_embedder_resume": (["train-embedder", "--data", str(latents), "--out", out, "--hidden-dims", "8",
                                       "--latent-dim", "8", "--epochs", "2", "--quiet", "--resume", str(path)],
                                      "--resume")}[name]


@pytest.mark.parametrize("command, hostile", [(c, h) for c in COMMANDS for h in sorted(BROKEN) + sorted(CONTENT)
                                               if not (c == "inspect" and h in ACCEPTS["describe_checkpoint"])])
def test_commands_refuse_hostile_files(command, hostile, tmp_path, wan, latents, capsys, monkeypatch):
    from lrag import runner
    monkeypatch.setattr(runner, "_real_setup", lambda *a, **k: pytest.fail("not refused by the up-front checks"))
    path = (BROKEN.get(hostile) or CONTENT[hostile])(tmp_path)
    argv, option = _command(command, path, tmp_path, wan, latents)
    err = _cli(argv, capsys, path)
    assert not (tmp_path / "PWNED").exists()
    assert err.startswith(f"lrag: error: {option or 'checkpoint'} '{path}'"), err
    if hostile in REASON:
        assert f"'{path}': {REASON[hostile]}" in err, err
    assert not (tmp_path / "out").exists()              # nothing written
