"""Safe checkpoint reading and strict state-dict matching, shared by every loader (embedder, generator)."""
from __future__ import annotations

import os

import torch


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Reads a checkpoint without arbitrary unpickling: ``.safetensors`` with safetensors, anything else with
    ``torch.load(map_location="cpu", weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # noqa: PLC0415
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def state_dict_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
                        ) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """How ``state`` differs from a module's own state dict ``own``.

    Returns:
        ``(missing, unexpected, bad_shapes)``: keys of ``own`` absent from ``state``, keys of ``state`` absent
        from ``own`` (both sorted), and ``(key, own_shape, state_shape)`` for shared keys whose shapes differ.
    """
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shapes = [(k, tuple(own[k].shape), tuple(state[k].shape)) for k in sorted(set(own) & set(state))
                  if tuple(own[k].shape) != tuple(state[k].shape)]
    return missing, unexpected, bad_shapes
