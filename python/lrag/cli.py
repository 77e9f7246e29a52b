"""The ``lrag`` command: ``generate`` (real checkpoints or the built-in ``--demo``), ``inspect``, ``train-embedder``,
``train-toy``, ``eval`` (the toy generator's evaluation), ``train-toy-embedder``.

Argument parsing and user errors live here; the work is in :mod:`lrag.runner` (building the pipeline),
:mod:`lrag.generate` (the streaming run), :mod:`lrag.ckpt_info`, :mod:`lrag_ext.embedder.train`,
:mod:`lrag.toy.train`, :mod:`lrag.toy.evaluate` and :mod:`lrag.toy.embedder`. Heavy optional dependencies
(transformers, diffusers, imageio, matplotlib) are imported only by the commands that need them. User errors
(options, unusable input files, an output folder that cannot be written, a run larger than the memory available)
print ``lrag: error: ...`` naming the option, with no traceback, and exit with status 2, before anything is
written; Ctrl-C exits with 130 after writing the finished blocks' video and logs.
"""
from __future__ import annotations

import argparse
import json
import sys

from lrag.errors import UsageError

BACKBONES = ("self-forcing", "causal-forcing", "longlive")
MODES = ("rag", "native", "both")


def _memory_position(value: str):
    return int(value) if value.isdigit() else value


def _switch(value: str):
    """``"40:a fox jumps"`` -> ``(40, "a fox jumps")``: a prompt switch at latent frame 40."""
    frame, sep, prompt = value.partition(":")
    if not sep or not frame.strip().isdigit() or not prompt.strip():
        raise argparse.ArgumentTypeError(f"FRAME:PROMPT with FRAME a latent frame index (4 video frames = 0.25 s "
                                         f"each), got {value!r}")
    return int(frame), prompt.strip()


def _step_list(value: str):
    """``"1000,750,500,250"`` -> ``[1000, 750, 500, 250]``; ``"none"`` -> ``()`` (an explicit "no list")."""
    if value.strip().lower() == "none":
        return ()
    try:
        steps = [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of ints in [0, 1000], got {value!r}") from None
    if not steps or not all(0 <= t <= 1000 for t in steps):
        raise argparse.ArgumentTypeError(f"a comma-separated list of ints in [0, 1000], got {value!r}")
    return steps


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate a long video (real checkpoints, or the toy --demo)",
                       description="Generate a video block by block with LongLive-RAG retrieval (or natively).")
    p.add_argument("--demo", action="store_true",
                   help="the built-in demo: the shipped toy generator continues a toy-world clip, natively and with "
                        "LongLive-RAG, scored as lrag eval does (no downloads, CPU, under a minute); it takes "
                        "--seconds, --seed, --mode, --out, --device and --quiet and refuses the other options")
    p.add_argument("--prompt", default=None, help="text prompt (required without --demo)")
    p.add_argument("--switch", type=_switch, action="append", default=None, metavar="FRAME:PROMPT",
                   help="switch to PROMPT at latent frame FRAME (0.25 s each; repeatable, increasing), with "
                        "LongLive's KV re-cache: the window's frames re-run under the new prompt")
    p.add_argument("--switch-memory", choices=("recompute", "keep", "forget"), default=None,
                   help="what retrieval does with frames generated before a switch: recompute their K/V under the "
                        "new prompt (default), keep them as computed, or forget them (never retrieved again)")
    p.add_argument("--seconds", type=float, default=30.0,
                   help="video length, rounded up to whole 0.75 s blocks (default 30 = 40 blocks; --demo: the "
                        "generated part, after the ground-truth prefix)")
    p.add_argument("--backbone", choices=BACKBONES, default=None,
                   help="which released generator --checkpoint holds (required without --demo unless the file is "
                        "a registered release, named by its path or --checkpoint-name)")
    p.add_argument("--checkpoint", default=None, help="generator weights (.pt/.pth/.safetensors)")
    p.add_argument("--embedder", default=None,
                   help="retrieval embedder checkpoint (LatentAE or pooled; default: spatial-mean descriptor)")
    p.add_argument("--wan-dir", default=None,
                   help="local Wan2.1-T2V-1.3B folder in the Diffusers layout (text encoder, tokenizer, VAE)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="rag (retrieval), native (sink + window) or both (default: rag; the demo: both)")
    p.add_argument("--top-k", type=int, default=None, help="frames retrieved per block (K; default 6)")
    p.add_argument("--recent-exclude", type=int, default=None,
                   help="most recently evicted frames never retrieved (R; default 5)")
    p.add_argument("--memory-position", type=_memory_position, default=None,
                   help="temporal RoPE position of retrieved frames: an int, 'absolute' or 'ordered' (default 0)")
    p.add_argument("--storage", choices=("kv", "latent"), default=None,
                   help="what the retrieval memory keeps per frame: its K/V (default, the reference; 287.5 MB per Wan "
                        "frame in bf16) or only its latent (200 KB; retrieved K/V recomputed with one extra forward)")
    p.add_argument("--device-frames", type=int, default=None,
                   help="retrieval memory: frames' K/V kept on the device (default 64)")
    p.add_argument("--host-frames", type=int, default=None,
                   help="retrieval memory: frames' K/V in pinned host memory (default: unbounded)")
    p.add_argument("--out", default=None, help="output folder (default: lrag_out, or lrag_demo for --demo)")
    p.add_argument("--seed", type=int, default=0,
                   help="noise seed (default 0); --demo: the toy-world clip, 0-999, and its noise")
    p.add_argument("--device", default=None,
                   help="cuda, cuda:N or cpu (default: cuda when available; --demo: cpu)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="model dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--height", type=int, default=None, help="video height (multiple of 16; default 480)")
    p.add_argument("--width", type=int, default=None, help="video width (multiple of 16; default 832)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (default: dim / 128)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens of the DiT (default 512, as Wan2.1)")
    p.add_argument("--checkpoint-name", default=None, metavar="NAME",
                   help="which registered release --checkpoint is (lrag inspect names it from the file's path; "
                        "docs/checkpoints.md lists them): its schedule, steps and state-dict entry become the "
                        "defaults")
    p.add_argument("--frames-per-block", type=int, default=None,
                   help="latent frames per block (default: the release's, 1 for the frame-wise Causal-Forcing "
                        "models; 3 otherwise); a registered release refuses another value")
    p.add_argument("--steps", type=_step_list, default=None,
                   help="denoising steps, comma-separated (default: the release's, e.g. 1000,750,500,250)")
    p.add_argument("--first-block-steps", type=_step_list, default=None,
                   help="denoising steps of the first block only, or 'none' (default: the release's: "
                        "1000,750,500,250 for the 1- and 2-step Causal Forcing++ models)")
    p.add_argument("--sink", type=int, default=None,
                   help="sink frames kept in the attention window (default: the release's rolling-window sink, 3 "
                        "for LongLive; 1 otherwise, as the LongLive-RAG reference)")
    p.add_argument("--retrieve-every", type=int, default=None,
                   help="retrieve at every N-th block only, holding the retrieved frames in between (default 1; "
                        "e.g. 3 for a frame-wise model: one retrieval per 3 frames)")
    p.add_argument("--no-ema", action="store_true", help="use 'generator' instead of 'generator_ema'")
    p.add_argument("--lora", default=None,
                   help="a LoRA adapter for the generator, in LongLive's lora.pt format (peft lora_A / lora_B "
                        "weights; its 'generator_lora' entry), merged into the weights at load")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="the adapter's alpha (the file does not store it): scale = alpha / rank (default: the "
                        "rank, as LongLive's released config, rank 256 alpha 256)")
    p.add_argument("--lora-scale", type=float, default=None,
                   help="multiplies the adapter's effect (default 1: the released behaviour; 0 = base model)")
    p.add_argument("--lora-unmerged", action="store_true",
                   help="keep the adapter separate (forward hooks, peft's arithmetic: bit-identical to LongLive in "
                        "float32, two extra small matmuls per layer) instead of merging it into the weights")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrag", description="LongLive-RAG: long video generation with a "
                                     "retrieval memory (reference generator on lrag_ext).")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    p = sub.add_parser("inspect", help="describe a checkpoint without loading it into a model")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    sub.add_parser("train-embedder", add_help=False,
                   help="train a retrieval embedder (python -m lrag_ext.embedder.train; --help for its options)")
    sub.add_parser("train-toy", add_help=False,
                   help="train the toy world's tiny generator (python -m lrag.toy.train; --help for its options)")
    sub.add_parser("eval", add_help=False,
                   help="evaluate a toy generator in every attention mode (python -m lrag.toy.evaluate; --help for "
                        "its options)")
    sub.add_parser("train-toy-embedder", add_help=False,
                   help="train a retrieval embedder on the toy world's frames (python -m lrag.toy.embedder; --help "
                        "for its options)")
    return parser


