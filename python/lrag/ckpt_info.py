"""What a checkpoint is, read without building a model: tensor names, shapes and dtypes only.

Files are read by :func:`lrag_ext.state_dicts.read_checkpoint` with ``lazy=True``: safetensors files through
their JSON header (checked against the file size, so a truncated file is refused; no tensor bytes are read),
``.pt``/``.pth`` files with ``torch.load(weights_only=True, mmap=True)``, so tensors stay on disk until
touched. Both give the same view: nested dicts of tensors (safetensors tensors are ``meta`` tensors of the
right shape and dtype). A generator or an embedder with a config is also checked for consistency on the
``meta`` device (every tensor its geometry needs, with the right shapes).

The toy world's files (:mod:`lrag.toy.train`: safetensors whose metadata entry ``lrag_toy`` holds their format and
config) are recognised by that entry: a ``toy_generator.safetensors`` (``lrag-toy-generator/1``) is described with
its config, training step, sha256 and, when the trainer's card ``toy_generator.json`` sits beside it, the card's
command, validation loss and whether its sha256 matches; a ``last.safetensors`` (``lrag-toy-train/1``) as a training
checkpoint.
"""
from __future__ import annotations

import json
import os
import struct
from collections import Counter

import torch

from lrag.checkpoint import check_generator, normalize_keys, select_state_dict
from lrag_ext.state_dicts import (MAX_SAFETENSORS_HEADER, InputFileError, naming_file, open_regular_file,
                                  read_checkpoint, read_json_object)

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
        return ("longlive? (LoRA weights inside a generator state dict, a peft-wrapped model: not a released format; "
                "pass the base generator to --checkpoint and the adapter file to --lora)")
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
    toy = _toy_metadata(path)
    with naming_file(path):
        return _describe_toy(path, obj, toy) if toy is not None else _describe(path, obj)


def _toy_metadata(path: str) -> dict | None:
    """The JSON object of the ``lrag_toy`` metadata entry of a safetensors file written by :mod:`lrag.toy.train`
    (its ``format`` one of the trainer's), or None for any other file. Called after :func:`read_checkpoint` has
    checked the file (a regular file; a safetensors header that fits in it)."""
    from lrag.toy.train import META_KEY, TRAIN_FORMAT, WEIGHTS_FORMAT  # noqa: PLC0415

    with open_regular_file(path) as f:
        head = f.read(9)
        if len(head) < 9 or head[8:9] != b"{":
            return None
        (n,) = struct.unpack("<Q", head[:8])
        if n > MAX_SAFETENSORS_HEADER:
            return None
        f.seek(8)
        raw = f.read(n)
    try:
        entry = json.loads(raw.decode("utf-8")).get("__metadata__", {}).get(META_KEY)
        meta = json.loads(entry) if isinstance(entry, str) else None
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") in (WEIGHTS_FORMAT, TRAIN_FORMAT) else None


def _toy_card(path: str, sha256: str) -> dict | None:
    """What the trainer's card beside ``path`` (``<name>.json``) says, or None when there is none. An unreadable card
    is reported (``"error"``), not raised: the weights file is what is described."""
    card_path = os.path.splitext(path)[0] + ".json"
    if not os.path.lexists(card_path):
        return None
    try:
        card = read_json_object(card_path, "toy generator card")
    except (FileNotFoundError, InputFileError) as e:
        return {"path": card_path, "error": str(e)}
    return {"path": card_path, "sha256": card.get("sha256"), "sha256_matches": card.get("sha256") == sha256,
            **{k: card.get(k) for k in ("step", "train_seconds", "command", "validation")}}


def _describe_toy(path: str, obj: dict, toy: dict) -> dict:
    """A file of :mod:`lrag.toy.train` (``toy`` its metadata): a toy generator, checked against its own config on
    the ``meta`` device, or a training checkpoint."""
    from lrag.toy.train import WEIGHTS_FORMAT, ToyConfig  # noqa: PLC0415
    from lrag_ext.memory_format import sha256_file  # noqa: PLC0415

    cfg = ToyConfig.from_dict(toy.get("config"))              # a ValueError names the file (naming_file)
    info: dict = {"path": path, "bytes": os.path.getsize(path), "format": toy["format"], "toy_config": cfg.to_dict()}
    if toy["format"] == WEIGHTS_FORMAT:
        check_generator(cfg.wan_config(), obj)                # every tensor of its config, with the right shapes
        info.update(kind="toy generator", step=toy.get("step"), ema=True,
                    geometry={**infer_geometry(normalize_keys(obj)), "num_heads": cfg.num_heads})
        info["sha256"] = sha256_file(path)
        info["card"] = _toy_card(path, info["sha256"])
        return {**info, **_tensor_stats(obj)}
    state = toy.get("state")
    info.update(kind="toy training checkpoint", step=state.get("step") if isinstance(state, dict) else None,
                ema="ema.patch_embedding.weight" in obj)
    return {**info, **_tensor_stats({k: v for k, v in obj.items() if k.startswith("model.")})}   # the model's


