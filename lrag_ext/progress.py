"""The one progress line of the project's long-running commands (generation, embedder training).

``[label] |#####.....| block 3/20  <what the caller reports>  ETA 12 s`` on stderr: rewritten in place on a
terminal, otherwise about ten lines per run (every ``total // 10`` steps and the last), so logs stay short.
"""
from __future__ import annotations

import sys
import time


class ProgressLine:
    """Prints progress of ``total`` steps (see the module docstring); ``show(done, text)`` after each step."""

    WIDTH = 24

    def __init__(self, label: str, total: int, unit: str = "step", stream=None, enabled: bool = True):
        self.label, self.total, self.unit, self.enabled = label, max(1, total), unit, enabled
        self.stream = sys.stderr if stream is None else stream
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def show(self, done: int, text: str) -> None:
        if not self.enabled or not (self.tty or done >= self.total or done % max(1, self.total // 10) == 0):
            return
        filled = self.WIDTH * min(done, self.total) // self.total
        bar = "#" * filled + "." * (self.WIDTH - filled)
        eta = self.elapsed() / max(done, 1) * max(self.total - done, 0)
        line = f"[{self.label}] |{bar}| {self.unit} {done}/{self.total}  {text}  ETA {eta:.0f} s"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and done >= self.total:
            self.stream.write("\n")
        self.stream.flush()

    def close(self) -> None:
        """Ends a line left open on a terminal (an interrupted run)."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