def _cmd_inspect(args) -> int:
    from lrag.ckpt_info import describe_checkpoint, format_description  # noqa: PLC0415

    from lrag_ext.state_dicts import InputFileError  # noqa: PLC0415

    try:
        info = describe_checkpoint(args.checkpoint)
    except (FileNotFoundError, InputFileError) as e:     # missing; unusable (named, with what is wrong)
        raise UsageError(str(e)) from None
    print(json.dumps(info, indent=1, default=str) if args.json else format_description(info))
    return 0


def _cmd_generate(args) -> int:
    from lrag.runner import output_dir, run_generate  # noqa: PLC0415  (torch, lrag_ext)

    try:
        paths = run_generate(args)
    except KeyboardInterrupt:
        print(f"\nlrag: interrupted; the finished blocks' video and logs are in {output_dir(args)}", file=sys.stderr)
        return 130
    print("\nartefacts:")
    for name, path in paths.items():
        print(f"  {name:<12} {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-embedder"]:
        from lrag_ext.embedder.train import main as train_main  # noqa: PLC0415

        return train_main(argv[1:], prog="lrag train-embedder", error_prefix="lrag") or 0
    if argv[:1] == ["train-toy"]:
        from lrag.toy.train import main as toy_main  # noqa: PLC0415

        return toy_main(argv[1:], prog="lrag train-toy", error_prefix="lrag") or 0
    if argv[:1] == ["eval"]:
        from lrag.toy.evaluate import main as eval_main  # noqa: PLC0415

        return eval_main(argv[1:], prog="lrag eval", error_prefix="lrag") or 0
    if argv[:1] == ["train-toy-embedder"]:
        from lrag.toy.embedder import main as toy_embedder_main  # noqa: PLC0415

        return toy_embedder_main(argv[1:], prog="lrag train-toy-embedder", error_prefix="lrag") or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            return _cmd_inspect(args)
        return _cmd_generate(args)
    except UsageError as e:
        parser.exit(2, f"lrag: error: {e}\n")
    return 0
