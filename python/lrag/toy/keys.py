"""How well a retrieval key finds the place being generated, measured on clips without any generator
(docs/toy_embedder.md).

For every block start ``s`` of a clip the reference schedule (SPEC.md §3) retrieves, by cosine similarity of
the key, the ``top_k`` frames closest to the query frame ``s - 1`` among the candidates ``[sink, sink + max(0, s -
window) - recent_exclude)`` (frames evicted from the attention window, minus the recency guard). The *hit rate*
(:func:`lrag.toy.metrics.retrieval_hit_rate`) is the fraction of retrieved frames whose phase is within 1 of the
block's: it says how well the key tells places apart, the part of retrieval that needs no generator. Frames can
be the clip's ground truth or a corrupted copy of it (:func:`corrupt`: Gaussian noise, blur), standing for what a
weak generator draws.

    python -m lrag.toy.keys --keys mean,pool4,python/lrag/toy/weights/toy_embedder.pt [--corruptions truth,noise0.5]

prints the table (and ``--json PATH`` writes it). Keys are :func:`lrag.toy.evaluate.make_embedder` specs.
Top-k is :func:`lrag_ext.reference.cosine_topk`, the semantics of the library's retrieval (ties to the lower
frame id).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lrag.toy.metrics import hit_rate_chance, retrieval_hit_rate
from lrag.toy.world import ClipMeta, WorldConfig, make_clip
from lrag_ext.policy import RetrievalPolicy
from lrag_ext.reference import cosine_topk

PROG = "python -m lrag.toy.keys"
VAL_SEEDS = range(1000, 1020)     # validation clips: the evaluation's test seeds are 0-999
CORRUPTIONS = ("truth", "noise0.5", "noise1", "blur5", "blur9")


@dataclass(frozen=True)
class Schedule:
    """The reference retrieval schedule (SPEC.md §3) and the block starts it is measured at."""

    sink: int = 1
    window: int = 12
    recent_exclude: int = 5
    top_k: int = 6
    frames_per_block: int = 3
    first_block: int = 33          # the evaluation's default prefix (11 blocks): retrieval starts here
    num_frames: int = 153          # 40 blocks after it

    def block_starts(self) -> list[int]:
        return list(range(self.first_block, self.num_frames - self.frames_per_block + 1, self.frames_per_block))

    def candidates(self, s: int) -> tuple[int, int]:
        """The half-open range of global frames that may be retrieved for the block starting at ``s``
        (:meth:`lrag_ext.policy.RetrievalPolicy.eligible_range`; empty before anything is eligible)."""
        return RetrievalPolicy(self.top_k, self.recent_exclude, self.sink, self.window).eligible_range(s)


def _shift(frames: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Each frame translated by its own random offset in ``[-n, n]`` pixels per axis, edges replicated."""
    T, _, H, W = frames.shape
    padded = F.pad(frames, (n, n, n, n), mode="replicate")
    dy, dx = torch.randint(0, 2 * n + 1, (2, T), generator=gen).tolist()
    return torch.stack([padded[t, :, dy[t]:dy[t] + H, dx[t]:dx[t] + W] for t in range(T)])


