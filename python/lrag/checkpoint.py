"""Loading released Self-Forcing / Causal-Forcing / LongLive generator weights into :class:`CausalWanModel`.

Outer formats accepted (``torch.load(weights_only=True)`` for pickles, or safetensors):

- ``{"generator": sd, "generator_ema": sd, ...}`` (the training checkpoints): EMA weights by default when present;
- ``{"model": sd}`` / ``{"state_dict": sd}``;
- a plain state dict.

Key prefixes the wrappers add are removed: ``_fsdp_wrapped_module.`` anywhere, then a leading ``model.``
(``WanDiffusionWrapper.model``) or ``module.`` (DDP).

Errors of the loaders given a path: ``FileNotFoundError`` (missing) or
:class:`~lrag_ext.state_dicts.InputFileError` (a ``ValueError`` naming the file: not a regular file, empty,
truncated, not a checkpoint, no generator entry, wrong keys, shapes or dtypes). :func:`check_generator` finds
all of these without loading a tensor.
"""
from __future__ import annotations

import torch

from lrag.models.wan import CausalWanModel
from lrag_ext.state_dicts import checkpoint_source, naming_file, state_dict_mismatch

_NESTED_KEYS = ("model", "state_dict", "module")


def select_state_dict(ckpt: dict, use_ema: bool | None = None) -> dict[str, torch.Tensor]:
    """Picks the generator state dict out of a loaded checkpoint object.

    Args:
        ckpt: what ``torch.load`` / safetensors returned.
        use_ema: ``None`` (default) = ``generator_ema`` when present, else ``generator``; ``True`` requires
            ``generator_ema``; ``False`` requires ``generator``.

    Raises:
        KeyError: the requested entry is missing (names the keys that exist).
        TypeError: ``ckpt`` or the selected entry is not a dict.
    """
    if not isinstance(ckpt, dict):
        raise TypeError(f"checkpoint must hold a dict, got {type(ckpt).__name__}")
    if "generator" in ckpt or "generator_ema" in ckpt:
        key = "generator_ema" if (use_ema or (use_ema is None and "generator_ema" in ckpt)) else "generator"
        if key not in ckpt:
            raise KeyError(f"checkpoint has no {key!r} entry (top-level keys: {sorted(map(str, ckpt))})")
        if not isinstance(ckpt[key], dict):
            raise TypeError(f"checkpoint[{key!r}] must be a state dict, got {type(ckpt[key]).__name__}")
        return ckpt[key]
    if use_ema:
        raise KeyError(f"use_ema=True but the checkpoint has no 'generator_ema' entry (top-level keys: "
                       f"{sorted(ckpt)[:10]})")
    for key in _NESTED_KEYS:
        if isinstance(ckpt.get(key), dict) and ckpt[key] and all(isinstance(v, torch.Tensor)
                                                               for v in ckpt[key].values()):
            return ckpt[key]
    return ckpt


def strip_wrappers(name: str) -> str:
    """A parameter name without the prefixes training wrappers add: ``_fsdp_wrapped_module.`` anywhere, then a
    leading ``module.`` (DDP), then a leading ``model.`` (``WanDiffusionWrapper.model``)."""
    name = name.replace("_fsdp_wrapped_module.", "")
    for prefix in ("module.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def normalize_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Removes wrapper prefixes from every key (:func:`strip_wrappers`).

    Raises:
        TypeError: a key is not a string.
    """
    out = {}
    for name, value in sd.items():
        if not isinstance(name, str):
            raise TypeError(f"state dict keys must be strings, got {name!r}")
        out[strip_wrappers(name)] = value
    return out


def generator_state_dict(model: CausalWanModel, ckpt, use_ema: bool | None = None) -> dict[str, torch.Tensor]:
    """The normalised generator state dict of a loaded checkpoint, checked to fit ``model`` strictly (every
    parameter, no extras, matching shapes, floating-point tensors); ``model`` may live on the ``meta`` device.

    Raises:
        ValueError: missing / unexpected keys, shape or dtype mismatches, all listed.
        KeyError, TypeError: as :func:`select_state_dict` and :func:`normalize_keys`.
    """
    sd = normalize_keys(select_state_dict(ckpt, use_ema))
    own = model.state_dict()
    missing, unexpected, bad = state_dict_mismatch(own, sd)
    bad_shape = [f"{k}: checkpoint {got} vs model {want}" for k, want, got in bad]
    not_float = sorted(k for k in set(own) & set(sd) if not sd[k].is_floating_point())
    if missing or unexpected or bad_shape or not_float:
        raise ValueError("the weights do not match the model config:\n"
                         f"  missing keys ({len(missing)}): {missing}\n"
                         f"  unexpected keys ({len(unexpected)}): {unexpected}\n"
                         f"  shape mismatches ({len(bad_shape)}): {bad_shape}" +
                         (f"\n  not floating-point ({len(not_float)}): {not_float}" if not_float else ""))
    return sd


def load_generator(model: CausalWanModel, path_or_ckpt, use_ema: bool | None = None,
                   dtype: torch.dtype | None = None, assign: bool = False) -> CausalWanModel:
    """Loads generator weights into ``model`` strictly (every parameter, no extras, matching shapes).

    Args:
        model: the backbone to fill.
        path_or_ckpt: a ``.pt``/``.pth`` (loaded with ``weights_only=True``) or ``.safetensors`` path, or an
            already loaded checkpoint dict.
        use_ema: see :func:`select_state_dict`.
        dtype: cast the model to this dtype after loading (e.g. ``torch.bfloat16``).
        assign: take the checkpoint's tensors as the parameters (for a model built on the ``meta`` device).

    Returns:
        ``model``, in eval mode.

    Raises:
        FileNotFoundError: a path that does not exist.
        lrag_ext.state_dicts.InputFileError: (a ``ValueError``) a path whose file is unusable: not a regular
            file, empty, truncated, not a checkpoint, or not matching as below.
        ValueError: missing / unexpected keys or shape mismatches, all listed (``KeyError`` / ``TypeError`` for
            a dict without the requested entry or not a dict). The model is unchanged.
    """
    ckpt, path = checkpoint_source(path_or_ckpt)
    with naming_file(path):
        sd = generator_state_dict(model, ckpt, use_ema)
    model.load_state_dict(sd, strict=True, assign=assign)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def check_generator(cfg, path_or_ckpt, use_ema: bool | None = None) -> None:
    """Checks that a checkpoint holds a generator for ``cfg`` without loading tensor data (the file is read
    lazily, the model built on the ``meta`` device): what :func:`build_generator` would refuse is refused
    here, in a fraction of a second. Raises like :func:`load_generator`."""
    ckpt, path = checkpoint_source(path_or_ckpt, lazy=True)
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    with naming_file(path):
        generator_state_dict(model, ckpt, use_ema)


def build_generator(cfg, path_or_ckpt, use_ema: bool | None = None, dtype: torch.dtype | None = None,
                    device=None) -> CausalWanModel:
    """Builds a :class:`CausalWanModel` for ``cfg`` directly from a checkpoint, without first initialising (and
    allocating) random weights: the model is created on the ``meta`` device and takes the loaded tensors.

    Args:
        cfg: the :class:`~lrag.config.WanConfig` the checkpoint was trained with.
        path_or_ckpt, use_ema: as :func:`load_generator`.
        dtype: parameter dtype (default: the checkpoint's).
        device: where to put the model (default: CPU).

    Raises:
        As :func:`load_generator`.
    """
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    load_generator(model, path_or_ckpt, use_ema=use_ema, assign=True)
    return model.to(device=device or "cpu", dtype=dtype).eval()
