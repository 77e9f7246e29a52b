"""Timing helpers shared by the GPU benchmark scripts (``benchmarks/gpu_*.py``)."""
from __future__ import annotations

import time

import torch


def median_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls, each bracketed by CUDA events (after ``warmup``).
    Without CUDA (a script's CPU smoke run) it falls back to wall-clock time."""
    for _ in range(warmup):
        fn()
    times = []
    if not torch.cuda.is_available():
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]
    torch.cuda.synchronize()
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def time_eager(fn, iters: int = 30) -> float:
    """Median seconds per call of ``fn()`` (CUDA-event timed)."""
    return median_ms(fn, iters=iters) / 1e3


def time_graph(fn, iters: int = 50) -> float:
    """Median seconds per replay of ``fn`` captured in a CUDA graph (warmed up on a side stream first), so
    launch overhead is out of the measurement."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, iters=iters, warmup=1) / 1e3
