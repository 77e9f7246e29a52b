"""Latent-video data for embedder training: a folder of ``.pt`` / ``.safetensors`` files, one video each.

Each file holds one tensor ``[F, C, H, W]`` (or ``[1, F, C, H, W]``): a bare tensor, or a dict with a single
tensor or a ``"latents"`` entry. ``.pt`` files load with ``weights_only=True``. Videos are kept in memory
(a 90-frame 16x60x104 latent video is 18 MB in float16/bfloat16, 36 MB in float32).
"""
from __future__ import annotations

import os
import random

import torch

from lrag_ext.state_dicts import InputFileError, check_regular_file

SUFFIXES = (".pt", ".safetensors")


class DataError(ValueError):
    """A data folder or file that cannot be used for training (the message names it)."""


def list_latent_files(folder: str | os.PathLike) -> list[str]:
    """Sorted paths of the ``.pt`` / ``.safetensors`` files directly in ``folder``."""
    if not os.path.isdir(folder):
        raise DataError(f"data folder {os.fspath(folder)!r} does not exist or is not a folder")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(SUFFIXES))
    if not files:
        raise DataError(f"data folder {os.fspath(folder)!r} holds no .pt or .safetensors latent files")
    return files


def _pick_tensor(obj, path: str) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        if "latents" in obj and isinstance(obj["latents"], torch.Tensor):
            return obj["latents"]
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
    raise DataError(f"{path}: expected a tensor, or a dict with one tensor or a 'latents' entry")


def load_latent_video(path: str, in_channels: int | None = None, min_frames: int = 1) -> torch.Tensor:
    """Loads one video as float32 ``[F, C, H, W]``; raises :class:`DataError` naming ``path`` if unusable."""
    try:  # a FIFO or device in the data folder must be refused, not opened (it would block or never end)
        check_regular_file(path, what="latent file")
    except (FileNotFoundError, InputFileError) as err:
        raise DataError(str(err)) from None
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file  # noqa: PLC0415  (optional dependency)
            obj = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any reader failure means a malformed file)
        raise DataError(f"{path}: cannot be read as a latent file ({type(err).__name__}: {err})") from err
    x = _pick_tensor(obj, path)
    if x.dim() == 5 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 4 or not x.is_floating_point():
        raise DataError(f"{path}: expected a float tensor [F, C, H, W], got {x.dtype} of shape {tuple(x.shape)}")
    if in_channels is not None and x.shape[1] != in_channels:
        raise DataError(f"{path}: expected {in_channels} channels, got shape {tuple(x.shape)}")
    if x.shape[0] < min_frames:
        raise DataError(f"{path}: has {x.shape[0]} frames, fewer than the chunk length {min_frames}")
    if not torch.isfinite(x).all():
        raise DataError(f"{path}: contains NaN or infinite values")
    return x.float().contiguous()


def split_files(files: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded split by file: ``round(val_fraction * n)`` validation files (at least 1 when n >= 2 and
    ``val_fraction > 0``). With a single file, it serves both sides."""
    order = list(files)
    random.Random(seed).shuffle(order)
    if len(order) < 2 or val_fraction <= 0:
        return order, order if val_fraction > 0 else []
    n_val = min(len(order) - 1, max(1, round(val_fraction * len(order))))
    return sorted(order[n_val:]), sorted(order[:n_val])


def random_chunk_index(lengths: list[int], seq_len: int, counts: list[int],
                       gen: torch.Generator) -> list[tuple[int, int]]:
    """``(video, start)`` of ``counts[v]`` random windows of ``seq_len`` consecutive frames of each video ``v``
    (of ``lengths[v]`` frames), shuffled."""
    idx = []
    for vi, (n, k) in enumerate(zip(lengths, counts)):
        idx += [(vi, s) for s in torch.randint(0, n - seq_len + 1, (k,), generator=gen).tolist()]
    return [idx[i] for i in torch.randperm(len(idx), generator=gen).tolist()]


def tiling_chunk_index(lengths: list[int], seq_len: int) -> list[tuple[int, int]]:
    """Deterministic validation windows: the non-overlapping windows of each video from frame 0."""
    return [(vi, s) for vi, n in enumerate(lengths) for s in range(0, n - seq_len + 1, seq_len)]


def stack_chunks(videos: list[torch.Tensor], index: list[tuple[int, int]], seq_len: int) -> torch.Tensor:
    """``[len(index), seq_len, C, H, W]`` batch of the given windows."""
    return torch.stack([videos[vi][s:s + seq_len] for vi, s in index])
