"""The streaming generation run behind ``lrag generate``: blocks -> frames -> MP4, plus the run's logs.

Per block (:func:`stream_blocks`, inside the generation's block callback: :meth:`lrag.pipeline.Pipeline.generate`
for a real run, the toy evaluation's rollout for the demo) the latents are rendered to RGB (Wan VAE or the demo's
panels), appended to the MP4 and their timings and memory record kept. The JSON files and the
plot are written in a ``finally``: an interrupted run (Ctrl-C) still leaves a playable video of the finished
blocks and logs that describe exactly those blocks.

Outputs in ``out_dir``: ``<mode>.mp4`` per mode, ``memory_log.json`` (the ``rag`` run's per-block retrieval
records), ``timings.json`` (per block and summary, per mode), ``retrieval.png``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from lrag_ext.progress import ProgressLine

from lrag.pipeline import BlockResult, Pipeline
from lrag.video import FPS, TEMPORAL_STRIDE, VideoWriter

Renderer = Callable[[BlockResult], np.ndarray]       # a finished block (latents [1, F, C, H, W]) -> uint8 [N, H, W, 3]
PHASES = ("retrieval", "denoise", "rerun", "memory", "decode", "write", "total")


def block_seconds(frames_per_block: int) -> float:
    """Video seconds of one block: ``frames_per_block`` latent frames x 4 video frames / 16 fps (0.75 s)."""
    return frames_per_block * TEMPORAL_STRIDE / FPS


def blocks_for_seconds(seconds: float, frames_per_block: int) -> int:
    """Whole blocks covering ``seconds`` of video (rounded up).

    Raises:
        ValueError: ``seconds`` is not a finite number > 0.
    """
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"--seconds must be a finite number > 0, got {seconds!r}")
    return max(1, math.ceil(seconds / block_seconds(frames_per_block) - 1e-9))


class Progress:
    """The generation's progress line (:class:`lrag_ext.progress.ProgressLine`): blocks done, seconds per block,
    the share of block time spent in retrieval and memory, ETA."""

    def __init__(self, label: str, total: int, stream=sys.stderr, enabled: bool = True):
        self.line = ProgressLine(label, total, unit="block", stream=stream, enabled=enabled)
        self.retrieval = self.block_time = 0.0

    def update(self, done: int, timings: dict) -> None:
        self.retrieval += timings["retrieval"] + timings["memory"]
        self.block_time += timings["total"]
        share = 100 * self.retrieval / max(self.block_time, 1e-12)
        self.line.show(done, f"{self.line.elapsed() / max(done, 1):.2f} s/block  retrieval {share:.1f}% of block time")

    def close(self) -> None:
        self.line.close()


@dataclass
class ModeRun:
    """What one mode's run produced (filled block by block, so it is valid after an interruption)."""

    mode: str
    num_blocks: int
    video: str
    blocks: list = field(default_factory=list)        # per block: {"block", phase seconds...}
    records: list = field(default_factory=list)       # memory records of the blocks with a retrieval
    frames_written: int = 0
    wall_s: float = 0.0
    finished: bool = False

    def summary(self, frames_per_block: int) -> dict:
        n = len(self.blocks)
        mean = {p: (sum(b[p] for b in self.blocks) / n * 1e3 if n else None) for p in PHASES}
        gen = sum(b["total"] for b in self.blocks)
        return {"blocks_done": n, "num_blocks": self.num_blocks, "finished": self.finished,
                "video_frames": self.frames_written, "video_seconds": self.frames_written / FPS,
                "wall_s": self.wall_s, "mean_ms_per_block": mean,
                "retrieval_share": (sum(b["retrieval"] + b["memory"] for b in self.blocks) / gen) if gen else None,
                "blocks_with_retrieval": len(self.records),
                "latent_frames_per_s": n * frames_per_block / self.wall_s if self.wall_s else None}


