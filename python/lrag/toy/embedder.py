"""Train a retrieval embedder on the toy world's frames (docs/toy_embedder.md).

    python -m lrag.toy.embedder --out RUN_DIR [--clips 64] [--frames 96] [--encoder pooled|ae] [--threads 1]
    lrag train-toy-embedder ...             (the same)

Writes ``--clips`` world clips of ``--frames`` frames (:func:`lrag.toy.world.make_clip`, frames used directly as
latents ``[T, 4, 16, 16]``) as ``RUN_DIR/data/clip_<i>.safetensors`` with ``RUN_DIR/data/clips.json`` (their seeds),
then trains on them with the library's trainer (:mod:`lrag_ext.embedder.train`: Window Temporal Delta Loss,
smoothness, reconstruction for the LatentAE; its checkpoints and ``log.json`` go to RUN_DIR). Clip seeds are drawn
from ``--seed`` in ``[2000, 2**63)``: seeds 0-999 are the evaluation's test clips and 1000-1999 its validation
and probe clips, so no training clip is ever evaluated. Every other option goes to the library trainer (``python
-m lrag_ext.embedder.train --help``) with toy defaults (:data:`TOY_DEFAULTS`) that a given option overrides.

At the end the best checkpoint is exported as ``RUN_DIR/toy_embedder.pt`` (``{"model", "config"}``, loadable with
:func:`lrag_ext.embedder.load_embedder`, ``weights_only``) with ``RUN_DIR/toy_embedder.json`` (command, sha256,
training cost, and the retrieval hit rates of :mod:`lrag.toy.keys` on validation clips, truth and corrupted,
next to the parameter-free keys).

Errors in the options exit with status 2 and ``<prog>: error: <message>`` before anything is written.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import numpy as np
import torch

from lrag.toy.world import WorldConfig, make_clip
from lrag_ext.embedder import train as lib
from lrag_ext.embedder.checkpoint import load_embedder
from lrag_ext.embedder.data import DataError
from lrag_ext.memory_format import sha256_file
from lrag_ext.state_dicts import InputFileError, check_output_dir

PROG = "python -m lrag.toy.embedder"
SEED_MIN = 2000             # training clip seeds are >= this: 0-999 test, 1000-1999 validation / probes
DATA_DIR = "data"
MANIFEST = "clips.json"
WEIGHTS_NAME = "toy_embedder.pt"
CARD_NAME = "toy_embedder.json"
DATA_FORMAT = "lrag-toy-embedder-data/1"
# The library trainer's options, sized for 4 x 16 x 16 frames and a few CPU minutes (SPEC.md §5 recipe otherwise:
# chunks of 8 frames, margin 0.85, window 3, smoothness weight 1, AdamW 3e-4 / 1e-4, clip 1.0). Given options win.
TOY_DEFAULTS = ("--encoder", "pooled", "--grid", "4", "--hidden-dims", "16,32", "--latent-dim", "64",
                "--batch-size", "64", "--epochs", "200", "--lr", "3e-3")
CARD_KEYS = ("mean", "pool4")                        # the parameter-free keys the card compares with
CARD_CORRUPTIONS = ("truth", "noise0.5", "noise1", "blur5", "shift2")


def clip_seeds(seed: int, clips: int) -> list[int]:
    """The training clips' seeds: ``clips`` draws in ``[SEED_MIN, 2**63)`` from ``numpy.random.default_rng(seed)``
    (disjoint from the evaluation's seeds 0-1999)."""
    return [int(s) for s in np.random.default_rng(seed).integers(SEED_MIN, 2 ** 63 - 1, size=clips)]


def write_clips(folder: str, seeds: list[int], frames: int, world: WorldConfig = WorldConfig()) -> list[str]:
    """Writes clip ``i`` (``make_clip(seeds[i], frames)``, float32 ``[T, C, H, W]`` under ``"latents"``) as
    ``folder/clip_<i>.safetensors`` and the seeds to ``folder/clips.json``; returns the clip paths. The files'
    bytes depend only on the seeds, ``frames`` and the world (and NumPy's sampler, see docs/toy_world.md)."""
    from safetensors.torch import save_file  # noqa: PLC0415
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, seed in enumerate(seeds):
        path = os.path.join(folder, f"clip_{i:04d}.safetensors")
        save_file({"latents": torch.from_numpy(make_clip(seed, frames, world)[0])}, path)
        paths.append(path)
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"format": DATA_FORMAT, "frames": frames, "seeds": seeds, "world": world.__dict__}, f, indent=1)
    return paths


