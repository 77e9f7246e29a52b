"""Streaming video output: an MP4 writer that takes frames block by block, and the latent preview of the demo.

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
    """The fixed ``[3, channels]`` latent -> RGB projection of the preview.

    ``M[k, c] = cos(2π c / channels + 2π k / 3) / sqrt(channels / 2)``: each colour is a different phase of a
    cosine over the channels, so the three rows are orthogonal with unit norm and no channel is privileged. A
    fixed map (not learned, not the VAE) keeps the preview cheap and deterministic.
    """
    c = torch.arange(channels, dtype=torch.float64)
    k = torch.arange(3, dtype=torch.float64)[:, None]
    return (torch.cos(2 * math.pi * c / channels + 2 * math.pi * k / 3) / math.sqrt(channels / 2)).float()


def latent_preview(latents: torch.Tensor, scale: int = 4, repeat: int = TEMPORAL_STRIDE) -> np.ndarray:
    """A cheap RGB view of latent frames, used instead of the VAE by the demo.

    ``rgb = 0.5 + 0.5 tanh(M · x)`` per latent pixel with the fixed :func:`preview_matrix` ``M``, bilinearly
    upsampled by ``scale``, each latent frame repeated ``repeat`` times (the VAE's temporal stride, so a
    3-frame block gives 12 video frames = 0.75 s at 16 fps, as the real decoder would).

    Args:
        latents: ``[F, C, H, W]``.

    Returns:
        ``uint8 [F * repeat, H * scale, W * scale, 3]``.
    """
    if latents.dim() != 4:
        raise ValueError(f"latents must be [F, C, H, W], got {list(latents.shape)}")
    x = latents.detach().float().cpu()
    rgb = torch.einsum("kc,fchw->fkhw", preview_matrix(x.shape[1]), x)
    if scale != 1:
        rgb = F.interpolate(rgb, scale_factor=scale, mode="bilinear", align_corners=False)
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
