"""Benchmark helpers: thread-count control shared by every bench file."""
from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def torch_threads(n: int):
    """Runs the block with torch (and so lrag_ext's at::parallel_for) limited to n threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


ALL_THREADS = os.cpu_count() or 1
