"""Streaming video output: an MP4 writer that takes frames block by block, the latent preview of the demo, and
videos side by side.

Nothing here holds a whole video: :class:`VideoWriter` hands every frame to ffmpeg (imageio-ffmpeg) as it
arrives, so a 120 s run keeps one block of RGB frames in memory at a time. imageio is imported lazily, when the
first writer is opened (``pip install -e .[gen]``).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

FPS = 16                 # Wan2.1 video frame rate (SPEC.md §2)
TEMPORAL_STRIDE = 4      # video frames per latent frame of the Wan VAE (the first latent frame gives 1)


def _imageio():
    try:
        import imageio.v2 as imageio  # noqa: PLC0415  (optional dependency, only for video output)
        import imageio_ffmpeg  # noqa: F401,PLC0415
    except ImportError as e:
        raise RuntimeError("writing MP4 needs imageio and imageio-ffmpeg: pip install -e .[gen] "
                           f"(or pip install imageio imageio-ffmpeg); import failed: {e}") from None
    return imageio


class VideoWriter:
    """Appends ``uint8 [N, H, W, 3]`` frame batches to an H.264 MP4 at ``fps``; ``close()`` finalises the file.

    The file is playable after :meth:`close` whatever happened before (callers close it in a ``finally``).
    Frame sizes must stay constant; H and W should be multiples of 16 (the writer does not resize).
    """

    def __init__(self, path: str | os.PathLike, fps: int = FPS, quality: int = 7):
        self.path = os.fspath(path)
        self.fps = fps
        self.frames_written = 0
        self.shape: tuple[int, int] | None = None
        self._quality = quality
        self._writer = None
        self._imageio = _imageio()

    def append(self, frames: np.ndarray | torch.Tensor) -> None:
        """Writes ``frames`` ``uint8 [N, H, W, 3]`` (or one ``[H, W, 3]`` frame)."""
        if isinstance(frames, torch.Tensor):
            frames = frames.cpu().numpy()
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        if self.shape is None:
            self.shape = frames.shape[1:3]
            self._writer = self._imageio.get_writer(self.path, fps=self.fps, codec="libx264", quality=self._quality,
                                                    macro_block_size=1, ffmpeg_log_level="error")
        elif frames.shape[1:3] != self.shape:
            raise ValueError(f"frame size changed from {self.shape} to {frames.shape[1:3]}")
        for frame in frames:
            self._writer.append_data(frame)
        self.frames_written += len(frames)

    def close(self) -> None:
        """Finalises the MP4 (idempotent). A writer that never got a frame leaves no file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def count_frames(path: str | os.PathLike) -> int:
    """Number of frames of a video file, counted by decoding it (so a truncated file is noticed)."""
    reader = _imageio().get_reader(os.fspath(path))
    try:
        return sum(1 for _ in reader)
    finally:
        reader.close()


def preview_matrix(channels: int = 16) -> torch.Tensor:
    """The fixed ``[3, channels]`` latent -> RGB projection of the preview, three orthonormal rows ``M = Q D``.

    ``D`` holds the first three DCT-II basis vectors over the channels, ``D[k, c] = a_k cos(π k (2c + 1) / (2
    channels))`` (``a_0 = sqrt(1 / channels)``, else ``sqrt(2 / channels)``): the channel mean and the two slowest
    patterns across the channels. ``Q`` (orthogonal) shows the mean as grey (R = G = B) and the two patterns on two
    orthogonal chroma axes: its columns are ``(1, 1, 1) / √3``, ``(1, −1, 0) / √2`` and ``(1, 1, −2) / √6``. So a
    latent whose channels are uncorrelated with unit variance (the toy world's colours) gives unit variance in each
    of R, G, B; the other ``channels − 3`` directions are not shown (two colours differing only there look alike).
    A fixed map (not learned, not the VAE) keeps the preview cheap and deterministic.

    Raises:
        ValueError: fewer than 3 channels.
    """
    if channels < 3:
        raise ValueError(f"the preview needs at least 3 channels, got {channels}")
    c = torch.arange(channels, dtype=torch.float64)
    k = torch.arange(3, dtype=torch.float64)[:, None]
    d = torch.cos(math.pi * k * (2 * c + 1) / (2 * channels)) * math.sqrt(2 / channels)
    d[0] /= math.sqrt(2)
    q = torch.tensor([[1 / math.sqrt(3), 1 / math.sqrt(2), 1 / math.sqrt(6)],
                      [1 / math.sqrt(3), -1 / math.sqrt(2), 1 / math.sqrt(6)],
                      [1 / math.sqrt(3), 0.0, -2 / math.sqrt(6)]], dtype=torch.float64)
    return (q @ d).float()


def latent_preview(latents: torch.Tensor, scale: int = 4, repeat: int = TEMPORAL_STRIDE,
                   interpolation: str = "bilinear") -> np.ndarray:
    """A cheap RGB view of latent frames, used instead of the VAE by the demo.

    ``rgb = 0.5 + 0.5 tanh(M · x)`` per latent pixel with the fixed :func:`preview_matrix` ``M``, upsampled by
    ``scale`` (``interpolation``: ``"bilinear"``, or ``"nearest"`` for pixel art such as the toy world's frames),
    each latent frame repeated ``repeat`` times (the VAE's temporal stride, so a 3-frame block gives 12 video
    frames = 0.75 s at 16 fps, as the real decoder would).

    Args:
        latents: ``[F, C, H, W]``, ``C >= 3``.

    Returns:
        ``uint8 [F * repeat, H * scale, W * scale, 3]``.
    """
    if latents.dim() != 4:
        raise ValueError(f"latents must be [F, C, H, W], got {list(latents.shape)}")
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    x = latents.detach().float().cpu()
    rgb = torch.einsum("kc,fchw->fkhw", preview_matrix(x.shape[1]), x)
    if scale != 1:
        rgb = F.interpolate(rgb, scale_factor=scale, mode=interpolation,
                            **({"align_corners": False} if interpolation == "bilinear" else {}))
    rgb = (0.5 + 0.5 * torch.tanh(rgb)).mul(255).round().to(torch.uint8)
    return rgb.permute(0, 2, 3, 1).repeat_interleave(repeat, dim=0).contiguous().numpy()


def side_by_side(paths: list[str], out_path: str, fps: int = FPS, gap: int = 16) -> int:
    """Writes the videos of ``paths`` next to each other (left to right, ``gap`` black pixels between) into
    ``out_path``, reading them frame by frame in lockstep; stops at the shortest. Returns the frames written."""
    imageio = _imageio()
    readers = [imageio.get_reader(p) for p in paths]
    writer = VideoWriter(out_path, fps=fps)
    try:
        for frames in zip(*readers):
            h = frames[0].shape[0]
            spacer = np.zeros((h, gap, 3), dtype=np.uint8)
            row = [frames[0]]
            for f in frames[1:]:
                row += [spacer, f]
            writer.append(np.concatenate(row, axis=1))
    finally:
        writer.close()
        for r in readers:
            r.close()
    return writer.frames_written
