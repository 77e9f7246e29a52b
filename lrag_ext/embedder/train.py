"""Train an embedder (LatentAE or PooledEmbedder) with the Window Temporal Delta Loss.

    python -m lrag_ext.embedder.train --data LATENT_DIR --out RUN_DIR [--encoder ae|pooled] [--epochs 400]

Recipe of the reference (SPEC.md §5): random chunks of ``--seq-len 8`` consecutive frames, AdamW (lr 3e-4,
wd 1e-4, constant), grad-norm clip 1.0, mixed precision (float16 autocast + GradScaler) on GPU, 90/10 split by
file, best-by-validation checkpoint ``RUN_DIR/ae_epoch_best.pt`` in the reference's format (``epoch, model,
optimizer, scaler, config, val_loss``), ``RUN_DIR/last.pt`` after every epoch for ``--resume``, and a JSON log
``RUN_DIR/log.json`` (one record per epoch). Progress goes to stderr. With ``--resume`` the architecture comes
from the checkpoint's config (the architecture flags are ignored); the recipe and loss flags apply as given.

Every option is checked before anything is trained or written (:func:`prepare`): its range, the data folder and
files, ``--out`` writable, ``--device`` present, ``--resume`` loadable and fitting the data, ``--grid`` fitting
the latents. A mistake exits with status 2 and one line ``<prog>: error: <message naming the option or file>``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from lrag_ext.embedder.checkpoint import build_embedder, check_embedder_input, check_stages, check_state_strict
from lrag_ext.embedder.data import (DataError, list_latent_files, load_latent_video, random_chunk_index, split_files,
                                    stack_chunks, tiling_chunk_index)
from lrag_ext.embedder.losses import embedder_losses
from lrag_ext.progress import ProgressLine
from lrag_ext.state_dicts import (InputFileError, check_output_dir, check_regular_file, naming_file, parse_device,
                                  read_checkpoint)

PROG = "python -m lrag_ext.embedder.train"
BEST_NAME = "ae_epoch_best.pt"
LAST_NAME = "last.pt"
LOG_NAME = "log.json"
TERMS = ("total", "rec", "delta", "smooth")
RESUME_KEYS = ("epoch", "model", "optimizer", "config", "val_loss")


class OptionError(ValueError):
    """A command-line option outside its valid range, or not fitting the data (the message names it)."""


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    """Parses the options (types only; :func:`check_options` checks their ranges)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder of latent videos (.pt / .safetensors, [F, C, H, W])")
    p.add_argument("--out", required=True, help="run folder for checkpoints and log.json")
    p.add_argument("--encoder", choices=("ae", "pooled"), default="ae")
    p.add_argument("--hidden-dims", default="64,128,256", help="LatentAE widths, comma separated")
    p.add_argument("--latent-dim", type=int, default=None, help="embedding size (default 1024 ae, 256 pooled)")
    p.add_argument("--grid", type=int, default=4, help="pooled embedder grid size (at most the latents' side)")
    p.add_argument("--seq-len", type=int, default=8, help="frames per training chunk (>= 2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--chunks-per-video", type=int, default=0,
                   help="random chunks drawn per training video per epoch (0: frames // seq_len)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--grad-clip", type=float, default=1.0, help="grad-norm clip (inf: none)")
    p.add_argument("--delta-margin", type=float, default=0.85, help="cosine margin of the delta loss, in [-1, 1)")
    p.add_argument("--delta-weight", type=float, default=1.0)
    p.add_argument("--delta-window", type=int, default=3)
    p.add_argument("--smooth-weight", type=float, default=1.0)
    p.add_argument("--val-split", type=float, default=0.1, help="fraction of files for validation, in [0, 1)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on GPU")
    p.add_argument("--resume", default="", help="checkpoint to resume from (e.g. RUN_DIR/last.pt)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p.parse_args(argv)


def hidden_dims(text: str) -> list[int]:
    """``--hidden-dims`` as a list of widths.

    Raises:
        OptionError: not a comma-separated list of positive ints.
    """
    try:
        dims = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise OptionError(f"--hidden-dims must be comma-separated positive widths such as 64,128,256, got {text!r}")
    return dims


def check_options(args: argparse.Namespace) -> torch.device:
    """Checks every option that needs no data: ranges, ``--hidden-dims``, ``--device``, ``--out`` writable,
    ``--data`` a folder, ``--resume`` a regular file. Reads and writes nothing; returns the device.

    Raises:
        OptionError: naming the option. FileNotFoundError, InputFileError: ``--resume`` missing / not a file.
    """
    finite = math.isfinite
    rules = [("seq_len", args.seq_len >= 2, ">= 2 (the temporal losses compare the frames of a chunk)"),
             ("batch_size", args.batch_size >= 1, ">= 1"),
             ("epochs", args.epochs >= 1, ">= 1"),
             ("chunks_per_video", args.chunks_per_video >= 0, ">= 0 (0: frames // seq_len)"),
             ("latent_dim", args.latent_dim is None or args.latent_dim >= 1, ">= 1"),
             ("grid", args.grid >= 1, ">= 1"),
             ("delta_window", args.delta_window >= 1, ">= 1"),
             ("lr", finite(args.lr) and args.lr > 0, "a finite number > 0"),
             ("weight_decay", finite(args.weight_decay) and args.weight_decay >= 0, "a finite number >= 0"),
             ("grad_clip", args.grad_clip > 0, "> 0 (inf: no clipping)"),
             ("delta_margin", -1 <= args.delta_margin < 1, "in [-1, 1) (a cosine similarity)"),
             ("delta_weight", finite(args.delta_weight) and args.delta_weight >= 0, "a finite number >= 0"),
             ("smooth_weight", finite(args.smooth_weight) and args.smooth_weight >= 0, "a finite number >= 0"),
             ("val_split", 0 <= args.val_split < 1,
              "in [0, 1) (the fraction of files held out for validation; 0: none)"),
             ("seed", 0 <= args.seed < 2 ** 63, "in [0, 2**63)")]
    for name, ok, requirement in rules:
        if not ok:
            raise OptionError(f"--{name.replace('_', '-')} must be {requirement}, got {getattr(args, name)!r}")
    hidden_dims(args.hidden_dims)
    if args.encoder == "pooled" and args.delta_weight == 0 and args.smooth_weight == 0:
        raise OptionError("--delta-weight 0 and --smooth-weight 0 leave the pooled embedder no loss to train on")
    try:
        device = parse_device(args.device, "--device")
        check_output_dir(args.out, "--out")
    except ValueError as e:
        raise OptionError(str(e)) from None
    if not os.path.isdir(args.data):
        raise OptionError(f"--data {os.fspath(args.data)!r} does not exist or is not a folder")
    if args.resume:
        check_regular_file(args.resume, "--resume")
    return device


def model_config(args: argparse.Namespace, video: torch.Tensor) -> dict:
    """The config dict stored in checkpoints: architecture (from the data's shape) + loss + recipe fields."""
    _, c, h, w = video.shape
    losses = dict(delta_margin=args.delta_margin, delta_weight=args.delta_weight, delta_window=args.delta_window,
                  smooth_weight=args.smooth_weight)
    if args.encoder == "pooled":
        arch = dict(encoder="pooled", in_channels=c, grid=args.grid,
                    latent_dim=256 if args.latent_dim is None else args.latent_dim)
    else:
        arch = dict(encoder="ae", in_channels=c, spatial_h=h, spatial_w=w,
                    latent_dim=1024 if args.latent_dim is None else args.latent_dim,
                    hidden_dims=hidden_dims(args.hidden_dims))
    recipe = dict(seq_len=args.seq_len, batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                  weight_decay=args.weight_decay, grad_clip=args.grad_clip, val_split=args.val_split,
                  seed=args.seed, data_dir=os.fspath(args.data))
    return {**arch, **losses, **recipe}


class Progress:
    """Running means of the loss terms over an epoch, shown on the project's progress line
    (:class:`lrag_ext.progress.ProgressLine`) with samples per second."""

    def __init__(self, label: str, total: int, enabled: bool = True, stream=sys.stderr):
        self.line = ProgressLine(label, total, unit="chunk", stream=stream, enabled=enabled)
        self.sums = dict.fromkeys(TERMS, 0.0)
        self.n = 0

    def update(self, terms: dict[str, float], weight: int = 1) -> None:
        for k in TERMS:
            self.sums[k] += terms[k] * weight
        self.n += weight
        rate = self.n / max(self.line.elapsed(), 1e-9)
        self.line.show(self.n, " ".join(f"{k} {v:.4f}" for k, v in self.means().items()) + f" ({rate:.1f}/s)")

    def means(self) -> dict[str, float]:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}

    def close(self) -> None:
        self.line.close()


