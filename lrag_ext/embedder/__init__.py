"""The LongLive-RAG frame embedder: what turns each latent frame into a retrieval key.

Inference API (all a retrieval memory or generator needs)::

    model = load_embedder("ae_epoch_best.pt", map_location="cuda")   # LatentAE or PooledEmbedder
    keys = model.embed(frames)            # frames [N, C, H, W] -> [N, D] float32, unit L2 norm
    keys = mean_descriptor(frames)        # fallback without an embedder: [N, C] spatial mean (not normalised)

``LatentAE.embed`` runs the conv trunk on the framework's convolutions and the fused ``embed_head`` op for
GroupNorm -> SiLU -> pool -> Linear -> normalise; ``PooledEmbedder.embed`` is one fused ``pooled_embed`` op.
Training: :mod:`lrag_ext.embedder.losses` and ``python -m lrag_ext.embedder.train``.
"""
from lrag_ext.embedder.checkpoint import build_embedder, load_embedder, load_latent_ae, load_state_strict
from lrag_ext.embedder.losses import (LossTerms, embedder_losses, reconstruction_loss, smoothness_loss,
                                      window_temporal_delta_loss)
from lrag_ext.embedder.model import AEConfig, LatentAE, num_groups
from lrag_ext.embedder.pooled import PooledConfig, PooledEmbedder
from lrag_ext.reference import mean_descriptor

__all__ = ["AEConfig", "LatentAE", "LossTerms", "PooledConfig", "PooledEmbedder", "build_embedder",
           "embedder_losses", "load_embedder", "load_latent_ae", "load_state_strict", "mean_descriptor",
           "num_groups", "reconstruction_loss", "smoothness_loss", "window_temporal_delta_loss"]
