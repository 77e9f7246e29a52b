"""lrag: the reference LongLive-RAG generator built on :mod:`lrag_ext`.

- :mod:`lrag.config`: :class:`WanConfig` (geometry + window/sink), presets :func:`wan_1_3b`, :func:`tiny_from_run_json`;
  :func:`memory_config_for`: the retrieval memory's :class:`lrag_ext.MemoryConfig` with the backbone's fields filled in
  (:func:`RetrievalConfig`: deprecated, returns a ``MemoryConfig``).
- :mod:`lrag.models.wan`: :class:`CausalWanModel`, the causal Wan DiT with a ``[sink | memory | local]`` KV cache.
- :mod:`lrag.checkpoint`: :func:`load_generator` for released Self-Forcing / Causal-Forcing / LongLive weights.
- :mod:`lrag.scheduler`: the few-step flow-matching sampler.
- :mod:`lrag.cli`: the ``lrag`` command (``generate`` incl. the built-in ``--demo``, ``inspect``, ``train-embedder``;
  docs/cli.md).
- :mod:`lrag.pipeline`: :class:`Pipeline`, the block loop (``native`` / ``rag``, with :class:`lrag_ext.RetrievalMemory`).
"""
from lrag_ext import MemoryConfig
from lrag.checkpoint import build_generator, load_generator
from lrag.config import RetrievalConfig, WanConfig, memory_config_for, tiny_from_run_json, wan_1_3b
from lrag.models.wan import CausalWanModel, KVCache
from lrag.pipeline import GenerationResult, Pipeline
from lrag.scheduler import FlowMatchScheduler

__all__ = ["CausalWanModel", "FlowMatchScheduler", "GenerationResult", "KVCache", "MemoryConfig", "Pipeline",
           "RetrievalConfig", "WanConfig", "build_generator", "load_generator", "memory_config_for",
           "tiny_from_run_json", "wan_1_3b"]
