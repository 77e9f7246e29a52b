"""What a checkpoint is, read without building a model: tensor names, shapes and dtypes only.

Safetensors files: the JSON header is parsed (no tensor bytes are read). ``.pt``/``.pth`` files:
``torch.load(weights_only=True, mmap=True)``, so tensors stay on disk until touched. Both give the same view:
nested dicts of tensors (safetensors tensors are ``meta`` tensors of the right shape and dtype).
"""
from __future__ import annotations

import json
import os
import struct
from collections import Counter

import torch

from lrag.checkpoint import normalize_keys, select_state_dict

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}

BACKBONE_HINTS = {"self-forcing": ("self_forcing", "self-forcing", "selfforcing"),
                  "causal-forcing": ("causal_forcing", "causal-forcing", "causalforcing"),
                  "longlive": ("longlive",)}


def read_safetensors_header(path: str) -> dict[str, torch.Tensor]:
    """``{name: meta tensor}`` from a safetensors header (8-byte little-endian length + JSON)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path!r} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2 ** 20:
            raise ValueError(f"{path!r} is not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path!r}: tensor {name!r} has unsupported dtype {info['dtype']}")
        out[name] = torch.empty(info["shape"], dtype=dtype, device="meta")
    return out


def read_checkpoint_lazily(path: str | os.PathLike):
    """The checkpoint object without loading tensor data (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        return read_safetensors_header(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:        # an old (non-zip) pickle cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix.rstrip("."): obj}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}{k}."))
        return out
    return {}


def infer_geometry(sd: dict[str, torch.Tensor]) -> dict:
    """The :class:`lrag.config.WanConfig` fields readable from a (normalised) generator state dict's shapes.

    ``num_heads`` is not stored in any shape: it is guessed as ``dim / 128`` (Wan's head size) when that divides,
    else left out.
    """
    pe = sd["patch_embedding.weight"]                                # [dim, in_dim, pt, ph, pw]
    dim, in_dim, patch = pe.shape[0], pe.shape[1], tuple(pe.shape[2:])
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    geo = dict(num_layers=layers, dim=dim, in_dim=in_dim, patch_size=patch,
               ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], text_dim=sd["text_embedding.0.weight"].shape[1],
               freq_dim=sd["time_embedding.0.weight"].shape[1],
               out_dim=sd["head.head.weight"].shape[0] // max(1, patch[0] * patch[1] * patch[2]),
               qk_norm="blocks.0.self_attn.norm_q.weight" in sd, cross_attn_norm="blocks.0.norm3.weight" in sd)
    if dim % 128 == 0:
        geo["num_heads"] = dim // 128
    return geo


def guess_backbone(path: str, names: list[str]) -> str:
    """A guess from the file name (the weights of the three backbones have identical shapes)."""
    if any("lora_" in n for n in names):
        return "longlive (LoRA adapter: merge it into the base generator before use)"
    base = os.path.basename(path).lower()
    for kind, hints in BACKBONE_HINTS.items():
        if any(h in base for h in hints):
            return f"{kind} (from the file name)"
    return "unknown: a causal Wan DiT (Self-Forcing, Causal-Forcing and LongLive share its shapes)"


def describe_checkpoint(path: str | os.PathLike) -> dict:
    """A JSON-able description of ``path``: what it is, its geometry, EMA, dtype and parameter count."""
    path = os.fspath(path)
    obj = read_checkpoint_lazily(path)
    info: dict = {"path": path, "bytes": os.path.getsize(path)}
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        info["top_level_keys"] = sorted(str(k) for k in obj)[:20]       # a wrapper, not a plain state dict
    if isinstance(obj, dict) and ("generator" in obj or "generator_ema" in obj):
        info["ema"] = "generator_ema" in obj
    else:
        info["ema"] = False
    sd = normalize_keys(_tensors(select_state_dict(obj)) if isinstance(obj, dict) else {})
    if "patch_embedding.weight" in sd:
        info["kind"] = "generator"
        info["backbone_guess"] = guess_backbone(path, list(sd))
        info["geometry"] = infer_geometry(sd)
    elif any(k.startswith("encoder.conv_stack") for k in sd):
        info["kind"] = "embedder (LatentAE)"
        info["embedding_dim"] = sd["encoder.fc.weight"].shape[0]
    elif set(sd) == {"fc.weight", "fc.bias"}:
        info["kind"] = "embedder (PooledEmbedder)"
        info["embedding_dim"] = sd["fc.weight"].shape[0]
    else:
        info["kind"] = "unknown (no Wan generator or embedder tensor names)"
    dtypes = Counter()
    for t in sd.values():
        dtypes[str(t.dtype).replace("torch.", "")] += t.numel()
    info["dtype"] = dtypes.most_common(1)[0][0] if dtypes else None
    info["dtypes"] = dict(dtypes)
    info["num_tensors"] = len(sd)
    info["num_params"] = int(sum(t.numel() for t in sd.values()))
    return info


def format_description(info: dict) -> str:
    """The human-readable report of ``lrag inspect``."""
    lines = [f"{info['path']} ({info['bytes'] / 2 ** 20:.1f} MiB)", f"  kind:        {info['kind']}"]
    if "backbone_guess" in info:
        lines.append(f"  backbone:    {info['backbone_guess']}")
    geo = info.get("geometry")
    if geo:
        heads = geo.get("num_heads")
        lines += [f"  layers:      {geo['num_layers']}", f"  dim:         {geo['dim']}",
                  f"  heads:       {heads} (guessed: dim / 128)" if heads else
                  "  heads:       not inferable from shapes (pass --num-heads)",
                  f"  ffn_dim:     {geo['ffn_dim']}", f"  text_dim:    {geo['text_dim']}",
                  f"  freq_dim:    {geo['freq_dim']}", f"  in/out dim:  {geo['in_dim']}/{geo['out_dim']}",
                  f"  patch:       {tuple(geo['patch_size'])}"]
    if "embedding_dim" in info:
        lines.append(f"  embedding:   {info['embedding_dim']}-d")
    if "top_level_keys" in info:
        lines.append(f"  top level:   {', '.join(info['top_level_keys'][:8])}")
    lines += [f"  EMA:         {'yes (generator_ema, used by default)' if info['ema'] else 'no'}",
              f"  dtype:       {info['dtype']}", f"  tensors:     {info['num_tensors']}",
              f"  parameters:  {info['num_params']:,}"]
    return "\n".join(lines)
