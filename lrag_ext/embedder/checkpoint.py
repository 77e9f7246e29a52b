"""Loading and saving LatentAE / PooledEmbedder checkpoints in the reference release's format.

The released ``ae_epoch_best.pt`` is ``{"epoch", "model", "optimizer", "scaler", "config", "val_loss"}`` with
``config = vars(AEConfig)`` as a plain dict; a plain state dict is accepted too. Everything loads with
``torch.load(..., weights_only=True)`` or safetensors (:func:`lrag_ext.state_dicts.read_checkpoint`): no
arbitrary unpickling. The architecture is first built on the ``meta`` device and checked against the
checkpoint's keys and shapes, so a wrong or hostile config allocates nothing.

Errors of the loaders given a path: ``FileNotFoundError`` (missing) or
:class:`~lrag_ext.state_dicts.InputFileError` (a ``ValueError`` naming the file: not a regular file, empty,
truncated, not a checkpoint, wrong format, config, keys or shapes). Given an already loaded dict, the format
errors are ``TypeError`` / ``ValueError`` and key mismatches ``KeyError``, as documented per function.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from lrag_ext.embedder.model import AEConfig, LatentAE
from lrag_ext.state_dicts import checkpoint_source, naming_file, state_dict_mismatch


def split_checkpoint(obj: dict) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Returns ``(state_dict, config dict or None)`` from a released-format checkpoint or a plain state dict.

    Raises:
        TypeError: ``obj`` or its ``config`` is not a dict.
        ValueError: neither format.
    """
    if not isinstance(obj, dict):
        raise TypeError(f"checkpoint must be a dict (released format or state dict), got {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], dict):
        cfg = obj.get("config")
        if cfg is not None and not isinstance(cfg, dict):
            raise TypeError(f"checkpoint['config'] must be a dict, got {type(cfg).__name__}")
        return obj["model"], cfg
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise ValueError("checkpoint is neither the released format (a dict with 'model' and 'config') nor a plain "
                     f"state dict of tensors; top-level keys: {sorted(map(str, obj))[:10]}")


def check_state_strict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raises a ``KeyError`` listing the unknown and missing keys, or a ``ValueError`` listing the mis-shaped
    ones, unless ``state`` matches ``module``'s state dict exactly (``module`` may live on the ``meta`` device)."""
    missing, unknown, bad = state_dict_mismatch(module.state_dict(), state)
    if missing or unknown:
        raise KeyError(f"state dict does not match {type(module).__name__}: missing keys {missing}, "
                       f"unknown keys {unknown}")
    if bad:
        raise ValueError(f"state dict shapes do not match {type(module).__name__}: " +
                         "; ".join(f"{k}: expected {want}, got {got}" for k, want, got in bad))


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads ``state`` into ``module`` only if its keys and shapes match exactly; otherwise raises as
    :func:`check_state_strict` (the module is left untouched)."""
    check_state_strict(module, state)
    module.load_state_dict(state, strict=True)


def check_stages(cfg, state: dict) -> None:
    """Refuses a LatentAE config (dict or :class:`AEConfig`) with more stages than ``state`` has tensors (it
    cannot match), before the model is built: a hostile config of a million stages would take minutes to build
    even on the meta device.

    Raises:
        ValueError: too many stages.
    """
    dims = cfg.get("hidden_dims") if isinstance(cfg, dict) else getattr(cfg, "hidden_dims", None)
    if isinstance(dims, (list, tuple)) and len(dims) > len(state):
        raise ValueError(f"the config's {len(dims)} hidden_dims stages cannot match a state dict of {len(state)} "
                         "tensors")


def _build_checked(make: Callable[[], nn.Module], state: dict[str, torch.Tensor]) -> nn.Module:
    """``make()`` loaded with ``state``, after checking ``state`` against ``make()`` built on the meta device (a
    config that does not fit the weights allocates nothing)."""
    with torch.device("meta"):
        meta = make()
    check_state_strict(meta, state)
    model = make()
    model.load_state_dict(state, strict=True)
    return model


def load_latent_ae(source: str | os.PathLike | dict, config: AEConfig | dict | None = None,
                   map_location: str | torch.device = "cpu") -> LatentAE:
    """Builds a :class:`LatentAE` from a checkpoint and returns it in ``eval()`` mode.

    Args:
        source: a path (read with :func:`~lrag_ext.state_dicts.read_checkpoint`) or an already loaded dict: the
            released format (``model`` + ``config``) or a plain state dict.
        config: the architecture, required for a plain state dict; overrides the checkpoint's config otherwise.
            Only the :class:`AEConfig` fields of a dict are used.
        map_location: device of the returned model.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        lrag_ext.state_dicts.InputFileError: (a ``ValueError``) ``source`` is a path and the file is not a
            usable checkpoint: not a regular file, empty, truncated, wrong format, config, keys or shapes.
        TypeError, ValueError, KeyError: ``source`` is a dict in the wrong format, or with missing/unknown keys
            (the message lists them) or mismatched shapes.
    """
    obj, path = checkpoint_source(source)
    with naming_file(path):
        state, cfg = split_checkpoint(obj)
        if config is not None:
            cfg = config
        if cfg is None:
            raise ValueError("a plain state dict carries no architecture: pass config= (AEConfig or dict)")
        check_stages(cfg, state)
        cfg = cfg if isinstance(cfg, AEConfig) else AEConfig.from_dict(cfg)
        model = _build_checked(lambda: LatentAE(cfg), state)
    return model.to(map_location).eval()


def build_embedder(cfg: dict):
    """A fresh embedder from a config dict: ``cfg["encoder"] == "pooled"`` gives a PooledEmbedder, anything else
    (the released checkpoints carry no ``encoder`` field) a LatentAE.

    Raises:
        TypeError, ValueError: a config that describes no valid embedder.
    """
    from lrag_ext.embedder.pooled import PooledConfig, PooledEmbedder  # noqa: PLC0415  (avoid an import cycle)
    if not isinstance(cfg, dict):
        raise TypeError(f"an embedder config must be a dict, got {type(cfg).__name__}")
    if cfg.get("encoder", "ae") == "pooled":
        return PooledEmbedder(PooledConfig.from_dict(cfg))
    return LatentAE(AEConfig.from_dict(cfg))


def _configured_state(obj) -> tuple[dict[str, torch.Tensor], dict]:
    state, cfg = split_checkpoint(obj)
    if cfg is None:
        raise ValueError("checkpoint has no 'config' dict, so the embedder type and shape are unknown; use "
                         "load_latent_ae(state_dict, config=...) for a plain LatentAE state dict")
    check_stages(cfg, state)
    return state, cfg


def load_embedder(source: str | os.PathLike | dict, map_location: str | torch.device = "cpu"):
    """Loads a LatentAE or PooledEmbedder from a checkpoint with a config dict (released or our training format),
    in ``eval()`` mode. Raises like :func:`load_latent_ae`."""
    obj, path = checkpoint_source(source)
    with naming_file(path):
        state, cfg = _configured_state(obj)
        model = _build_checked(lambda: build_embedder(cfg), state)
    return model.to(map_location).eval()


def check_embedder(source: str | os.PathLike | dict):
    """Checks what :func:`load_embedder` would refuse, reading no tensor data (the file is read lazily, the model
    built on the ``meta`` device); returns the embedder's config (``AEConfig`` or ``PooledConfig``). Raises like
    :func:`load_latent_ae`."""
    obj, path = checkpoint_source(source, lazy=True)
    with naming_file(path):
        state, cfg = _configured_state(obj)
        with torch.device("meta"):
            model = build_embedder(cfg)
        check_state_strict(model, state)
    return model.config


def check_embedder_input(config, channels: int, height: int, width: int) -> None:
    """Checks that an embedder with ``config`` (an :class:`AEConfig` or ``PooledConfig``) can embed frames
    ``[N, channels, height, width]``.

    Raises:
        ValueError: the channels differ, or a pooled embedder's grid is larger than the frames.
    """
    if config.in_channels != channels:
        raise ValueError(f"the embedder takes {config.in_channels}-channel latents, these have {channels} channels")
    grid = getattr(config, "grid", None)
    if grid is not None and grid > min(height, width):
        raise ValueError(f"the embedder's {grid} x {grid} pooling grid is larger than the {height} x {width} latents")
