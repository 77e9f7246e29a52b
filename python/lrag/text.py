"""Prompt encoding with the umT5 encoder of a local Wan folder (transformers, imported lazily)."""
from __future__ import annotations

import os

import torch

from lrag.wan_dir import check_wan_dir


def _transformers():
    try:
        import transformers  # noqa: PLC0415  (optional dependency: pip install -e .[gen])
    except ImportError as e:
        raise RuntimeError(f"encoding prompts needs transformers: pip install -e .[gen] ({e})") from None
    return transformers


class TextEncoder:
    """``encode(prompts) -> [B, text_len, d_model]``: umT5 encoder states, zero beyond each prompt's tokens.

    As in Wan, each prompt (whitespace collapsed) is tokenised to at most ``text_len`` tokens (the EOS
    included) and encoded with its attention mask; the states past its length are zeroed (the DiT pads with
    zeros to ``text_len``).

    Args:
        wan_dir: the Diffusers-layout Wan folder (``text_encoder/``, ``tokenizer/``).
        text_len: the DiT's text length (512 for Wan2.1).
        tokenizer: an already built tokenizer (a callable as transformers' ``tokenizer(texts, ...)``); default
            ``AutoTokenizer.from_pretrained(wan_dir/tokenizer)``.
    """

    def __init__(self, wan_dir: str | os.PathLike, text_len: int = 512, device="cpu",
                 dtype: torch.dtype = torch.float32, tokenizer=None):
        wan_dir = check_wan_dir(wan_dir, ("text_encoder",) if tokenizer is not None else ("text_encoder",
                                                                                          "tokenizer"))
        tf = _transformers()
        self.tokenizer = tokenizer or tf.AutoTokenizer.from_pretrained(os.path.join(wan_dir, "tokenizer"))
        self.model = tf.UMT5EncoderModel.from_pretrained(os.path.join(wan_dir, "text_encoder"), torch_dtype=dtype)
        self.model.to(device).eval()
        self.text_len = text_len
        self.device = torch.device(device)

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        prompts = [" ".join(p.split()) for p in prompts]      # Wan's whitespace clean-up of prompts
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.text_len, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return states * mask[..., None].to(states.dtype)