def corrupt(frames: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """``frames [T, C, H, W]`` (float32) as ``kind`` names, steps joined by ``+`` applied left to right:
    ``"truth"`` (unchanged), ``"noise<std>"`` (plus Gaussian noise of that std, independent per element),
    ``"blur<n>"`` (a box blur of ``n x n`` pixels, ``n`` odd, averaging only the pixels inside the frame) or
    ``"shift<n>"`` (each frame translated by a random offset of up to ``n`` pixels per axis, edges replicated: a
    misplaced camera). Random draws come from ``torch.Generator().manual_seed(seed)``.

    Raises:
        ValueError: an unknown kind.
    """
    gen = torch.Generator().manual_seed(int(seed))
    for step in kind.split("+"):
        m = re.fullmatch(r"(noise|blur|shift)(\d+(?:\.\d+)?)", step)
        if step == "truth":
            continue
        if m and m.group(1) == "noise":
            frames = frames + float(m.group(2)) * torch.randn(frames.shape, generator=gen)
        elif m and m.group(1) == "blur" and m.group(2).isdigit() and int(m.group(2)) % 2:
            n = int(m.group(2))
            frames = F.avg_pool2d(frames, n, stride=1, padding=n // 2, count_include_pad=False)
        elif m and m.group(1) == "shift" and m.group(2).isdigit():
            frames = _shift(frames, int(m.group(2)), gen)
        else:
            raise ValueError(f"corruption {kind!r}: {step!r} is not 'truth', 'noise<std>' (e.g. noise0.5), "
                             "'blur<odd n>' (e.g. blur5) or 'shift<n>' (e.g. shift2); steps join with '+'")
    return frames


def retrieve(keys: torch.Tensor, schedule: Schedule) -> tuple[list[int], list[list[int]]]:
    """``(block_starts, retrieved global frame ids)`` of one clip whose frames have the keys ``[T, D]``: per block
    the cosine top-k (:func:`lrag_ext.reference.cosine_topk`, all blocks as one batch) of the query frame ``s - 1``
    over :meth:`Schedule.candidates`. Blocks without a candidate retrieve nothing."""
    starts = schedule.block_starts()
    if not starts:
        return [], []
    keys = keys.float()
    bounds = torch.tensor([schedule.candidates(s) for s in starts], dtype=torch.int64)
    lo, hi = bounds[:, 0], bounds[:, 1]
    queries = keys[torch.tensor(starts) - 1]
    page_table = torch.zeros(len(starts), 1, dtype=torch.int32)        # one page holding every frame
    _, ids = cosine_topk(queries, keys[None], page_table, lo, hi, schedule.top_k)
    return starts, [[int(g) for g in row if g >= 0] for row in ids]


def oracle_hit_rate(meta: ClipMeta, schedule: Schedule, tolerance: int = 1) -> float:
    """The best hit rate any retrieval can reach on this clip: per block ``min(k, hit candidates) / k`` with ``k =
    min(top_k, candidates)``, pooled over blocks like :func:`retrieval_hit_rate`."""
    P, first = meta.period, int(meta.phase[0])
    hits = total = 0
    for s in schedule.block_starts():
        lo, hi = schedule.candidates(s)
        k = min(schedule.top_k, hi - lo)
        if not k:
            continue
        block = (first + s + np.arange(schedule.frames_per_block)) % P
        d = np.abs((first + np.arange(lo, hi))[:, None] % P - block[None]) % P          # as retrieval_hit_rate
        good = int((np.minimum(d, P - d).min(axis=1) <= tolerance).sum())
        hits, total = hits + min(k, good), total + k
    return hits / total if total else math.nan


def phase_keys(meta: ClipMeta) -> torch.Tensor:
    """``[T, 2]``: each frame's phase on the unit circle, ``(cos, sin)(2 pi p(t) / P)``. Their cosine similarity
    falls with the circular phase distance, so retrieval with these keys ranks candidates by how close their place
    is to the query's, in either direction (ties to the older frame): a reference for a key that knows every frame's
    place exactly but not which way the camera turns (a frame alone does not tell), which ranks the places just
    before the query's, misses, with those just after it, hits. Frame keys can land a little above or below it by
    how they order those near-ties."""
    angle = 2 * math.pi * torch.from_numpy(meta.phase).double() / meta.period
    return torch.stack([angle.cos(), angle.sin()], dim=1)


def hit_rates(embed: Callable[[torch.Tensor], torch.Tensor], seeds: Sequence[int] = VAL_SEEDS,
              corruption: str = "truth", schedule: Schedule = Schedule(),
              world: WorldConfig = WorldConfig()) -> dict:
    """The key ``embed`` (``[N, C, H, W] -> [N, D]``) on clips ``seeds`` of ``schedule.num_frames`` frames, their
    frames corrupted as ``corruption`` names (:func:`corrupt`, noise seeded by the clip seed): ``{"hit_rate",
    "chance", "oracle", "per_clip"}``, the means over clips of :func:`retrieval_hit_rate`,
    :func:`hit_rate_chance` and :func:`oracle_hit_rate` (clips with no retrieval left out of the mean), and the
    per-clip hit rates; ``"phase_key"``: the mean hit rate with :func:`phase_keys` (a direction-blind exact-place
    reference)."""
    rates, chances, oracles, phase = [], [], [], []
    for seed in seeds:
        frames, meta = make_clip(int(seed), schedule.num_frames, world)
        x = corrupt(torch.from_numpy(frames), corruption, int(seed))
        with torch.no_grad():
            keys = embed(x)
        starts, retrieved = retrieve(keys, schedule)
        rates.append(retrieval_hit_rate(meta, starts, retrieved, schedule.frames_per_block))
        chances.append(hit_rate_chance(meta.period, schedule.frames_per_block))
        oracles.append(oracle_hit_rate(meta, schedule))
        phase.append(retrieval_hit_rate(meta, *retrieve(phase_keys(meta), schedule), schedule.frames_per_block))

    def mean(v):
        v = [x for x in v if math.isfinite(x)]
        return float(np.mean(v)) if v else math.nan

    return {"hit_rate": mean(rates), "chance": mean(chances), "oracle": mean(oracles), "phase_key": mean(phase),
            "per_clip": rates}


def hit_rate_table(keys: Sequence[str], corruptions: Sequence[str] = CORRUPTIONS, seeds: Sequence[int] = VAL_SEEDS,
                   schedule: Schedule = Schedule(), world: WorldConfig = WorldConfig()) -> dict:
    """``{"seeds", "schedule", "chance", "oracle", "phase_key", "hit_rate": {key: {corruption: rate}}}`` for every
    key spec (:func:`lrag.toy.evaluate.make_embedder`) on every corruption (:func:`hit_rates`)."""
    from lrag.toy.evaluate import make_embedder  # noqa: PLC0415  (it imports the generator's stack)
    for kind in corruptions:
        corrupt(torch.zeros(1, 1, 1, 1), kind, 0)                           # an unknown kind fails before any work
    embedders = {k: make_embedder(k, world.channels, world.size) for k in keys}
    table = {k: {} for k in keys}
    bounds = {}
    for kind in corruptions:
        for k, embed in embedders.items():
            r = hit_rates(embed, seeds, kind, schedule, world)
            table[k][kind] = r["hit_rate"]
            bounds = {name: r[name] for name in ("chance", "phase_key", "oracle")}    # the same for every key
    return {"seeds": [int(s) for s in seeds], "schedule": schedule.__dict__, **bounds, "hit_rate": table}


def format_table(result: dict) -> str:
    """The table of :func:`hit_rate_table` as Markdown (one row per key)."""
    corruptions = list(next(iter(result["hit_rate"].values())))
    lines = ["| key | " + " | ".join(corruptions) + " |", "|---" * (len(corruptions) + 1) + "|"]
    for key, row in result["hit_rate"].items():
        lines.append(f"| `{key}` | " + " | ".join(f"{row[c]:.3f}" for c in corruptions) + " |")
    for name in ("chance", "phase_key", "oracle"):
        lines.append(f"| {name} | " + " | ".join(f"{result[name]:.3f}" for _ in corruptions) + " |")
    return "\n".join(lines)


def _seeds(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command line: prints the Markdown table; 2 after ``<prog>: error: <message>`` for a bad option."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", default="mean,pool4", help="comma-separated key specs: mean, pool<g>, checkpoint paths")
    p.add_argument("--corruptions", default=",".join(CORRUPTIONS), help="truth, noise<std>, blur<odd n>")
    p.add_argument("--seeds", default=f"{VAL_SEEDS[0]}-{VAL_SEEDS[-1]}", help="clip seeds (e.g. 1000-1019)")
    p.add_argument("--json", default="", help="also write the result to this JSON file")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    try:
        seeds = _seeds(args.seeds)
        if not seeds or min(seeds) < 0:
            raise ValueError("no seed")
    except ValueError:
        print(f"{prog}: error: --seeds must be non-negative ints or ranges such as 1000-1019, got {args.seeds!r}",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = hit_rate_table([k for k in args.keys.split(",") if k],
                                [c for c in args.corruptions.split(",") if c], seeds)
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
