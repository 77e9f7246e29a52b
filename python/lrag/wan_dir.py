"""Validation of a local Wan2.1-T2V-1.3B folder in the Diffusers layout (``--wan-dir``).

Only the parts the generator needs are checked: ``text_encoder/`` (umT5 encoder, transformers), ``tokenizer/``
and ``vae/`` (AutoencoderKLWan, diffusers). ``transformer/`` (the bidirectional Wan DiT) is not used: the
causal generator comes from ``--checkpoint``.
"""
from __future__ import annotations

import os

from lrag_ext.state_dicts import (InputFileError, check_regular_file, open_regular_file, read_json_object,
                                  read_safetensors_header)

HF_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
HOW_TO_GET = (f"download it once with `huggingface-cli download {HF_REPO} --local-dir PATH` (or `hf download`) "
              f"and pass --wan-dir PATH")

# Each entry: (sub-folder, one of these files must exist). Sharded weights are checked through their index.
REQUIRED = {
    "text_encoder": [("config.json",), ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                        "pytorch_model.bin.index.json")],
    "tokenizer": [("tokenizer_config.json",), ("tokenizer.json", "spiece.model")],
    "vae": [("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")],
}


class WanDirError(FileNotFoundError):
    """The ``--wan-dir`` folder is missing or incomplete; the message names the missing file."""


def check_wan_dir(path: str | os.PathLike, parts: tuple[str, ...] = ("text_encoder", "tokenizer", "vae")) -> str:
    """Checks that ``path`` holds the files :mod:`lrag.text` and :mod:`lrag.vae` load; returns it as a str.

    Beyond their presence, every JSON file used (``config.json``, ``tokenizer_config.json``, ``tokenizer.json``,
    weight indexes) must hold a JSON object, the VAE config's ``z_dim`` / ``latents_mean`` / ``latents_std``
    must agree, and every ``.safetensors`` weight file (each shard) must have a header that fits the file.

    Raises:
        WanDirError: naming the first missing file (or shard of a sharded checkpoint) and how to obtain it.
        lrag_ext.state_dicts.InputFileError: (a ``ValueError``) naming a file that is there but unusable:
            malformed JSON, inconsistent VAE config, truncated weights, a directory or FIFO in its place.
    """
    if path is None:
        raise WanDirError(f"--wan-dir is required to encode the prompt and decode the video: {HOW_TO_GET}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise WanDirError(f"--wan-dir {path!r} is not a directory: {HOW_TO_GET}")
    for part in parts:
        folder = os.path.join(path, part)
        for alternatives in REQUIRED[part]:
            found = [name for name in alternatives if os.path.lexists(os.path.join(folder, name))]
            if not found:
                names = " or ".join(os.path.join(part, n) for n in alternatives)
                raise WanDirError(f"--wan-dir {path!r} is incomplete: missing {names}. {HOW_TO_GET}")
            _check_file(path, part, found[0])
    return path


def _check_file(root: str, part: str, name: str) -> None:
    """One required file: JSON parsed, safetensors header checked, shards of an index checked in turn."""
    file = os.path.join(root, part, name)
    what = "--wan-dir file"
    if name.endswith(".json"):
        obj = read_json_object(file, what)
        if name.endswith(".index.json"):
            _check_shards(root, part, name, obj)
        elif part == "vae" and name == "config.json":
            _check_vae_config(file, obj)
    elif name.endswith(".safetensors"):
        with open_regular_file(file, what) as f:
            read_safetensors_header(f, file, os.fstat(f.fileno()).st_size, what)
    else:
        check_regular_file(file, what)


def _check_shards(root: str, part: str, index_name: str, index: dict) -> None:
    """Every shard named in a ``*.index.json`` weight map must exist (and be usable)."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputFileError(os.path.join(root, part, index_name),
                             "has no 'weight_map' object of tensor name -> shard file", "--wan-dir file")
    for shard in sorted(set(weight_map.values())):
        if not os.path.lexists(os.path.join(root, part, shard)):
            raise WanDirError(f"--wan-dir {root!r} is incomplete: missing {os.path.join(part, shard)} "
                              f"(listed in {index_name}). {HOW_TO_GET}")
        _check_file(root, part, shard)


def _check_vae_config(file: str, cfg: dict) -> None:
    """``z_dim`` a positive int, ``latents_mean`` / ``latents_std`` (when given) ``z_dim`` numbers each."""
    z = cfg.get("z_dim", 16)
    if type(z) is not int or z < 1:
        raise InputFileError(file, f"z_dim must be a positive int, got {z!r}", "--wan-dir file")
    for key in ("latents_mean", "latents_std"):
        values = cfg.get(key)
        if values is not None and not (isinstance(values, list) and len(values) == z and
                                       all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise InputFileError(file, f"{key} must be a list of z_dim = {z} numbers", "--wan-dir file")
