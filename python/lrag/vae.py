"""Block-by-block decoding with the Wan VAE of a local Wan folder (diffusers ``AutoencoderKLWan``, lazy import).

The Wan VAE decoder is causal in time: diffusers' ``AutoencoderKLWan.decode`` runs it one latent frame at a
time and carries each causal convolution's last input frames in a feature cache (the first latent frame gives
1 video frame, every later one 4). :class:`StreamingVAEDecoder` runs the same loop but keeps that cache
between calls, so decoding a video block by block gives the frames ``vae.decode(all latents)`` would, without
ever holding all latents or frames (``tests/test_cli.py`` checks the equality on a tiny VAE).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from lrag.wan_dir import check_wan_dir


def load_vae(wan_dir: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32):
    """``AutoencoderKLWan.from_pretrained(wan_dir/vae)`` in eval mode."""
    wan_dir = check_wan_dir(wan_dir, ("vae",))
    try:
        from diffusers import AutoencoderKLWan  # noqa: PLC0415  (optional dependency: pip install -e .[gen])
    except ImportError as e:
        raise RuntimeError(f"decoding video needs diffusers (AutoencoderKLWan): pip install -e .[gen] ({e})") from None
    return AutoencoderKLWan.from_pretrained(os.path.join(wan_dir, "vae"), torch_dtype=dtype).to(device).eval()


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """``[C=3, T, H, W]`` in [-1, 1] -> ``uint8 [T, H, W, 3]``."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


class StreamingVAEDecoder:
    """Decodes the latent video of one stream block by block, carrying the decoder's causal cache.

    ``decode(latents [F, C, h, w])`` (the generator's normalised latents) returns ``uint8 [N, H, W, 3]`` with
    ``N = 4F`` (``4F - 3`` for the first block). The latents are de-normalised with the VAE config's
    ``latents_mean`` / ``latents_std`` (``z * std + mean``), as the Wan pipelines do before decoding.
    """

    def __init__(self, vae):
        for name in ("clear_cache", "post_quant_conv", "decoder"):
            if not hasattr(vae, name):
                raise RuntimeError(f"this diffusers version's AutoencoderKLWan has no {name!r}: streaming decode "
                                   "needs diffusers >= 0.33")
        self.vae = vae
        cfg = vae.config
        z = cfg.z_dim
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)
        self.frames_in = 0
        vae.clear_cache()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.vae
        param = next(vae.parameters())
        z = latents.float().cpu().permute(1, 0, 2, 3).unsqueeze(0)            # [1, C, F, h, w]
        z = (z * self.std + self.mean).to(device=param.device, dtype=param.dtype)
        x = vae.post_quant_conv(z)
        outs = []
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                    first_chunk=self.frames_in == 0))
            self.frames_in += 1
        out = torch.cat(outs, dim=2)
        patch = getattr(vae.config, "patch_size", None)
        if patch is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify  # noqa: PLC0415
            out = unpatchify(out, patch_size=patch)
        return to_uint8(out[0])

    def close(self) -> None:
        """Frees the causal cache."""
        self.vae.clear_cache()
