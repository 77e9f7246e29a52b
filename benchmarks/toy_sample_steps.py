"""How many Euler steps the toy generator needs: the native (``sink``) rollouts of ``lrag eval`` on validation
clips, at several step counts, scored against the world's ground truth (docs/toy_training.md, "Sampling").

    python benchmarks/toy_sample_steps.py --weights python/lrag/toy/weights/toy_generator.safetensors \
        [--steps 4,8,16,32,64] [--val-seeds 1000-1009] [--blocks 40] [--out steps.json]

Per step count: the mean and 95 % bootstrap interval over the clips of the per-frame quality metrics
(``nearest_view_error``, ``palette_error``) and ``revisit_truth``, and the paired difference (same clip, same
initial noise: the Euler sampler draws no other noise) to the largest step count; plus the generation seconds.
Validation clips only (1000-...): the step count is a tunable, chosen where the test seeds are never looked at.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from lrag.toy.evaluate import Mode, Setup, VAL_SEEDS, default_prefix_blocks, interval, paired, parse_seeds, run_mode
from lrag.toy.train import load_toy_generator

METRICS = ("nearest_view_error", "palette_error", "revisit_truth")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--steps", default="4,8,16,32,64", help="step counts, comma separated")
    p.add_argument("--val-seeds", default=VAL_SEEDS)
    p.add_argument("--blocks", type=int, default=40)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, cfg = load_toy_generator(args.weights)
    seeds = parse_seeds(args.val_seeds, "--val-seeds")
    steps = sorted(int(s) for s in args.steps.split(","))
    records, seconds = {}, {}
    for n in steps:
        setup = Setup(model, cfg, default_prefix_blocks(cfg), n, "euler", args.batch)
        records[n], seconds[n] = run_mode(setup, Mode("sink", cfg.sink), seeds, args.blocks)
        print(f"{n} steps: {seconds[n]:.0f} s", file=sys.stderr)
    top = steps[-1]
    table = {}
    for n in steps:
        row = {"seconds": seconds[n]}
        for m in METRICS:
            values = [r["metrics"][m] for r in records[n]]
            diff = paired(values, [r["metrics"][m] for r in records[top]])
            row[m] = {**interval(values), f"minus_{top}": {k: diff[k] for k in ("mean", "low", "high", "n")}}
        table[n] = row
    report = {"weights": args.weights, "seeds": seeds, "blocks": args.blocks, "sampler": "euler",
              "mode": "sink", "threads": args.threads, "steps": table}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"| steps | {' | '.join(METRICS)} | seconds |")
    print("|---|" + "---|" * (len(METRICS) + 1))
    for n in steps:
        cells = []
        for m in METRICS:
            c, d = table[n][m], table[n][m][f"minus_{top}"]
            cells.append(f"{c['mean']:.3f} (vs {top}: {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}])")
        print(f"| {n} | {' | '.join(cells)} | {table[n]['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
