"""Loading and saving LatentAE / PooledEmbedder checkpoints in the reference release's format.

The released ``ae_epoch_best.pt`` is ``{"epoch", "model", "optimizer", "scaler", "config", "val_loss"}`` with
``config = vars(AEConfig)`` as a plain dict; a plain state dict is accepted too. Everything loads with
``torch.load(..., weights_only=True)``: no arbitrary unpickling.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from lrag_ext.embedder.model import AEConfig, LatentAE
from lrag_ext.state_dicts import read_checkpoint, state_dict_mismatch


def split_checkpoint(obj: dict) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Returns ``(state_dict, config dict or None)`` from a released-format checkpoint or a plain state dict."""
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


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads ``state`` into ``module`` only if its keys and shapes match exactly; otherwise raises a
    ``KeyError``/``ValueError`` listing the unknown, missing or mis-shaped keys (the module is left untouched)."""
    missing, unknown, bad = state_dict_mismatch(module.state_dict(), state)
    if missing or unknown:
        raise KeyError(f"state dict does not match {type(module).__name__}: missing keys {missing}, "
                       f"unknown keys {unknown}")
    if bad:
        raise ValueError(f"state dict shapes do not match {type(module).__name__}: " +
                         "; ".join(f"{k}: expected {want}, got {got}" for k, want, got in bad))
    module.load_state_dict(state, strict=True)


def load_latent_ae(source: str | os.PathLike | dict, config: AEConfig | dict | None = None,
                   map_location: str | torch.device = "cpu") -> LatentAE:
    """Builds a :class:`LatentAE` from a checkpoint and returns it in ``eval()`` mode.

    Args:
        source: a path (loaded with ``weights_only=True``) or an already loaded dict: the released format
            (``model`` + ``config``) or a plain state dict.
        config: the architecture, required for a plain state dict; overrides the checkpoint's config otherwise.
            Only the :class:`AEConfig` fields of a dict are used.
        map_location: device of the returned model.

    Raises:
        FileNotFoundError, TypeError, ValueError, KeyError: unreadable file, wrong format, missing/unknown keys
        (the message lists them) or mismatched shapes.
    """
    obj = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    state, cfg = split_checkpoint(obj)
    if config is not None:
        cfg = config
    if cfg is None:
        raise ValueError("a plain state dict carries no architecture: pass config= (AEConfig or dict)")
    cfg = cfg if isinstance(cfg, AEConfig) else AEConfig.from_dict(cfg)
    model = LatentAE(cfg)
    load_state_strict(model, state)
    return model.to(map_location).eval()


def build_embedder(cfg: dict):
    """A fresh embedder from a config dict: ``cfg["encoder"] == "pooled"`` gives a PooledEmbedder, anything else
    (the released checkpoints carry no ``encoder`` field) a LatentAE."""
    from lrag_ext.embedder.pooled import PooledConfig, PooledEmbedder  # noqa: PLC0415  (avoid an import cycle)
    if cfg.get("encoder", "ae") == "pooled":
        return PooledEmbedder(PooledConfig.from_dict(cfg))
    return LatentAE(AEConfig.from_dict(cfg))


def load_embedder(source: str | os.PathLike | dict, map_location: str | torch.device = "cpu"):
    """Loads a LatentAE or PooledEmbedder from a checkpoint with a config dict (released or our training format),
    in ``eval()`` mode. Raises like :func:`load_latent_ae`."""
    obj = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    state, cfg = split_checkpoint(obj)
    if cfg is None:
        raise ValueError("checkpoint has no 'config' dict, so the embedder type and shape are unknown; use "
                         "load_latent_ae(state_dict, config=...) for a plain LatentAE state dict")
    model = build_embedder(cfg)
    load_state_strict(model, state)
    return model.to(map_location).eval()
