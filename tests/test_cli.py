"""The ``lrag`` command end to end: interruption (on the built-in demo), ``inspect``, every user error, and the
real-checkpoint path with a tiny umT5 encoder, tokenizer and Wan VAE saved as a Diffusers-layout folder. The demo
itself (the shipped toy generator) is tested in test_toy_demo.py."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import cli_error, fixture_path, read_video

pytest.importorskip("imageio_ffmpeg")
pytest.importorskip("matplotlib")

from lrag import cli  # noqa: E402
from lrag.ckpt_info import describe_checkpoint, infer_geometry  # noqa: E402
from lrag.checkpoint import normalize_keys  # noqa: E402
from lrag.generate import blocks_for_seconds  # noqa: E402
from lrag.video import count_frames  # noqa: E402

DEMO_BLOCKS = 8             # the real runs' blocks: retrieval at blocks 6 and 7 (window 12, sink 1, R 5)
DEMO = ["generate", "--demo", "--seconds", "1.5", "--quiet"]     # the toy demo: 11 prefix + 2 generated blocks


pytestmark = pytest.mark.usefixtures("one_thread")


def test_timeline_strip_colours():
    from lrag.demo import COLOURS, STRIP_HEIGHT, timeline_strip
    # block 7 of a 10-block video (30 latent frames, 3 px each): rag window = sink + the last 5 frames
    strip = timeline_strip(90, 30, start=21, frames=3, sink=1, local=5, retrieved=[4, 2])
    assert strip.shape == (STRIP_HEIGHT, 90, 3) and not strip[:2].any()
    assert [f for f in range(30) if tuple(strip[8, 3 * f]) == COLOURS["window"]] == [0, 19, 20]
    assert [f for f in range(30) if tuple(strip[8, 3 * f]) == COLOURS["retrieved"]] == [2, 4]
    assert [f for f in range(30) if tuple(strip[8, 3 * f]) == COLOURS["block"]] == [21, 22, 23]
    assert [f for f in range(30) if tuple(strip[8, 3 * f]) == COLOURS["empty"]] == list(range(24, 30))
    assert tuple(strip[8, 3 * 10]) == COLOURS["past"]


def test_seconds_round_up_to_whole_blocks():
    assert blocks_for_seconds(30, 3) == 40
    assert blocks_for_seconds(0.75, 3) == 1
    assert blocks_for_seconds(0.76, 3) == 2
    assert blocks_for_seconds(120, 3) == 160


def _demo_args(tmp_path, *extra):
    return cli.build_parser().parse_args(DEMO + ["--out", str(tmp_path), *extra])


def test_interrupt_leaves_playable_video_and_consistent_logs(tmp_path):
    from lrag.runner import run_generate

    def stop_after_three(block):
        if block.index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_generate(_demo_args(tmp_path), on_block=stop_after_three)
    assert count_frames(tmp_path / "rag.mp4") == 3 * 12          # the finished blocks, playable
    assert not (tmp_path / "native.mp4").exists()
    assert not (tmp_path / "side_by_side.mp4").exists() and not (tmp_path / "demo_metrics.json").exists()
    t = json.loads((tmp_path / "timings.json").read_text())
    assert t["interrupted"] and t["modes"]["rag"]["summary"]["blocks_done"] == 3
    assert not t["modes"]["rag"]["summary"]["finished"]
    log = json.loads((tmp_path / "memory_log.json").read_text())
    assert log["interrupted"] and log["blocks_done"] == 3 and log["records"] == []
    assert (tmp_path / "retrieval.png").exists()


def test_ctrl_c_exits_130_with_the_finished_blocks(tmp_path, monkeypatch, capsys):
    from lrag import generate

    real_update = generate.Progress.update

    def update(self, done, timings):
        real_update(self, done, timings)
        if self.line.label == "rag" and done == 7:
            raise KeyboardInterrupt          # as if Ctrl-C arrived during block 7

    monkeypatch.setattr(generate.Progress, "update", update)
    assert cli.main(DEMO + ["--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "the shipped toy generator" in err
    log = json.loads((tmp_path / "memory_log.json").read_text())
    assert log["blocks_done"] == 7 and [r["block"] for r in log["records"]] == [6]
    assert count_frames(tmp_path / "rag.mp4") == 7 * 12


# ---------------------------------------------------------------------------------------------------------------
# lrag inspect
def test_inspect_generator_checkpoint(capsys):
    path = fixture_path("sf_tiny_ckpt.pt")
    assert cli.main(["inspect", path]) == 0
    text = capsys.readouterr().out
    for line in ("kind:        generator", "layers:      2", "dim:         64", "ffn_dim:     128",
                 "text_dim:    32", "EMA:         yes", "dtype:       float32", "not inferable"):
        assert line in text, line
    ema = torch.load(path, weights_only=True)["generator_ema"]
    assert f"parameters:  {sum(t.numel() for t in ema.values()):,}" in text


def test_inspect_safetensors_reads_the_header_only(tmp_path):
    from safetensors.torch import save_file
    sd = normalize_keys(torch.load(fixture_path("rag_tiny_ckpt.pt"), weights_only=True)["generator_ema"])
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
    path = tmp_path / "longlive_tiny.safetensors"
    save_file(sd, str(path))
    info = describe_checkpoint(path)
    assert info["kind"] == "generator" and not info["ema"] and info["dtype"] == "bfloat16"
    assert info["backbone_guess"].startswith("longlive")
    assert info["num_params"] == sum(t.numel() for t in sd.values())
    assert info["geometry"] == infer_geometry(sd)
    assert info["geometry"]["num_layers"] == 2 and info["geometry"]["patch_size"] == (1, 2, 2)


def test_inspect_wan_1_3b_geometry_on_meta():
    from lrag.config import wan_1_3b
    from lrag.models.wan import CausalWanModel
    with torch.device("meta"):
        sd = CausalWanModel(wan_1_3b()).state_dict()
    geo = infer_geometry(sd)
    assert (geo["num_layers"], geo["dim"], geo["num_heads"], geo["ffn_dim"], geo["text_dim"]) == (30, 1536, 12, 8960,
                                                                                                  4096)


def test_inspect_embedder_checkpoint(capsys):
    assert cli.main(["inspect", fixture_path("ae_tiny_ckpt.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "embedder (LatentAE)" and info["embedding_dim"] == 64


# ---------------------------------------------------------------------------------------------------------------
# user errors
def _real(tmp_path, *extra):
    return ["generate", "--prompt", "a cat", "--out", str(tmp_path / "out"), *extra]


def test_real_run_errors(tmp_path, capsys):
    ckpt = fixture_path("sf_tiny_ckpt.pt")
    assert "--backbone is required" in cli_error(_real(tmp_path, "--checkpoint", ckpt), capsys)
    assert "argument --backbone: invalid choice: 'wan'" in cli_error(_real(tmp_path, "--backbone", "wan"), capsys)
    assert "--checkpoint is required" in cli_error(_real(tmp_path, "--backbone", "longlive"), capsys)
    missing = str(tmp_path / "nope.pt")
    assert f"--checkpoint '{missing}' does not exist" in cli_error(
        _real(tmp_path, "--backbone", "longlive", "--checkpoint", missing), capsys)
    base = _real(tmp_path, "--backbone", "self-forcing", "--checkpoint", ckpt)
    assert "--embedder" in cli_error(base + ["--embedder", missing], capsys)
    assert "--height must be a positive multiple of 16" in cli_error(base + ["--height", "100"], capsys)
    err = cli_error(base, capsys)
    assert "--wan-dir is required" in err and "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in err
    assert "is not a directory" in cli_error(base + ["--wan-dir", missing], capsys)
    assert not (tmp_path / "out").exists()


def fake_wan_dir(root, skip=None, shards=False):
    """Placeholder files in the Diffusers layout (enough for the file checks: JSON files hold ``{}``, weights a
    one-tensor safetensors file), leaving out ``skip``."""
    from safetensors.torch import save_file
    files = ["text_encoder/config.json", "tokenizer/tokenizer_config.json", "tokenizer/tokenizer.json",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    if shards:
        files += ["text_encoder/model-00001-of-00002.safetensors"]
    else:
        files += ["text_encoder/model.safetensors"]
    for f in files:
        if f != skip:
            os.makedirs(os.path.dirname(root / f), exist_ok=True)
            if f.endswith(".safetensors"):
                save_file({"w": torch.zeros(2)}, str(root / f))
            else:
                (root / f).write_text("{}")
    if shards:
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        (root / "text_encoder/model.safetensors.index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize("extra, message", [
    (["--seconds", "0"], "--seconds must be a finite number > 0, got 0"),
    (["--seconds", "-3"], "--seconds must be a finite number > 0"),
    (["--seconds", "nan"], "--seconds must be a finite number > 0"),
    (["--seconds", "inf"], "--seconds must be a finite number > 0, got inf"),
    (["--seconds", "abc"], "argument --seconds: invalid float value"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--top-k", "11"], "--top-k must be <= window - sink - 1 = 10"),
    (["--recent-exclude", "-1"], "--recent-exclude must be >= 0"),
    (["--device-frames", "-1"], "--device-frames must be an int >= 0, got -1"),
    (["--device-frames", "0", "--host-frames", "0"], "storage='kv' needs --device-frames + --host-frames >= 1"),
    (["--host-frames", "-2"], "--host-frames must be None or an int >= 0, got -2"),
    (["--memory-position", "sideways"], "--memory-position must be an int >= 0, one of 'sink', 'ordered', 'absolute'"),
    (["--mode", "native", "--seconds", "300"], "native mode uses absolute RoPE positions, at most 1024 frames"),
    (["--mode", "turbo"], "argument --mode: invalid choice"),
    (["--seed", "-1"], "--seed must be in [0, 2**64), got -1"),
])
def test_generate_option_errors(tmp_path, capsys, extra, message):
    wan = fake_wan_dir(tmp_path / "wan")
    err = cli_error(_real(tmp_path, "--backbone", "self-forcing", "--checkpoint", fixture_path("sf_tiny_ckpt.pt"),
                       "--wan-dir", str(wan), "--num-heads", "2", *extra), capsys)
    assert message in err
    assert not (tmp_path / "out").exists()            # nothing written


@pytest.mark.parametrize("skip, message", [
    ("vae/diffusion_pytorch_model.safetensors",
     "missing vae/diffusion_pytorch_model.safetensors or vae/diffusion_pytorch_model.bin"),
    ("vae/config.json", "missing vae/config.json"),
    ("text_encoder/config.json", "missing text_encoder/config.json"),
    ("text_encoder/model.safetensors", "missing text_encoder/model.safetensors or"),
    ("tokenizer/tokenizer.json", "missing tokenizer/tokenizer.json or tokenizer/spiece.model"),
])
def test_incomplete_wan_dir_names_the_missing_file(tmp_path, capsys, skip, message):
    wan = fake_wan_dir(tmp_path / "wan", skip=skip)
    err = cli_error(_real(tmp_path, "--backbone", "self-forcing", "--checkpoint", fixture_path("sf_tiny_ckpt.pt"),
                       "--wan-dir", str(wan)), capsys)
    assert message in err and "huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in err


def test_missing_text_encoder_shard_is_named(tmp_path, capsys):
    wan = fake_wan_dir(tmp_path / "wan", shards=True)
    err = cli_error(_real(tmp_path, "--backbone", "longlive", "--checkpoint", fixture_path("sf_tiny_ckpt.pt"),
                       "--wan-dir", str(wan)), capsys)
    assert "missing text_encoder/model-00002-of-00002.safetensors (listed in model.safetensors.index.json)" in err


def test_checkpoint_that_is_not_a_generator(tmp_path, capsys):
    wan = fake_wan_dir(tmp_path / "wan")
    err = cli_error(_real(tmp_path, "--backbone", "longlive", "--checkpoint", fixture_path("ae_tiny_ckpt.pt"),
                       "--wan-dir", str(wan)), capsys)
    assert "is not a Wan generator checkpoint (embedder (LatentAE))" in err


def test_heads_must_be_given_when_not_inferable(tmp_path, capsys):
    wan = fake_wan_dir(tmp_path / "wan")
    err = cli_error(_real(tmp_path, "--backbone", "longlive", "--checkpoint", fixture_path("sf_tiny_ckpt.pt"),
                       "--wan-dir", str(wan)), capsys)
    assert "cannot infer the number of heads from dim=64: pass --num-heads" in err


def test_bad_frames_per_block(tmp_path, capsys):
    wan = fake_wan_dir(tmp_path / "wan")
    err = cli_error(_real(tmp_path, "--backbone", "causal-forcing", "--checkpoint", fixture_path("sf_tiny_ckpt.pt"),
                       "--wan-dir", str(wan), "--num-heads", "2", "--frames-per-block", "0"), capsys)
    assert "the checkpoint's geometry does not fit the options: WanConfig.frames_per_block must be a positive" in err


def test_inspect_errors(tmp_path, capsys):
    assert "does not exist" in cli_error(["inspect", str(tmp_path / "x.pt")], capsys)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x01")
    assert f"checkpoint '{bad}': truncated: 1 bytes" in cli_error(["inspect", str(bad)], capsys)


def _truncated_safetensors(tmp_path, cut: int):
    from safetensors.torch import save_file
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(100), "b": torch.ones(10)}, str(path))
    path.write_bytes(path.read_bytes()[:cut])
    return path


@pytest.mark.parametrize("cut, message", [
    (-1, "truncated: tensor "),                                   # data cut: offsets beyond the file size
    (-40, "truncated: tensor "),
    (30, "truncated: the safetensors header is "),                # header length beyond the file
])
def test_inspect_detects_truncated_safetensors(tmp_path, capsys, cut, message):
    path = _truncated_safetensors(tmp_path, cut)
    err = cli_error(["inspect", str(path)], capsys)
    assert err.startswith(f"lrag: error: checkpoint '{path}': {message}")


# ---------------------------------------------------------------------------------------------------------------
# user errors of generate that used to print a traceback
def _no_build(monkeypatch):
    """Fails the test if a pipeline (demo or real) is built: the error must come before."""
    from lrag import runner
    from lrag.toy import shipped

    def build(*args, **kwargs):
        raise AssertionError("a model was built before the error")

    monkeypatch.setattr(runner, "_build", build)
    monkeypatch.setattr(shipped, "load_shipped_generator", build)


@pytest.mark.parametrize("where, message", [
    ("file", "exists and is not a directory"),
    ("below_file", "cannot be created: "),
    ("proc", "is not writable"),
])
def test_out_is_checked_before_any_model(tmp_path, capsys, monkeypatch, where, message):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = {"file": blocker, "below_file": blocker / "sub", "proc": "/proc/lrag_out"}[where]
    if where == "proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    _no_build(monkeypatch)
    err = cli_error(DEMO + ["--out", str(out)], capsys)
    assert f"lrag: error: --out '{out}' " in err and message in err
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("device, message", [
    ("bogus", "--device 'bogus' is not a device (use cpu, cuda or cuda:N)"),
    ("meta", "--device 'meta': only cpu and cuda"),
    pytest.param("cuda", "--device cuda but CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
    ("cuda:99", "--device cuda:99"),
])
def test_bad_device(tmp_path, capsys, device, message):
    assert message in cli_error(DEMO + ["--out", str(tmp_path / "o"), "--device", device], capsys)
    wan = fake_wan_dir(tmp_path / "wan")
    err = cli_error(_real(tmp_path, "--backbone", "self-forcing", "--checkpoint", fixture_path("sf_tiny_ckpt.pt"),
                       "--wan-dir", str(wan), "--num-heads", "2", "--device", device), capsys)
    assert message in err and not (tmp_path / "o").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    # 11 ground-truth prefix blocks + 1333333333334 generated ones
    (["--mode", "rag", "--seconds", "1e12"], "lrag: error: --seconds 1e+12 (4000000000035 latent frames of 4 x 16 x 16) "
                                             "needs about "),
])
def test_demo_resource_errors(tmp_path, capsys, extra, message):
    err = cli_error(DEMO + ["--out", str(tmp_path / "out")] + extra, capsys)
    assert message in err
    assert not (tmp_path / "out").exists()            # checked before anything was allocated or written


def test_real_run_too_large_for_memory(tmp_path, capsys):
    wan = fake_wan_dir(tmp_path / "wan")
    err = cli_error(_real(tmp_path, "--backbone", "self-forcing", "--checkpoint", fixture_path("sf_tiny_ckpt.pt"),
                       "--wan-dir", str(wan), "--num-heads", "2", "--height", "64", "--width", "64",
                       "--seconds", "1e10", "--device", "cpu"), capsys)
    assert "lrag: error: --seconds 1e+10 (" in err and "GiB of host memory" in err and "shorten --seconds" in err
    assert not (tmp_path / "out").exists()


def test_run_memory_needs_counts_every_buffer():
    from lrag.config import wan_1_3b
    from lrag.runner import kv_estimate, run_memory_needs
    from lrag_ext import MemoryConfig
    cfg, frames = wan_1_3b(), 120
    r = MemoryConfig(device_frames=64, max_frames=4096)
    need = run_memory_needs(cfg, frames, torch.bfloat16, torch.device("cuda"), ["rag"], r, 1024, 1_418_996_800)
    frame = 16 * 60 * 104
    per_kv = 30 * 2 * 1560 * 1536 * 2
    assert need["device"] == {"model": 1_418_996_800 * 2, "latents": 2 * frames * frame * 2,
                              "memory embeddings": 4096 * 1024 * 4, "memory K/V, device tier": 64 * per_kv}
    kv = kv_estimate(cfg, frames, torch.bfloat16, 64, None)
    assert need["host"] == {"noise": frames * frame * 4, "memory K/V, host tier": round(kv["host_gib"] * 2 ** 30)}
    native = run_memory_needs(cfg, frames, torch.float32, torch.device("cpu"), ["native"], r, 1024, 10)
    assert native == {"host": {"model": 40, "latents": 2 * frames * frame * 4, "noise": frames * frame * 4}}


def test_generator_that_does_not_fit_its_geometry_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    sd = normalize_keys(torch.load(fixture_path("sf_tiny_ckpt.pt"), weights_only=True)["generator_ema"])
    del sd["blocks.1.cross_attn.o.bias"]
    path = tmp_path / "gen.pt"
    torch.save({"generator_ema": sd}, path)
    from lrag import runner
    monkeypatch.setattr(runner, "_real_setup", lambda *a, **k: pytest.fail("setup reached"))
    err = cli_error(_real(tmp_path, "--backbone", "self-forcing", "--checkpoint", str(path), "--num-heads", "2",
                       "--wan-dir", str(fake_wan_dir(tmp_path / "wan"))), capsys)
    assert f"lrag: error: --checkpoint '{path}': the weights do not match" in err
    assert "blocks.1.cross_attn.o.bias" in err


def test_embedder_that_does_not_fit_the_latents(tmp_path, capsys, monkeypatch):
    from lrag_ext.embedder import PooledEmbedder
    model = PooledEmbedder(in_channels=4, grid=2, latent_dim=8)
    path = tmp_path / "emb.pt"
    torch.save({"model": model.state_dict(), "config": model.config.to_dict()}, path)
    from lrag import runner
    monkeypatch.setattr(runner, "_real_setup", lambda *a, **k: pytest.fail("setup reached"))
    err = cli_error(_real(tmp_path, "--backbone", "self-forcing", "--checkpoint", fixture_path("sf_tiny_ckpt.pt"),
                       "--num-heads", "2", "--height", "64", "--width", "64", "--embedder", str(path),
                       "--wan-dir", str(fake_wan_dir(tmp_path / "wan"))), capsys)
    assert f"--embedder '{path}' does not fit the generator: the embedder takes 4-channel latents" in err


@pytest.mark.parametrize("file, content, message", [
    ("vae/config.json", "{not json", "not valid JSON"),
    ("text_encoder/config.json", "[1, 2]", "holds a JSON list, not an object"),
    ("tokenizer/tokenizer.json", "", "the file is empty"),
    ("vae/config.json", '{"z_dim": 16, "latents_mean": [0.0]}', "latents_mean must be a list of z_dim = 16"),
    ("vae/diffusion_pytorch_model.safetensors", b"\x10\0\0\0\0\0\0\0{", "truncated"),
    ("text_encoder/model.safetensors.index.json", "[]", "holds a JSON list"),
    ("text_encoder/model.safetensors.index.json", '{"weight_map": ["a"]}', "has no 'weight_map' object"),
])
def test_malformed_wan_dir_files_are_named(tmp_path, capsys, file, content, message):
    wan = fake_wan_dir(tmp_path / "wan", shards=file.endswith("index.json"))
    target = wan / file
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    err = cli_error(_real(tmp_path, "--backbone", "self-forcing", "--checkpoint", fixture_path("sf_tiny_ckpt.pt"),
                       "--wan-dir", str(wan)), capsys)
    assert f"lrag: error: --wan-dir file '{target}': " in err and message in err


def test_user_errors_print_no_traceback(tmp_path):
    """As a program: exit status 2 and one `lrag: error:` line, never a traceback."""
    import subprocess
    import sys
    trunc = _truncated_safetensors(tmp_path, -5)
    for argv in (["inspect", str(trunc)], ["generate", "--demo", "--device", "bogus", "--out", str(tmp_path / "o")],
                 ["train-embedder", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--latent-dim", "0"]):
        res = subprocess.run([sys.executable, "-m", "lrag", *argv], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and res.stderr.startswith("lrag: error: "), res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
    assert not (tmp_path / "o").exists()


def test_train_embedder_is_wrapped(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train-embedder", "--help"])
    assert e.value.code == 0
    assert "--data" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# the real-checkpoint path: tiny umT5 + tokenizer + Wan VAE in a Diffusers-layout folder, no download
def _tiny_wan_dir(root):
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    tokenizers = pytest.importorskip("tokenizers")
    torch.manual_seed(0)
    words = "a cat dog runs in the snow forest red fox sky over sea".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(root / "tokenizer")
    cfg = transformers.UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8, relative_attention_max_distance=16)
    transformers.UMT5EncoderModel(cfg).save_pretrained(root / "text_encoder")
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    vae.save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    return _tiny_wan_dir(tmp_path_factory.mktemp("wan"))


def test_streaming_vae_decode_equals_whole_video_decode(tiny_wan):
    from lrag.vae import StreamingVAEDecoder, load_vae, to_uint8
    vae = load_vae(tiny_wan)
    latents = torch.randn(9, 16, 8, 8, generator=torch.Generator().manual_seed(3))   # [F, C, h, w]
    dec = StreamingVAEDecoder(vae)
    blocks = [dec.decode(latents[i:i + 3]) for i in range(0, 9, 3)]
    assert [len(b) for b in blocks] == [9, 12, 12]                                     # 1 + 4 (F - 1)
    z = latents.permute(1, 0, 2, 3)[None] * dec.std + dec.mean
    whole = to_uint8(vae.decode(z).sample[0])
    assert np.abs(np.concatenate(blocks).astype(int) - whole.astype(int)).max() <= 1


def test_text_encoder_zeroes_padding(tiny_wan):
    from lrag.text import TextEncoder
    enc = TextEncoder(tiny_wan, text_len=16)
    out = enc.encode(["a red fox", "the cat runs in the snow"])
    assert out.shape == (2, 16, 32)
    assert out[0, 4:].abs().max() == 0 and out[0, :4].abs().min() > 0           # 3 words + </s>
    assert out[1, 7:].abs().max() == 0 and out[1, 6].abs().sum() > 0


def test_real_checkpoint_end_to_end(tiny_wan, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", "--backbone", "self-forcing", "--checkpoint", fixture_path("sf_tiny_ckpt.pt"),
            "--wan-dir", str(tiny_wan), "--prompt", "a red fox in the snow", "--seconds", "6", "--height", "64",
            "--width", "64", "--num-heads", "2", "--text-len", "16", "--device", "cpu", "--mode", "both",
            "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    assert "spatial-mean descriptor" in capsys.readouterr().err
    for mode in ("rag", "native"):
        video = read_video(out / f"{mode}.mp4")
        assert video.shape == (1 + 4 * (3 * DEMO_BLOCKS - 1), 64, 64, 3)
    log = json.loads((out / "memory_log.json").read_text())
    assert [r["block"] for r in log["records"]] == [6, 7] and log["embedder"].startswith("spatial-mean")
    assert json.loads((out / "timings.json").read_text())["modes"]["rag"]["summary"]["blocks_done"] == DEMO_BLOCKS
    shutil.rmtree(out)
    # with the release-format LatentAE of the fixtures (16 x 8 x 8 latents) as the retrieval embedder
    argv[argv.index("both")] = "rag"
    assert cli.main(argv + ["--embedder", fixture_path("rag_tiny_ae_ckpt.pt")]) == 0
    log = json.loads((out / "memory_log.json").read_text())
    assert log["embedder"].endswith("rag_tiny_ae_ckpt.pt") and len(log["records"]) == 2
    assert not (out / "native.mp4").exists() and count_frames(out / "rag.mp4") == 93
    # a checkpoint that is not an embedder
    err = cli_error(argv + ["--embedder", fixture_path("sf_tiny_ckpt.pt")], capsys)
    assert f"--embedder '{fixture_path('sf_tiny_ckpt.pt')}'" in err


def test_heavy_dependencies_are_imported_lazily():
    # lrag_ext never imports them; lrag (and its CLI module) only in the commands that need them
    import subprocess
    import sys
    code = ("import sys, lrag_ext, lrag, lrag.cli, lrag.runner, lrag.generate, lrag.ckpt_info; "
            "heavy = {'transformers', 'diffusers', 'imageio', 'matplotlib'} & "
            "set(m.split('.')[0] for m in sys.modules); "
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_dash_m_lrag(capsys):
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "lrag", "inspect", fixture_path("sf_tiny_ckpt.pt")],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "kind:        generator" in res.stdout
    res = subprocess.run([sys.executable, "-m", "lrag", "generate", "--demo", "--seconds", "0"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "lrag: error: --seconds must be a finite number > 0" in res.stderr


def test_kv_estimate_of_the_real_model():
    from lrag.config import wan_1_3b
    from lrag.runner import kv_estimate
    est = kv_estimate(wan_1_3b(), 120, torch.bfloat16, device_frames=64, host_frames=None)
    assert est["frame_mib"] * 2 ** 20 == 30 * 2 * 1560 * 1536 * 2            # 287.5 MB per frame (SPEC §2)
    assert est["device_gib"] == pytest.approx(64 * est["frame_mib"] / 1024)
    assert est["host_gib"] == pytest.approx(56 * est["frame_mib"] / 1024) and est["dropped_frames"] == 0
    assert kv_estimate(wan_1_3b(), 120, torch.bfloat16, 64, 10)["dropped_frames"] == 46
    latent = kv_estimate(wan_1_3b(), 120, torch.bfloat16, 64, None, storage="latent")
    assert latent["frame_mib"] * 2 ** 20 == 16 * 60 * 104 * 2 and latent["host_gib"] == 0


def _tiny_real(tiny_wan, out, *extra):
    return ["generate", "--backbone", "self-forcing", "--checkpoint", fixture_path("sf_tiny_ckpt.pt"),
            "--wan-dir", str(tiny_wan), "--prompt", "a red fox in the snow", "--seconds", str(DEMO_BLOCKS * 0.75),
            "--height", "64", "--width", "64", "--num-heads", "2", "--text-len", "16", "--device", "cpu",
            "--out", str(out), "--quiet", *extra]


def test_bounded_tiers_warn_about_dropped_frames(tiny_wan, tmp_path, capsys):
    assert cli.main(_tiny_real(tiny_wan, tmp_path, "--mode", "rag", "--device-frames", "2", "--host-frames", "4")) == 0
    err = capsys.readouterr().err
    assert "the oldest 18 frames' K/V will be dropped and can no longer be retrieved" in err
    # the candidates (frames >= 17 frames old) were all dropped: nothing is retrieved
    assert json.loads((tmp_path / "memory_log.json").read_text())["records"] == []


def test_real_run_with_latent_storage(tiny_wan, tmp_path):
    assert cli.main(_tiny_real(tiny_wan, tmp_path, "--storage", "latent", "--mode", "rag")) == 0
    log = json.loads((tmp_path / "memory_log.json").read_text())
    assert log["storage"] == "latent" and [r["block"] for r in log["records"]] == [6, 7]
    assert log["kv_memory_estimate"]["frame_mib"] * 2 ** 20 == 16 * 8 * 8 * 4
    assert count_frames(tmp_path / "rag.mp4") == 1 + 4 * (3 * DEMO_BLOCKS - 1)
    assert not (tmp_path / "native.mp4").exists()


def test_progress_line():
    import io
    from lrag.generate import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    timings = {"retrieval": 0.01, "memory": 0.01, "total": 0.2}
    tty, log = Tty(), io.StringIO()
    for stream in (tty, log):
        p = Progress("rag", 20, stream=stream)
        for done in range(1, 21):
            p.update(done, timings)
    assert tty.getvalue().count("\r") == 20 and "block 20/20" in tty.getvalue()
    assert "retrieval 10.0% of block time" in tty.getvalue()
    lines = log.getvalue().splitlines()           # not a terminal: every 2nd block of 20, no carriage returns
    assert len(lines) == 10 and lines[-1].startswith("[rag] |########################| block 20/20")


def test_real_frame_wise_run(tiny_wan, tmp_path):
    # frame-wise schedule (Causal-Forcing's frame-wise variant): a block is 1 latent frame = 0.25 s
    out = tmp_path / "out"
    argv = ["generate", "--backbone", "causal-forcing", "--checkpoint", fixture_path("sf_tiny_ckpt.pt"),
            "--wan-dir", str(tiny_wan), "--prompt", "a dog", "--seconds", "1", "--height", "64", "--width", "64",
            "--num-heads", "2", "--text-len", "16", "--device", "cpu", "--mode", "native", "--frames-per-block", "1",
            "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    t = json.loads((out / "timings.json").read_text())
    assert t["num_blocks"] == 4 and t["frames_per_block"] == 1
    assert count_frames(out / "native.mp4") == 1 + 4 * 3


def test_run_layer_neither_imports_the_cli_nor_changes_the_parsed_options(tmp_path, monkeypatch):
    """lrag.runner is the run, lrag.cli the command line: no import cycle, and a run leaves the parsed options as
    they were (the output folder's default is computed, not written back)."""
    import subprocess
    import sys

    probe = "import sys, lrag.runner; assert 'lrag.cli' not in sys.modules, sorted(m for m in sys.modules if 'lrag' in m)"
    subprocess.run([sys.executable, "-c", probe], check=True)
    from lrag.errors import UsageError
    from lrag.runner import output_dir, run_generate

    monkeypatch.chdir(tmp_path)
    for argv, message, out in ((["--prompt", "a cat", "--top-k", "0"], "--top-k must be >= 1", "lrag_out"),
                               (["--demo", "--top-k", "3"], "--top-k does not apply to --demo", "lrag_demo")):
        args = cli.build_parser().parse_args(["generate", *argv])
        before = dict(vars(args))
        with pytest.raises(UsageError, match=message):
            run_generate(args)
        assert vars(args) == before and output_dir(args) == out


# ------------------------------------------------------------------------------------------------- --lora
LL_CKPT, LL_LORA = "longlive_lora_tiny_ckpt.pt", "longlive_lora_tiny_lora.pt"


def test_inspect_lora_adapter(capsys):
    assert cli.main(["inspect", fixture_path(LL_LORA)]) == 0
    out = capsys.readouterr().out
    assert "LoRA adapter" in out and "rank:        4" in out and "20 Linear layers" in out
    info = describe_checkpoint(fixture_path(LL_LORA))
    assert info["rank"] == 4 and info["num_params"] == 11264 and info["layer_kinds"]["ffn.0"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--lora-alpha", "8"], "--lora-alpha needs --lora"),
    (["--lora-scale", "0.5", "--lora-unmerged"], "--lora-scale, --lora-unmerged needs --lora"),
    (["--lora", "LORA", "--lora-alpha", "0"], "--lora-alpha must be > 0"),
    (["--lora", "LORA", "--lora-scale", "nan"], "--lora-scale must be a finite number"),
    (["--lora", "MISSING"], "--lora '{MISSING}' does not exist"),
    (["--lora", "CKPT"], "not a LoRA adapter"),
    (["--lora", "WIDE"], "--lora '{WIDE}' does not fit --checkpoint"),
])
def test_lora_option_errors(tmp_path, capsys, monkeypatch, extra, message):
    wide = tmp_path / "wide.pt"               # an adapter for layers of another width
    torch.save({"base_model.model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 32),
                "base_model.model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(32, 2)}, wide)
    paths = {"LORA": fixture_path(LL_LORA), "MISSING": str(tmp_path / "nope.pt"), "CKPT": fixture_path(LL_CKPT),
             "WIDE": str(wide)}
    from lrag import runner
    monkeypatch.setattr(runner, "_real_setup", lambda *a, **k: pytest.fail("setup reached"))
    err = cli_error(_real(tmp_path, "--backbone", "longlive", "--checkpoint", fixture_path(LL_CKPT), "--no-ema",
                          "--num-heads", "2", "--wan-dir", str(fake_wan_dir(tmp_path / "wan")),
                          *[paths.get(e, e) for e in extra]), capsys)
    assert message.format(**paths) in err
    assert not (tmp_path / "out").exists()


def test_demo_refuses_lora(tmp_path, capsys):
    assert "--lora does not apply to --demo" in cli_error(DEMO + ["--lora", fixture_path(LL_LORA),
                                                                  "--out", str(tmp_path / "d")], capsys)


def test_real_run_with_lora(tiny_wan, tmp_path):
    # The adapter changes the video; --lora-scale 0 is the base model exactly; merged and unmerged runs agree.
    def run(name, *extra):
        out = tmp_path / name
        argv = ["generate", "--backbone", "longlive", "--checkpoint", fixture_path(LL_CKPT), "--no-ema",
                "--wan-dir", str(tiny_wan), "--prompt", "a dog", "--seconds", "1.5", "--height", "64", "--width",
                "64", "--num-heads", "2", "--text-len", "16", "--device", "cpu", "--mode", "native", "--out", str(out),
                "--quiet", *extra]
        assert cli.main(argv) == 0
        return read_video(out / "native.mp4").astype(int), json.loads((out / "timings.json").read_text())

    base, meta = run("base")
    assert meta["lora"] is None
    lora = ["--lora", fixture_path(LL_LORA), "--lora-alpha", "8"]
    merged, meta = run("merged", *lora)
    assert meta["lora"] == {"path": fixture_path(LL_LORA), "rank": 4, "layers": 20, "alpha": 8.0, "lora_scale": 1.0,
                            "scaling": 2.0, "merged": True}
    unmerged, meta = run("unmerged", *lora, "--lora-unmerged")
    assert meta["lora"]["merged"] is False
    off, _ = run("off", *lora, "--lora-scale", "0")
    assert np.array_equal(off, base)
    assert np.abs(merged - base).mean() > 2                    # a visible change (uint8 pixels)
    # rounding only in the latents (test_lora.py: <= 1e-5); the lossy video encoding may move a few pixels
    assert np.abs(merged - unmerged).mean() < 0.05 * np.abs(merged - base).mean()


# ------------------------------------------------------------------------------------------------- registry
@pytest.fixture
def tiny_registry(monkeypatch):
    """The shipped registry with the tiny test geometry: the tiny golden checkpoints, saved under a release's
    file name, are that release."""
    from lrag import registry
    from test_registry import tiny_registry_doc
    parsed = registry.parse_registry(tiny_registry_doc())
    monkeypatch.setattr(registry, "_registry", lambda: parsed)
    return registry


def _as_release(tmp_path, fixture, relative):
    path = tmp_path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(fixture_path(fixture), path)
    return str(path)


def test_inspect_names_the_registered_release(tiny_registry, tmp_path, capsys):
    path = _as_release(tmp_path, "cf_framewise_tiny_ckpt.pt", "causal-forcing++/framewise-2step.pt")
    assert cli.main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "release:     causal-forcing-pp-framewise-2step (Causal Forcing++, frame-wise 2-step" in out
    assert "runs with:   1 frame(s) per block, steps [1000, 500], first block [1000, 750, 500, 250]" in out
    assert describe_checkpoint(path)["release"] == "causal-forcing-pp-framewise-2step"
    ll = _as_release(tmp_path, "longlive_lora_tiny_ckpt.pt", "models/longlive_base.pt")
    assert cli.main(["inspect", ll]) == 0
    out = capsys.readouterr().out
    assert "longlive-base" in out and "sink 3, the 'generator' entry" in out and "lrag generate --lora" in out


@pytest.mark.parametrize("relative, extra, message", [
    ("framewise-2step.pt", ["--frames-per-block", "3"],
     "--frames-per-block 3 cannot work with causal-forcing-pp-framewise-2step: it was trained to generate 1 latent"),
    ("framewise-2step.pt", ["--backbone", "longlive"],
     "--backbone longlive does not fit --checkpoint, the causal-forcing release causal-forcing-pp-framewise-2step"),
    ("my_model.pt", [], "--backbone is required without --demo"),
    ("my_model.pt", ["--checkpoint-name", "cf-9step"], "--checkpoint-name 'cf-9step' is not a registered release"),
    ("framewise-2step.pt", ["--sink", "12"], "--sink 12 does not fit the 12-frame window"),
    ("framewise-2step.pt", ["--retrieve-every", "0"], "--retrieve-every must be >= 1, got 0"),
    ("framewise-2step.pt", ["--steps", "1000,2000"], "argument --steps: a comma-separated list of ints in [0, 1000]"),
    ("framewise-2step.pt", ["--first-block-steps", "x"], "argument --first-block-steps: a comma-separated list"),
])
def test_registry_option_errors(tiny_registry, tmp_path, capsys, monkeypatch, relative, extra, message):
    path = _as_release(tmp_path, "cf_framewise_tiny_ckpt.pt", relative)
    from lrag import runner
    monkeypatch.setattr(runner, "_real_setup", lambda *a, **k: pytest.fail("setup reached"))
    err = cli_error(["generate", "--prompt", "a cat", "--out", str(tmp_path / "out"), "--checkpoint", path,
                     "--num-heads", "2", "--wan-dir", str(fake_wan_dir(tmp_path / "wan")), *extra], capsys)
    assert message in err
    assert not (tmp_path / "out").exists()


def _tiny_run(tiny_wan, tmp_path, checkpoint, *extra):
    out = tmp_path / "out"
    argv = ["generate", "--checkpoint", checkpoint, "--wan-dir", str(tiny_wan), "--prompt", "a dog", "--height", "64",
            "--width", "64", "--num-heads", "2", "--text-len", "16", "--device", "cpu", "--out", str(out), "--quiet",
            *extra]
    assert cli.main(argv) == 0
    return json.loads((out / "timings.json").read_text()), json.loads((out / "memory_log.json").read_text())


def test_registered_frame_wise_release_runs_with_its_own_schedule(tiny_registry, tiny_wan, tmp_path, capsys):
    path = _as_release(tmp_path, "cf_framewise_tiny_ckpt.pt", "causal-forcing++/framewise-2step.pt")
    meta, log = _tiny_run(tiny_wan, tmp_path, path, "--seconds", "5", "--top-k", "2", "--recent-exclude", "0",
                          "--retrieve-every", "3")                 # no --backbone: the registry names the file
    assert meta["release"] == "causal-forcing-pp-framewise-2step" and meta["title"] == "causal-forcing"
    assert (meta["frames_per_block"], meta["num_blocks"], meta["window"], meta["sink"]) == (1, 20, 12, 1)
    assert meta["steps"] == [1000, 500] and meta["first_block_steps"] == [1000, 750, 500, 250]
    assert meta["state_dict_entry"] == "generator_ema" and meta["retrieve_every"] == 3
    blocks = [r["block"] for r in log["records"]]
    assert blocks and all(b % 3 == 0 for b in blocks) and blocks == list(range(blocks[0], 20, 3))


def test_a_release_resaved_without_its_entry_keeps_its_schedule(tiny_registry, tmp_path, capsys, monkeypatch):
    # the frame-wise release re-saved as a plain state dict: recognised by name and shapes, run frame-wise with its
    # own weights, with a note
    sd = torch.load(fixture_path("cf_framewise_tiny_ckpt.pt"), weights_only=True)["generator_ema"]
    path = tmp_path / "causal-forcing++" / "framewise-2step.pt"
    path.parent.mkdir()
    torch.save(sd, path)
    from lrag import runner
    seen = {}
    monkeypatch.setattr(runner, "_real_setup", lambda args, cfg, *a, **k: (seen.update(cfg=cfg, args=args),
                                                                          pytest.fail("stop"))[1])
    with pytest.raises(pytest.fail.Exception):
        cli.main(["generate", "--prompt", "a cat", "--out", str(tmp_path / "out"), "--checkpoint", str(path),
                  "--num-heads", "2", "--wan-dir", str(fake_wan_dir(tmp_path / "wan"))])
    assert "has no 'generator_ema' entry: its own generator weights are used" in capsys.readouterr().err
    assert seen["cfg"].frames_per_block == 1 and seen["args"].use_ema is None
    assert seen["args"].release.name == "causal-forcing-pp-framewise-2step"


def test_registered_longlive_runs_with_sink_3_and_its_generator_entry(tiny_registry, tiny_wan, tmp_path, capsys):
    path = _as_release(tmp_path, "longlive_lora_tiny_ckpt.pt", "longlive_models/models/longlive_base.pt")
    meta, _ = _tiny_run(tiny_wan, tmp_path, path, "--seconds", "1.5", "--mode", "native")
    assert "released with a LoRA adapter" in capsys.readouterr().err
    assert meta["release"] == "longlive-base" and meta["sink"] == 3 and meta["state_dict_entry"] == "generator"
    shutil.rmtree(tmp_path / "out")
    meta, _ = _tiny_run(tiny_wan, tmp_path, path, "--seconds", "1.5", "--mode", "native", "--sink", "1",
                        "--lora", fixture_path(LL_LORA))
    assert meta["sink"] == 1
    assert meta["lora"]["alpha"] == 4                   # a rank-4 adapter is not the release's (rank 256, alpha 256)
    # a renamed copy is unknown by name; --checkpoint-name makes it the release again
    renamed = _as_release(tmp_path, "longlive_lora_tiny_ckpt.pt", "mine.pt")
    shutil.rmtree(tmp_path / "out")
    meta, _ = _tiny_run(tiny_wan, tmp_path, renamed, "--seconds", "1.5", "--mode", "native", "--checkpoint-name",
                        "longlive-base")
    assert meta["release"] == "longlive-base" and meta["state_dict_entry"] == "generator"


# ------------------------------------------------------------------------------------------------- --switch
@pytest.mark.parametrize("extra, message", [
    (["--switch", "12"], "argument --switch: FRAME:PROMPT with FRAME a latent frame index"),
    (["--switch", "x:a dog"], "argument --switch: FRAME:PROMPT"),
    (["--switch", "12:"], "argument --switch: FRAME:PROMPT"),
    (["--switch", "0:a dog"], "--switch 0:...: frame 0 must be in [1, 21]"),
    (["--switch", "22:a dog"], "--switch 22:...: frame 22 must be in [1, 21]"),
    (["--switch", "12:a dog", "--switch", "9:a cat"], "--switch 9:...: frame 9 must be in [13, 21]"),
    (["--switch", "10:a dog", "--switch", "11:a cat"], "--switch 11:...: frame 11 must be in [13, 21]"),
    (["--switch-memory", "drop"], "argument --switch-memory: invalid choice"),
    (["--switch-memory", "keep"], "--switch-memory needs --switch"),
    (["--switch", "9:a cat", "--switch-memory", "keep", "--mode", "native"], "--switch-memory applies to --mode rag"),
])
def test_switch_option_errors(tmp_path, capsys, monkeypatch, extra, message):
    from lrag import runner
    monkeypatch.setattr(runner, "_real_setup", lambda *a, **k: pytest.fail("setup reached"))
    err = cli_error(_real(tmp_path, "--backbone", "longlive", "--checkpoint", fixture_path(LL_CKPT), "--no-ema",
                          "--num-heads", "2", "--seconds", "6", "--wan-dir", str(fake_wan_dir(tmp_path / "wan")),
                          *extra), capsys)
    assert message in err
    assert not (tmp_path / "out").exists()


def test_demo_refuses_switches(tmp_path, capsys):
    assert "--switch does not apply to --demo" in cli_error(DEMO + ["--switch", "3:a dog", "--out",
                                                                    str(tmp_path / "d")], capsys)


def test_real_run_with_prompt_switches(tiny_wan, tmp_path, monkeypatch):
    from lrag.models.wan import CausalWanModel
    recaches = []
    original = CausalWanModel.recache
    monkeypatch.setattr(CausalWanModel, "recache",
                        lambda self, latents, cache, timestep=0.0: (recaches.append(cache.num_frames),
                                                                    original(self, latents, cache, timestep))[1])
    meta, log = _tiny_run(tiny_wan, tmp_path, fixture_path(LL_CKPT), "--backbone", "longlive", "--no-ema",
                          "--seconds", "9", "--mode", "both", "--switch", "10:a cat runs", "--switch",
                          "17:the sky over the sea", "--switch-memory", "forget", "--top-k", "2",
                          "--recent-exclude", "0")
    assert meta["switches"] == [{"frame": 10, "start_frame": 12, "prompt": "a cat runs"},
                                {"frame": 17, "start_frame": 18, "prompt": "the sky over the sea"}]
    assert meta["switch_memory"] == "forget"
    assert recaches == [12, 18] * 2                   # at the first block start at or after each switch, both modes
    later = [r for r in log["records"] if r["block"] >= 6]
    # forgotten: nothing from before frame 18 is retrieved; retrieval resumes once frames from after it are old
    assert later and any(r["selected_global_frames"][0] for r in later)
    assert all(f >= 18 for r in later for f in r["selected_global_frames"][0])
