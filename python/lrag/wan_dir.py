"""Validation of a local Wan2.1-T2V-1.3B folder in the Diffusers layout (``--wan-dir``).

Only the parts the generator needs are checked: ``text_encoder/`` (umT5 encoder, transformers), ``tokenizer/``
and ``vae/`` (AutoencoderKLWan, diffusers). ``transformer/`` (the bidirectional Wan DiT) is not used: the
causal generator comes from ``--checkpoint``.
"""
from __future__ import annotations

import json
import os

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

    Raises:
        WanDirError: naming the first missing file (or shard of a sharded checkpoint) and how to obtain it.
    """
    if path is None:
        raise WanDirError(f"--wan-dir is required to encode the prompt and decode the video: {HOW_TO_GET}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise WanDirError(f"--wan-dir {path!r} is not a directory: {HOW_TO_GET}")
    for part in parts:
        folder = os.path.join(path, part)
        for alternatives in REQUIRED[part]:
            found = [name for name in alternatives if os.path.isfile(os.path.join(folder, name))]
            if not found:
                names = " or ".join(os.path.join(part, n) for n in alternatives)
                raise WanDirError(f"--wan-dir {path!r} is incomplete: missing {names}. {HOW_TO_GET}")
            if found[0].endswith(".index.json"):
                _check_shards(path, part, found[0])
    return path


def _check_shards(root: str, part: str, index_name: str) -> None:
    """Every shard named in a ``*.index.json`` weight map must exist."""
    index_path = os.path.join(root, part, index_name)
    try:
        with open(index_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError) as e:
        raise WanDirError(f"--wan-dir: {os.path.join(part, index_name)} is unreadable ({e}). {HOW_TO_GET}") from None
    for shard in shards:
        if not os.path.isfile(os.path.join(root, part, shard)):
            raise WanDirError(f"--wan-dir {root!r} is incomplete: missing {os.path.join(part, shard)} "
                              f"(listed in {index_name}). {HOW_TO_GET}")
