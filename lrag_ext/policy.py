"""The retrieval policy of LongLive-RAG: which past frames a block may retrieve, and how many.

The attention cache holds ``window_frames`` latent frames: ``sink_frames`` frames kept forever, then the most recent
ones. When a stream holds ``n`` frames and its next block starts at frame ``n``, the frames evicted so far are the
global frames ``[sink, sink + max(0, n - window))`` (eviction order, oldest first). The newest ``recent_exclude`` of
them are still too close to the local window to be useful (the "recency guard"), so the candidates are

    [sink_frames, sink_frames + max(0, n - window_frames) - recent_exclude)        (empty when negative)

and a block retrieves ``min(top_k, #candidates)`` of them. Sink frames and frames still in the cache are never
candidates. With the reference numbers (sink 1, window 12, K 6, R 5, 3 frames a block) retrieval starts at block 6
with one candidate.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetrievalPolicy:
    """Eligibility and budget of retrieval (defaults: the reference release's configuration).

    Attributes:
        top_k: frames retrieved per block at most (K).
        recent_exclude: newest evicted frames that may not be retrieved (R).
        sink_frames: first frames of the video, kept in the cache forever.
        window_frames: frames the attention cache holds (sink included).
    """

    top_k: int = 6
    recent_exclude: int = 5
    sink_frames: int = 1
    window_frames: int = 12

    def __post_init__(self):
        for name in ("top_k", "recent_exclude", "sink_frames", "window_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.recent_exclude < 0:
            raise ValueError(f"recent_exclude must be >= 0, got {self.recent_exclude}")
        if self.sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {self.sink_frames}")
        if self.window_frames <= self.sink_frames:
            raise ValueError(f"window_frames ({self.window_frames}) must exceed sink_frames ({self.sink_frames})")

    def num_evicted(self, num_frames: int) -> int:
        """Frames evicted from the cache once ``num_frames`` frames exist: ``max(0, n - window_frames)``."""
        self._check_frames(num_frames)
        return max(0, num_frames - self.window_frames)

    def eligible_range(self, num_frames: int) -> tuple[int, int]:
        """Half-open range ``[lo, hi)`` of global frame ids the next block (starting at ``num_frames``) may retrieve."""
        lo = self.sink_frames
        hi = max(lo, lo + self.num_evicted(num_frames) - self.recent_exclude)
        return lo, hi

    def num_selected(self, num_frames: int) -> int:
        """How many frames the next block retrieves: ``min(top_k, #eligible)``."""
        lo, hi = self.eligible_range(num_frames)
        return min(self.top_k, hi - lo)

    @staticmethod
    def _check_frames(num_frames: int) -> None:
        if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 0:
            raise ValueError(f"num_frames must be an int >= 0, got {num_frames!r}")
