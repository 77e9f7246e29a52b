"""What a checkpoint is, read without building a model: tensor names, shapes and dtypes only.

Files are read by :func:`lrag_ext.state_dicts.read_checkpoint` with ``lazy=True``: safetensors files through
their JSON header (checked against the file size, so a truncated file is refused; no tensor bytes are read),
``.pt``/``.pth`` files with ``torch.load(weights_only=True, mmap=True)``, so tensors stay on disk until
touched. Both give the same view: nested dicts of tensors (safetensors tensors are ``meta`` tensors of the
right shape and dtype). A generator or an embedder with a config is also checked for consistency on the
``meta`` device (every tensor its geometry needs, with the right shapes).
"""
from __future__ import annotations

import os
from collections import Counter

import torch

from lrag.checkpoint import check_generator, normalize_keys, select_state_dict
from lrag_ext.state_dicts import naming_file, read_checkpoint

BACKBONE_HINTS = {"self-forcing": ("self_forcing", "self-forcing", "selfforcing"),
                  "causal-forcing": ("causal_forcing", "causal-forcing", "causalforcing"),
                  "longlive": ("longlive",)}
# the tensors infer_geometry reads
GEOMETRY_KEYS = ("patch_embedding.weight", "blocks.0.ffn.0.weight", "text_embedding.0.weight",
                 "time_embedding.0.weight", "head.head.weight")


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

    Raises:
        ValueError: a tensor it reads is missing or has the wrong rank, or the blocks are not numbered 0..L-1.
    """
    missing = [k for k in GEOMETRY_KEYS if k not in sd]
    if missing:
        raise ValueError(f"a Wan generator checkpoint without {missing}")
    if sd["patch_embedding.weight"].dim() != 5 or any(sd[k].dim() != 2 for k in GEOMETRY_KEYS[1:]):
        shapes = {k: tuple(sd[k].shape) for k in GEOMETRY_KEYS}
        raise ValueError(f"a Wan generator checkpoint with tensors of the wrong rank: {shapes}")
    pe = sd["patch_embedding.weight"]                                # [dim, in_dim, pt, ph, pw]
    dim, in_dim, patch = pe.shape[0], pe.shape[1], tuple(pe.shape[2:])
    blocks = {k.split(".")[1] for k in sd if k.startswith("blocks.")}
    layers = len(blocks)
    if blocks != {str(i) for i in range(layers)}:
        raise ValueError(f"a Wan generator checkpoint whose blocks are not numbered 0..{layers - 1}: "
                         f"{sorted(blocks)[:10]}")
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
    """A JSON-able description of ``path``: what it is, its geometry, EMA, dtype and parameter count.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        lrag_ext.state_dicts.InputFileError: (a ``ValueError`` naming the file) not a regular file, empty,
            truncated, not a checkpoint, or a generator / embedder whose tensors do not fit its own geometry.
    """
    path = os.fspath(path)
    obj = read_checkpoint(path, lazy=True)
    with naming_file(path):
        return _describe(path, obj)


def _consistency_config(geo: dict):
    """A :class:`~lrag.config.WanConfig` with the checkpoint's geometry, for the meta-device check (the head count
    and latent size change no parameter shape)."""
    from lrag.config import wan_1_3b  # noqa: PLC0415

    patch = tuple(geo["patch_size"])
    return wan_1_3b(**{**geo, "num_heads": geo.get("num_heads", 1)}, latent_height=patch[1], latent_width=patch[2])


def _describe(path: str, obj: dict) -> dict:
    info: dict = {"path": path, "bytes": os.path.getsize(path)}
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        info["top_level_keys"] = sorted(str(k) for k in obj)[:20]       # a wrapper, not a plain state dict
    info["ema"] = "generator_ema" in obj
    sd = normalize_keys(_tensors(select_state_dict(obj)))
    if "patch_embedding.weight" in sd:
        info["kind"] = "generator"
        info["backbone_guess"] = guess_backbone(path, list(sd))
        info["geometry"] = infer_geometry(sd)
        if not any("lora_" in n for n in sd):
            check_generator(_consistency_config(info["geometry"]), obj)
    elif any(k.startswith("encoder.conv_stack") for k in sd) or set(sd) == {"fc.weight", "fc.bias"}:
        from lrag_ext.embedder.checkpoint import check_embedder  # noqa: PLC0415

        pooled = set(sd) == {"fc.weight", "fc.bias"}
        info["kind"] = "embedder (PooledEmbedder)" if pooled else "embedder (LatentAE)"
        fc = sd.get("fc.weight" if pooled else "encoder.fc.weight")
        if fc is None or fc.dim() != 2:
            raise ValueError("an embedder checkpoint without a 2-D fc weight")
        info["embedding_dim"] = fc.shape[0]
        if isinstance(obj.get("config"), dict):
            check_embedder(obj)
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