def _tensor_stats(sd: dict) -> dict:
    """The dominant dtype, the element count per dtype, the number of tensors and of parameters."""
    dtypes = Counter()
    for t in sd.values():
        dtypes[str(t.dtype).replace("torch.", "")] += t.numel()
    return {"dtype": dtypes.most_common(1)[0][0] if dtypes else None, "dtypes": dict(dtypes), "num_tensors": len(sd),
            "num_params": int(sum(t.numel() for t in sd.values()))}


def _consistency_config(geo: dict):
    """A :class:`~lrag.config.WanConfig` with the checkpoint's geometry, for the meta-device check (the head count
    and latent size change no parameter shape)."""
    from lrag.config import wan_1_3b  # noqa: PLC0415

    patch = tuple(geo["patch_size"])
    return wan_1_3b(**{**geo, "num_heads": geo.get("num_heads", 1)}, latent_height=patch[1], latent_width=patch[2])


def _entries(obj: dict) -> list[str] | None:
    """Every top-level entry of a wrapper checkpoint, sorted; ``None`` for a plain state dict."""
    return None if all(isinstance(v, torch.Tensor) for v in obj.values()) else sorted(str(k) for k in obj)


def _is_lora(obj: dict) -> bool:
    from lrag.lora import GENERATOR_ENTRY  # noqa: PLC0415

    return GENERATOR_ENTRY in obj or (any(isinstance(k, str) and (".lora_A." in k or ".lora_B." in k) for k in obj)
                                      and not any(isinstance(k, str) and k.endswith("patch_embedding.weight")
                                                  for k in obj))


def _describe_lora(path: str, obj: dict) -> dict:
    """A LoRA adapter file (:mod:`lrag.lora`): rank, adapted layers, parameters."""
    from lrag.lora import read_lora  # noqa: PLC0415

    adapter = read_lora(obj)
    kinds = Counter(name.split(".", 2)[2] if name.startswith("blocks.") else name for name in adapter.layers)
    tensors = {f"{n}.{w}": t for n, ab in adapter.layers.items() for w, t in zip("AB", ab)}
    info = {"path": path, "bytes": os.path.getsize(path), "kind": "LoRA adapter (LongLive lora.pt / peft format)",
            "rank": adapter.rank, "num_layers_adapted": len(adapter.layers), "layer_kinds": dict(sorted(kinds.items())),
            "ema": False, **_tensor_stats(tensors)}
    if _entries(obj) is not None:
        info["top_level_keys"] = _entries(obj)[:20]
    return info


def _describe(path: str, obj: dict) -> dict:
    if _is_lora(obj):
        return _describe_lora(path, obj)
    info: dict = {"path": path, "bytes": os.path.getsize(path)}
    top = _entries(obj)
    if top is not None:
        info["top_level_keys"] = top[:20]       # a wrapper, not a plain state dict (the first 20, for display)
    info["ema"] = "generator_ema" in obj
    sd = normalize_keys(_tensors(select_state_dict(obj)))
    if "patch_embedding.weight" in sd:
        from lrag.registry import identify  # noqa: PLC0415

        info["kind"] = "generator"
        info["geometry"] = infer_geometry(sd)
        info["all_top_level_keys"] = top          # every entry, for the registry's comparison
        match = identify(path, info["geometry"], top)
        info["release"] = match.entry.name if match.entry is not None else None
        info["registry"] = match.describe()
        info["backbone_guess"] = (f"{match.entry.backbone} (the registered release {match.entry.name})"
                                  if match.entry is not None else guess_backbone(path, list(sd)))
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
    return {**info, **_tensor_stats(sd)}