def stream_blocks(mode: str, num_blocks: int, render: Renderer, video_path: str,
                  produce: Callable[[Callable[[BlockResult], None]], object],
                  on_block: Optional[Callable[[BlockResult], None]] = None, progress: Optional[Progress] = None,
                  run: Optional[ModeRun] = None) -> ModeRun:
    """Streams a generation into ``video_path`` block by block: ``produce(callback)`` runs it (e.g.
    :meth:`Pipeline.generate`), calling ``callback`` with every finished :class:`BlockResult`, whose frames
    (``render``) are appended to the MP4 and whose timings and memory record go into ``run``.

    ``run`` (created if not given) is updated block by block; the writer is closed in a ``finally``, so the
    MP4 holds every finished block even if ``on_block`` or the user interrupts the run.
    """
    run = run or ModeRun(mode, num_blocks, video_path)
    writer = VideoWriter(video_path)
    start = time.perf_counter()

    def callback(block: BlockResult) -> None:
        t0 = time.perf_counter()
        frames = render(block)
        t1 = time.perf_counter()
        writer.append(frames)
        t2 = time.perf_counter()
        timings = dict(block.timings, decode=t1 - t0, write=t2 - t1)
        run.blocks.append({"block": block.index, **timings})
        if block.memory_record is not None:
            run.records.append(block.memory_record)
        run.frames_written = writer.frames_written
        run.wall_s = time.perf_counter() - start
        if progress is not None:
            progress.update(len(run.blocks), timings)
        if on_block is not None:
            on_block(block)

    try:
        produce(callback)
        run.finished = True
    finally:
        writer.close()
        run.wall_s = time.perf_counter() - start
        if progress is not None:
            progress.close()
    return run


def run_mode(pipe: Pipeline, text: torch.Tensor, num_blocks: int, mode: str, render: Renderer, video_path: str,
             seed: int = 0, on_block: Optional[Callable[[BlockResult], None]] = None,
             progress: Optional[Progress] = None, run: Optional[ModeRun] = None,
             switches: Sequence[tuple[int, torch.Tensor]] = ()) -> ModeRun:
    """Generates ``num_blocks`` blocks in ``mode`` with ``pipe`` (noise from ``seed``; prompt ``switches`` as
    :meth:`Pipeline.generate` takes them) and streams them into ``video_path`` (:func:`stream_blocks`)."""
    def produce(callback):
        gen = torch.Generator().manual_seed(seed)
        # profile: the CLI reports device time per phase (it waits for every block's frames anyway, to write them)
        return pipe.generate(text, num_blocks * pipe.cfg.frames_per_block, generator=gen, mode=mode,
                             callback=callback, profile=True, switches=switches)

    return stream_blocks(mode, num_blocks, render, video_path, produce, on_block, progress, run)


def write_outputs(out_dir: str, runs: list[ModeRun], meta: dict, frames_per_block: int,
                  interrupted: bool) -> dict[str, str]:
    """Writes ``timings.json``, ``memory_log.json`` and ``retrieval.png`` for ``runs``; returns their paths."""
    from lrag.plots import plot_retrieval  # noqa: PLC0415  (matplotlib, lazily)

    paths = {"timings": os.path.join(out_dir, "timings.json"), "memory_log": os.path.join(out_dir, "memory_log.json"),
             "plot": os.path.join(out_dir, "retrieval.png")}
    timings = {"interrupted": interrupted, **meta,
               "modes": {r.mode: {"video": os.path.basename(r.video), "summary": r.summary(frames_per_block),
                                  "per_block_s": r.blocks} for r in runs}}
    with open(paths["timings"], "w") as f:
        json.dump(timings, f, indent=1)
    rag = next((r for r in runs if r.mode == "rag"), None)
    log = {"interrupted": interrupted, **meta, "mode": "rag" if rag else None,
           "blocks_done": len(rag.blocks) if rag else 0, "num_blocks": rag.num_blocks if rag else 0,
           "note": None if rag else "no rag run: native mode retrieves nothing",
           "records": rag.records if rag else []}
    with open(paths["memory_log"], "w") as f:
        json.dump(log, f, indent=1)
    plot_retrieval(log["records"], paths["plot"], num_blocks=log["blocks_done"], frames_per_block=frames_per_block,
                   title=meta.get("title", "retrieval"))
    return paths
