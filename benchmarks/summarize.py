"""Turns a pytest-benchmark JSON file into a markdown table: one row per case, one median column per provider,
plus ratios of a chosen provider against the others (ratio < 1: the chosen provider is faster).

    python benchmarks/summarize.py results.json [--ours lrag_ext]

Benchmarks must store ``provider`` and their case parameters in ``benchmark.extra_info``.
"""
from __future__ import annotations

import argparse
import json
from collections import OrderedDict

SKIP_KEYS = {"provider", "gb_per_s"}


def fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.1f}" if us < 1000 else f"{us:,.0f}"


def summarize(path: str, ours: str) -> str:
    with open(path) as f:
        runs = json.load(f)["benchmarks"]
    rows: "OrderedDict[tuple, dict]" = OrderedDict()
    providers: list[str] = []
    params: list[str] = []
    for r in runs:
        info = r.get("extra_info", {})
        if "provider" not in info:
            continue
        keys = [k for k in info if k not in SKIP_KEYS]
        params = params or keys
        case = tuple(info[k] for k in params)
        rows.setdefault(case, {})[info["provider"]] = r["stats"]["median"]
        if info["provider"] not in providers:
            providers.append(info["provider"])
    others = [p for p in providers if p != ours]
    head = params + [f"{p} µs" for p in providers] + [f"{ours}/{p}" for p in others]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, med in rows.items():
        cells = [str(c) for c in case] + [fmt_us(med[p]) if p in med else "–" for p in providers]
        for p in others:
            cells.append(f"{med[ours] / med[p]:.2f}" if ours in med and p in med else "–")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    ap.add_argument("--ours", default="lrag_ext")
    args = ap.parse_args()
    print(summarize(args.json, args.ours))