def save_checkpoint(path: str, model, optimizer, scaler, config: dict, epoch: int, val_loss: float,
                    extra: dict | None = None) -> None:
    """Writes the reference's checkpoint format (atomically: a temporary file, then a rename)."""
    obj = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
           "scaler": scaler.state_dict(), "config": config, "val_loss": val_loss, **(extra or {})}
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def evaluate(model, videos, index, args, device, amp) -> dict[str, float]:
    model.eval()
    meter = Progress("  val", len(index), enabled=False)
    with torch.no_grad():
        for i in range(0, len(index), args.batch_size):
            part = index[i:i + args.batch_size]
            chunk = stack_chunks(videos, part, args.seq_len).to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                t = embedder_losses(model, chunk, args.delta_margin, args.delta_window, args.delta_weight,
                                    args.smooth_weight)
            meter.update(t.as_floats(), len(part))
    return meter.means()


@dataclass
class Prepared:
    """What :func:`prepare` checked and built: the data split, the model, its optimizer, and where to start."""

    config: dict
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: bool
    train_files: list[str]
    val_files: list[str]
    train_videos: list[torch.Tensor]
    val_videos: list[torch.Tensor]
    start_epoch: int = 0
    best_val: float = math.inf
    best_epoch: int = -1
    log: list = field(default_factory=list)


