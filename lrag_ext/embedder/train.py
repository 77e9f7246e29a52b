"""Train an embedder (LatentAE or PooledEmbedder) with the Window Temporal Delta Loss.

    python -m lrag_ext.embedder.train --data LATENT_DIR --out RUN_DIR [--encoder ae|pooled] [--epochs 400]

Recipe of the reference (SPEC.md §5): random chunks of ``--seq-len 8`` consecutive frames, AdamW (lr 3e-4,
wd 1e-4, constant), grad-norm clip 1.0, mixed precision (float16 autocast + GradScaler) on GPU, 90/10 split by
file, best-by-validation checkpoint ``RUN_DIR/ae_epoch_best.pt`` in the reference's format (``epoch, model,
optimizer, scaler, config, val_loss``), ``RUN_DIR/last.pt`` after every epoch for ``--resume``, and a JSON log
``RUN_DIR/log.json`` (one record per epoch). Progress goes to stderr. With ``--resume`` the architecture comes
from the checkpoint's config (the architecture flags are ignored); the recipe and loss flags apply as given.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from lrag_ext.embedder.checkpoint import build_embedder, load_state_strict, read_checkpoint
from lrag_ext.embedder.data import (list_latent_files, load_latent_video, random_chunk_index, split_files,
                                    stack_chunks, tiling_chunk_index)
from lrag_ext.embedder.losses import embedder_losses

BEST_NAME = "ae_epoch_best.pt"
LAST_NAME = "last.pt"
LOG_NAME = "log.json"
TERMS = ("total", "rec", "delta", "smooth")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lrag_ext.embedder.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder of latent videos (.pt / .safetensors, [F, C, H, W])")
    p.add_argument("--out", required=True, help="run folder for checkpoints and log.json")
    p.add_argument("--encoder", choices=("ae", "pooled"), default="ae")
    p.add_argument("--hidden-dims", default="64,128,256", help="LatentAE widths, comma separated")
    p.add_argument("--latent-dim", type=int, default=None, help="embedding size (default 1024 ae, 256 pooled)")
    p.add_argument("--grid", type=int, default=4, help="pooled embedder grid size")
    p.add_argument("--seq-len", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--chunks-per-video", type=int, default=0,
                   help="random chunks drawn per training video per epoch (0: frames // seq_len)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--delta-margin", type=float, default=0.85)
    p.add_argument("--delta-weight", type=float, default=1.0)
    p.add_argument("--delta-window", type=int, default=3)
    p.add_argument("--smooth-weight", type=float, default=1.0)
    p.add_argument("--val-split", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on GPU")
    p.add_argument("--resume", default="", help="checkpoint to resume from (e.g. RUN_DIR/last.pt)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    for name in ("seq_len", "batch_size", "epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def model_config(args: argparse.Namespace, video: torch.Tensor) -> dict:
    """The config dict stored in checkpoints: architecture (from the data's shape) + loss + recipe fields."""
    _, c, h, w = video.shape
    losses = dict(delta_margin=args.delta_margin, delta_weight=args.delta_weight, delta_window=args.delta_window,
                  smooth_weight=args.smooth_weight)
    if args.encoder == "pooled":
        arch = dict(encoder="pooled", in_channels=c, grid=args.grid, latent_dim=args.latent_dim or 256)
    else:
        arch = dict(encoder="ae", in_channels=c, spatial_h=h, spatial_w=w, latent_dim=args.latent_dim or 1024,
                    hidden_dims=[int(v) for v in args.hidden_dims.split(",") if v.strip()])
    recipe = dict(seq_len=args.seq_len, batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                  weight_decay=args.weight_decay, grad_clip=args.grad_clip, val_split=args.val_split,
                  seed=args.seed, data_dir=os.fspath(args.data))
    return {**arch, **losses, **recipe}


class Progress:
    """A one-line stderr progress printer: step counter, running means of the loss terms, steps/s."""

    def __init__(self, label: str, total: int, enabled: bool = True, stream=sys.stderr):
        self.label, self.total, self.enabled, self.stream = label, total, enabled, stream
        self.sums = dict.fromkeys(TERMS, 0.0)
        self.n = 0
        self.t0 = time.perf_counter()

    def update(self, terms: dict[str, float], weight: int = 1) -> None:
        for k in TERMS:
            self.sums[k] += terms[k] * weight
        self.n += weight
        if self.enabled:
            rate = self.n / max(time.perf_counter() - self.t0, 1e-9)
            text = " ".join(f"{k} {v:.4f}" for k, v in self.means().items())
            self.stream.write(f"\r{self.label} [{self.n}/{self.total}] {text} ({rate:.1f}/s)")
            self.stream.flush()

    def means(self) -> dict[str, float]:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


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


def train(args: argparse.Namespace) -> dict:
    """Runs the training described by ``args``; returns ``{"best_val", "best_epoch", "log", "out"}``."""
    files = list_latent_files(args.data)
    videos = {f: load_latent_video(f, min_frames=args.seq_len) for f in files}
    first = files[0]
    for f, v in videos.items():
        if v.shape[1:] != videos[first].shape[1:]:
            raise ValueError(f"{f}: frame shape {tuple(v.shape[1:])} differs from {tuple(videos[first].shape[1:])} "
                             f"of {first}; all latent videos must share [C, H, W]")
    train_files, val_files = split_files(files, args.val_split, args.seed)
    train_videos = [videos[f] for f in train_files]
    val_videos = [videos[f] for f in val_files]
    device = torch.device(args.device)
    amp = device.type == "cuda" and not args.no_amp
    torch.manual_seed(args.seed)

    start_epoch, best_val, best_epoch, log = 0, math.inf, -1, []
    resume = read_checkpoint(args.resume) if args.resume else None
    config = resume["config"] if resume else model_config(args, train_videos[0])
    if resume and config.get("encoder", "ae") != args.encoder:
        raise ValueError(f"--resume checkpoint is a {config.get('encoder', 'ae')!r} embedder, not {args.encoder!r}")
    model = build_embedder(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    if resume:
        load_state_strict(model, resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        start_epoch = int(resume["epoch"]) + 1
        best_val = float(resume.get("best_val", resume["val_loss"]))
        best_epoch = int(resume.get("best_epoch", resume["epoch"]))
        log = list(resume.get("log", []))

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
            json.dump({"config": config, "train_files": train_files, "val_files": val_files, "epochs": log}, f,
                      indent=1)
        if not args.quiet:
            print(f"epoch {epoch + 1}: train {train_means['total']:.5f} val {val_means['total']:.5f} "
                  f"(best {best_val:.5f} @ {best_epoch + 1})", file=sys.stderr)
    return {"best_val": best_val, "best_epoch": best_epoch, "log": log, "out": args.out}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