def format_description(info: dict) -> str:
    """The human-readable report of ``lrag inspect``."""
    lines = [f"{info['path']} ({info['bytes'] / 2 ** 20:.1f} MiB)", f"  kind:        {info['kind']}"]
    if "format" in info:
        lines[-1] += f" ({info['format']}, written by lrag train-toy)"
    if "backbone_guess" in info:
        lines.append(f"  backbone:    {info['backbone_guess']}")
    if "registry" in info:
        lines.append(f"  release:     {info['registry']}")
        if info.get("release"):
            lines += _format_release(info["release"])
    geo = info.get("geometry")
    if geo:
        heads = geo.get("num_heads")
        lines += [f"  layers:      {geo['num_layers']}", f"  dim:         {geo['dim']}",
                  f"  heads:       {heads} (from its config)" if "toy_config" in info else
                  f"  heads:       {heads} (guessed: dim / 128)" if heads else
                  "  heads:       not inferable from shapes (pass --num-heads)",
                  f"  ffn_dim:     {geo['ffn_dim']}", f"  text_dim:    {geo['text_dim']}",
                  f"  freq_dim:    {geo['freq_dim']}", f"  in/out dim:  {geo['in_dim']}/{geo['out_dim']}",
                  f"  patch:       {tuple(geo['patch_size'])}"]
    if "toy_config" in info:
        lines += _format_toy(info)
    if "embedding_dim" in info:
        lines.append(f"  embedding:   {info['embedding_dim']}-d")
    if "rank" in info:
        kinds = ", ".join(f"{k} x{n}" for k, n in info["layer_kinds"].items())
        lines += [f"  rank:        {info['rank']} (scale = alpha / rank; the file has no alpha: --lora-alpha, "
                  "default the rank)", f"  adapted:     {info['num_layers_adapted']} Linear layers ({kinds})",
                  "  use:         lrag generate --lora FILE (with the base generator as --checkpoint)"]
    if "top_level_keys" in info:
        lines.append(f"  top level:   {', '.join(info['top_level_keys'][:8])}")
    ema = ("n/a (an adapter)" if "rank" in info else
           "yes (the exported weights are the training's EMA)" if info["kind"] == "toy generator" else
           "yes (ema.*, beside the trained model.* and the optimizer state)" if "toy_config" in info and info["ema"]
           else "yes (generator_ema, used by default)" if info["ema"] else "no")
    lines += [f"  EMA:         {ema}",
              f"  dtype:       {info['dtype']}", f"  tensors:     {info['num_tensors']}",
              f"  parameters:  {info['num_params']:,}"]
    return "\n".join(lines)


def _format_release(name: str) -> list[str]:
    """What ``lrag generate`` takes from the registered release ``name``."""
    from lrag.registry import entry  # noqa: PLC0415

    e = entry(name)
    first = f", first block {list(e.first_block_steps)}" if e.first_block_steps else ""
    lines = [f"  runs with:   {e.frames_per_block} frame(s) per block, steps {list(e.steps)}{first}, window {e.window}, "
             f"sink {e.sink}, the {e.ema_key!r} entry",
             f"  released:    {e.describe_release_attention()} attention; {e.upstream}"]
    if e.lora:
        lines.append(f"  adapter:     released with {e.lora['file']} (rank {e.lora['rank']}, alpha {e.lora['alpha']}): "
                     "lrag generate --lora")
    return lines


def _format_toy(info: dict) -> list[str]:
    """The toy lines of :func:`format_description`: frames, schedule, sampler, step; for a toy generator its
    sha256 and what its card says."""
    c, w = info["toy_config"], info["toy_config"]["world"]
    lines = [f"  frames:      {w['channels']} x {w['size']} x {w['size']} (toy-world frames used as latents); text "
             f"{c['text_len']} x {c['text_dim']} (the toy has no prompt)",
             f"  schedule:    {c['frames_per_block']} frames per block, window {c['window']}, sink {c['sink']}, "
             f"{c['position_mode']} RoPE positions" + (
                 f"; trained with {c['memory_top_k']} retrieved frames in its memory slots (R "
                 f"{c.get('memory_recent_exclude')})" if c.get("memory_top_k") else ""),
             f"  sampler:     {c['sample_steps']} steps (Euler), shift {c['shift']:g}",
             f"  step:        {info['step']} of {c['steps']}"]
    if info["kind"] != "toy generator":
        return lines + ["  use:         lrag train-toy --resume (its exported weights: toy_generator.safetensors)"]
    card = info.get("card")
    if card is None:
        return lines + [f"  sha256:      {info['sha256']} (no card {os.path.splitext(os.path.basename(info['path']))[0]}"
                        ".json beside it)"]
    if "error" in card:
        return lines + [f"  sha256:      {info['sha256']}", f"  card:        unreadable: {card['error']}"]
    match = "matches" if card["sha256_matches"] else f"does NOT match: the card says {card['sha256']}"
    lines.append(f"  sha256:      {info['sha256']} ({match} the card {card['path']})")
    val = card.get("validation") or {}
    if isinstance(val.get("val_loss"), (int, float)):
        base = val.get("val_baseline")
        lines.append(f"  validation:  flow-matching loss {val['val_loss']:.4f}" +
                     (f" (constant baseline {base:.4f})" if isinstance(base, (int, float)) else "") +
                     (f", clips {val['val_seeds'][0]}-{val['val_seeds'][1]}"
                      if isinstance(val.get("val_seeds"), list) and len(val["val_seeds"]) == 2 else ""))
    if card.get("command"):
        secs = card.get("train_seconds")
        lines.append(f"  trained:     {card['command']}" + (f" ({secs:g} s)" if isinstance(secs, (int, float)) else ""))
    return lines