def _load_data(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    files = list_latent_files(args.data)
    for f in files:                      # a FIFO or device file named *.pt must not be opened (it could block)
        check_regular_file(f, "latent file")
    videos = {f: load_latent_video(f, min_frames=args.seq_len) for f in files}
    first = files[0]
    for f, v in videos.items():
        if v.shape[1:] != videos[first].shape[1:]:
            raise DataError(f"{f}: frame shape {tuple(v.shape[1:])} differs from {tuple(videos[first].shape[1:])} "
                            f"of {first}; all latent videos must share [C, H, W]")
    return videos


def _optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Every per-parameter state tensor of a loaded optimizer (AdamW's moments) has its parameter's shape: a
    mismatch would only fail at the first step, after the run started writing."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                    raise ValueError(f"its optimizer state {name!r} has shape {list(value.shape)} for a parameter "
                                     f"of shape {list(p.shape)}")


def _resume(args: argparse.Namespace, device: torch.device, scaler: torch.amp.GradScaler,
            frame_shape: tuple[int, int, int]) -> dict:
    """The :class:`Prepared` fields ``--resume`` gives: config, model, optimizer (and ``scaler``'s state), the
    epoch to start from, the best validation so far and the log."""
    ckpt = read_checkpoint(args.resume, what="--resume")
    with naming_file(args.resume, "--resume"):
        missing = [k for k in RESUME_KEYS if k not in ckpt]
        if missing:
            raise ValueError(f"not a checkpoint of this trainer: no {missing} entries (keys: {sorted(map(str, ckpt))})")
        config = ckpt["config"]
        if not isinstance(config, dict):
            raise TypeError(f"its 'config' must be a dict, got {type(config).__name__}")
        if config.get("encoder", "ae") != args.encoder:
            raise ValueError(f"a {config.get('encoder', 'ae')!r} embedder, not --encoder {args.encoder!r}")
        if not isinstance(ckpt["model"], dict):
            raise TypeError(f"its 'model' must be a state dict, got {type(ckpt['model']).__name__}")
        check_stages(config, ckpt["model"])
        with torch.device("meta"):
            meta = build_embedder(config)
        check_state_strict(meta, ckpt["model"])
        c, h, w = frame_shape
        check_embedder_input(meta.config, c, h, w)
        if args.encoder == "ae" and (meta.config.spatial_h, meta.config.spatial_w) != (h, w):
            raise ValueError(f"trained on {meta.config.spatial_h} x {meta.config.spatial_w} latents, the data's are "
                             f"{h} x {w}")
        model = build_embedder(config).to(device)
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer = _optimizer(model, args)
        optimizer.load_state_dict(ckpt["optimizer"])
        _check_optimizer_state(optimizer)
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        state = dict(config=config, model=model, optimizer=optimizer, start_epoch=int(ckpt["epoch"]) + 1,
                     best_val=float(ckpt.get("best_val", ckpt["val_loss"])),
                     best_epoch=int(ckpt.get("best_epoch", ckpt["epoch"])), log=list(ckpt.get("log", [])))
    if state["start_epoch"] >= args.epochs:
        raise OptionError(f"--epochs {args.epochs}: the --resume checkpoint has already finished epoch "
                          f"{state['start_epoch']}, nothing is left to train")
    return state


def prepare(args: argparse.Namespace) -> Prepared:
    """Checks every option (:func:`check_options`), loads the data and ``--resume``, checks that the embedder fits
    the latents, and builds the model and optimizer. Writes nothing.

    Raises:
        OptionError: an option out of range or not fitting the data (named).
        DataError: an unusable data folder or latent file (named).
        FileNotFoundError, lrag_ext.state_dicts.InputFileError: ``--resume`` (or a latent file) missing or not a
            usable checkpoint of this trainer (named).
    """
    device = check_options(args)
    videos = _load_data(args)
    files = list(videos)
    train_files, val_files = split_files(files, args.val_split, args.seed)
    c, h, w = videos[files[0]].shape[1:]
    if args.encoder == "pooled" and args.grid > min(h, w):
        raise OptionError(f"--grid must be <= {min(h, w)}, the smaller side of the {h} x {w} latents of --data, "
                          f"got {args.grid}")
    amp = device.type == "cuda" and not args.no_amp
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    train_videos = [videos[f] for f in train_files]
    torch.manual_seed(args.seed)
    if args.resume:
        state = _resume(args, device, scaler, (c, h, w))
    else:
        config = model_config(args, train_videos[0])
        model = build_embedder(config).to(device)
        state = dict(config=config, model=model, optimizer=_optimizer(model, args))
    return Prepared(**state, scaler=scaler, device=device, amp=amp, train_files=train_files, val_files=val_files,
                    train_videos=train_videos, val_videos=[videos[f] for f in val_files])


def train(args: argparse.Namespace, prep: Prepared | None = None) -> dict:
    """Runs the training described by ``args`` (prepared by :func:`prepare` unless ``prep`` is given); returns
    ``{"best_val", "best_epoch", "log", "out"}``.

    Raises:
        As :func:`prepare`, before anything is trained or written.
    """
    prep = prep or prepare(args)
    model, optimizer, scaler, device, amp = prep.model, prep.optimizer, prep.scaler, prep.device, prep.amp
    config, train_videos, val_videos = prep.config, prep.train_videos, prep.val_videos
    start_epoch, best_val, best_epoch, log = prep.start_epoch, prep.best_val, prep.best_epoch, prep.log

    os.makedirs(args.out, exist_ok=True)
    per_video = args.chunks_per_video or None
    gen = torch.Generator().manual_seed(args.seed + start_epoch)
    val_index = tiling_chunk_index([v.shape[0] for v in val_videos], args.seq_len)
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        model.train()
        lengths = [v.shape[0] for v in train_videos]
        counts = [per_video or max(1, n // args.seq_len) for n in lengths]  # default: chunks that fit end to end
        chunk_index = random_chunk_index(lengths, args.seq_len, counts, gen)
        bar = Progress(f"epoch {epoch + 1}/{args.epochs}", len(chunk_index), enabled=not args.quiet)
        for i in range(0, len(chunk_index), args.batch_size):
            part = chunk_index[i:i + args.batch_size]
            chunk = stack_chunks(train_videos, part, args.seq_len).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                terms = embedder_losses(model, chunk, args.delta_margin, args.delta_window, args.delta_weight,
                                        args.smooth_weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms.total).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            bar.update(terms.as_floats(), len(part))
        bar.close()
        train_means = bar.means()
        val_means = evaluate(model, val_videos, val_index, args, device, amp) if val_index else train_means
        record = {"epoch": epoch, "train": train_means, "val": val_means, "seconds": time.perf_counter() - t0}
        log.append(record)
        if val_means["total"] < best_val:
            best_val, best_epoch = val_means["total"], epoch
            save_checkpoint(os.path.join(args.out, BEST_NAME), model, optimizer, scaler, config, epoch,
                            val_means["total"])
        save_checkpoint(os.path.join(args.out, LAST_NAME), model, optimizer, scaler, config, epoch,
                        val_means["total"], extra={"best_val": best_val, "best_epoch": best_epoch, "log": log})
        with open(os.path.join(args.out, LOG_NAME), "w") as f:
            json.dump({"config": config, "train_files": prep.train_files, "val_files": prep.val_files,
                       "epochs": log}, f, indent=1)
        if not args.quiet:
            print(f"epoch {epoch + 1}: train {train_means['total']:.5f} val {val_means['total']:.5f} "
                  f"(best {best_val:.5f} @ {best_epoch + 1})", file=sys.stderr)
    return {"best_val": best_val, "best_epoch": best_epoch, "log": log, "out": args.out}


def main(argv: list[str] | None = None, prog: str = PROG, error_prefix: str | None = None) -> int:
    """The command line: 0 after training; 2 after printing ``<error_prefix or prog>: error: <message>`` for a
    mistake in the options or inputs (nothing trained or written)."""
    args = parse_args(argv, prog)
    try:
        prep = prepare(args)
    except (OptionError, DataError, InputFileError, FileNotFoundError) as err:
        print(f"{error_prefix or prog}: error: {err}", file=sys.stderr)
        return 2
    train(args, prep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