def parse_args(argv: list[str], prog: str = PROG) -> tuple[argparse.Namespace, argparse.Namespace]:
    """``(toy options, library trainer options)``: the options of this command, and the rest parsed by
    :func:`lrag_ext.embedder.train.parse_args` after :data:`TOY_DEFAULTS`, with ``--data RUN_DIR/data``, ``--out``,
    ``--seed`` and ``--quiet`` set from the toy options. Exits with status 2 on an option neither knows."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=(
        "Every other option is the library trainer's (python -m lrag_ext.embedder.train --help), with the toy "
        f"defaults {' '.join(TOY_DEFAULTS)}."))
    p.add_argument("--out", required=True, help="run folder: data/, the trainer's checkpoints, toy_embedder.*")
    p.add_argument("--clips", type=int, default=64, help="training clips (the trainer holds out --val-split of them)")
    p.add_argument("--frames", type=int, default=96, help="frames per clip (> the longest period, 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the clips, the weights and the trainer's shuffling")
    p.add_argument("--eval-seeds", type=int, default=20, help="validation clips 1000.. the card's hit rates use (0: "
                                                            "none)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args, rest = p.parse_known_args(argv)
    if any(a == "--data" or a.startswith("--data=") for a in rest):
        p.error("--data is this command's own RUN_DIR/data (the world clips it writes); leave it out")
    lib_argv = [*TOY_DEFAULTS, *rest, "--data", os.path.join(args.out, DATA_DIR), "--out", args.out,
                "--seed", str(args.seed)] + (["--quiet"] if args.quiet else [])
    return args, lib.parse_args(lib_argv, prog)


def check_options(args: argparse.Namespace, lib_args: argparse.Namespace, world: WorldConfig = WorldConfig()) -> None:
    """Checks this command's options and the library trainer's (:func:`lrag_ext.embedder.train.check_options`,
    before the data folder exists). Writes nothing.

    Raises:
        lrag_ext.embedder.train.OptionError: naming the option. FileNotFoundError, InputFileError: ``--resume``.
    """
    rules = [("clips", args.clips >= 2, ">= 2 (the trainer holds out --val-split of the clips for validation)"),
             ("frames", args.frames >= max(lib_args.seq_len, world.period[1] + 1),
              f">= {max(lib_args.seq_len, world.period[1] + 1)} (--seq-len, and more than the longest period)"),
             ("seed", 0 <= args.seed < 2 ** 63, "in [0, 2**63)"),
             ("eval_seeds", 0 <= args.eval_seeds <= 1000, "in [0, 1000] (validation clips 1000..1999)"),
             ("threads", args.threads >= 0, ">= 0")]
    for name, ok, requirement in rules:
        if not ok:
            raise lib.OptionError(f"--{name.replace('_', '-')} must be {requirement}, got {getattr(args, name)!r}")
    if lib_args.encoder == "pooled" and lib_args.grid > world.size:
        raise lib.OptionError(f"--grid must be <= {world.size}, the side of the world's frames, got {lib_args.grid}")
    try:
        check_output_dir(args.out, "--out")
    except ValueError as e:
        raise lib.OptionError(str(e)) from None
    # the library's checks, but for the data folder (written next): every other option is checked here
    lib.check_options(argparse.Namespace(**{**vars(lib_args), "data": os.curdir}))


def export(run_dir: str, best: str) -> str:
    """Writes ``run_dir/toy_embedder.pt``: the best checkpoint's ``model`` and ``config`` only (no optimizer state),
    its ``data_dir`` made relative to the run folder. Returns the path."""
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    config = {**ckpt["config"], "data_dir": DATA_DIR}
    path = os.path.join(run_dir, WEIGHTS_NAME)
    torch.save({"model": ckpt["model"], "config": config, "epoch": ckpt["epoch"], "val_loss": ckpt["val_loss"]},
               path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def write_card(run_dir: str, weights: str, command: str, result: dict, seconds: dict, eval_seeds: int,
               seeds: list[int], frames: int) -> dict:
    """``run_dir/toy_embedder.json``: the weights' sha256, size and config, the command, the training's data, recipe,
    result and cost, and the hit rates (:func:`lrag.toy.keys.hit_rate_table`) of the embedder, ``mean`` and ``pool4`` on
    validation clips ``1000 .. 1000 + eval_seeds - 1``."""
    from lrag.toy.keys import hit_rate_table  # noqa: PLC0415
    model = load_embedder(weights)
    saved = torch.load(weights, map_location="cpu", weights_only=True)["config"]
    recipe = {k: v for k, v in saved.items() if k not in model.config.to_dict()}
    card = {"weights": os.path.basename(weights), "sha256": sha256_file(weights), "bytes": os.path.getsize(weights),
            "parameters": sum(p.numel() for p in model.parameters()),
            "encoder_parameters": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("decoder.")),
            "config": model.config.to_dict(), "command": command,
            "training": {"clips": len(seeds), "frames": frames,
                         "clip_seeds": f"numpy default_rng(--seed).integers({SEED_MIN}, 2**63-1)", "recipe": recipe,
                         "best_epoch": result["best_epoch"] + 1, "best_val_loss": result["best_val"],
                         "epochs": len(result["log"]), "torch_threads": torch.get_num_threads(), **seconds}}
    if eval_seeds:
        t0 = time.perf_counter()
        table = hit_rate_table([*CARD_KEYS, weights], CARD_CORRUPTIONS, range(1000, 1000 + eval_seeds))
        table["hit_rate"]["embedder"] = table["hit_rate"].pop(weights)
        card["hit_rates"] = {**table, "seconds": round(time.perf_counter() - t0, 1)}
    with open(os.path.join(run_dir, CARD_NAME), "w") as f:
        json.dump(card, f, indent=1)
    return card


def main(argv: list[str] | None = None, prog: str = PROG, error_prefix: str | None = None) -> int:
    """The command line: 0 after training; 2 after ``<error_prefix or prog>: error: <message>`` for a mistake in
    the options (nothing written)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, lib_args = parse_args(argv, prog)
    try:
        check_options(args, lib_args)
    except (lib.OptionError, InputFileError, FileNotFoundError) as err:
        print(f"{error_prefix or prog}: error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    seeds = clip_seeds(args.seed, args.clips)
    write_clips(lib_args.data, seeds, args.frames)
    t1 = time.perf_counter()
    try:
        prep = lib.prepare(lib_args)
    except (lib.OptionError, DataError, InputFileError, FileNotFoundError) as err:   # not expected: checked above
        print(f"{error_prefix or prog}: error: {err}", file=sys.stderr)
        return 2
    result = lib.train(lib_args, prep)
    t2 = time.perf_counter()
    weights = export(args.out, os.path.join(args.out, lib.BEST_NAME))
    card = write_card(args.out, weights, shlex.join(prog.split() + argv), result,
                      {"data_seconds": round(t1 - t0, 1), "train_seconds": round(t2 - t1, 1)}, args.eval_seeds, seeds,
                      args.frames)
    if not args.quiet:
        print(f"{weights}: sha256 {card['sha256']}, {card['bytes']} bytes, best epoch {card['training']['best_epoch']}"
              f" (val {result['best_val']:.5f}), training {t2 - t1:.0f} s", file=sys.stderr)
        if "hit_rates" in card:
            from lrag.toy.keys import format_table  # noqa: PLC0415
            print(format_table(card["hit_rates"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
