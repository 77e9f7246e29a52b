"""lrag_ext: retrieval memory kernels for autoregressive video diffusion (LongLive-RAG).

The compiled ops live under ``torch.ops.lrag_ext``; this package wraps each in a documented function
(:mod:`lrag_ext.ops`) and defines its semantics in pure PyTorch (:mod:`lrag_ext.reference`).
"""
from lrag_ext._extension import load_compiled_module as _load

_C = _load()

from lrag_ext import ops, reference  # noqa: E402  (ops need _C loaded first)
from lrag_ext.ops import (cosine_topk, embed_head, gather_kv, kv_pool_empty, kv_pool_scale_empty,  # noqa: E402
                          pooled_embed, write_kv)

SlotAllocator = _C.SlotAllocator

from lrag_ext.memory import RetrievalMemory, RetrievalPlan  # noqa: E402
from lrag_ext.memory_log import RetrievalRecord  # noqa: E402
from lrag_ext.memory_config import KVLayout, MemoryConfig  # noqa: E402
from lrag_ext.policy import RetrievalPolicy  # noqa: E402

__version__ = "0.1.0"


def build_info() -> dict:
    """How the compiled module was built: ``torch_version``, ``cuda`` (bool), ``cuda_version``, ``cuda_archs``,
    ``openmp``."""
    return dict(_C.build_info())


__all__ = ["KVLayout", "MemoryConfig", "RetrievalMemory", "RetrievalPlan", "RetrievalPolicy", "RetrievalRecord",
           "SlotAllocator", "build_info", "cosine_topk", "embed_head", "gather_kv", "kv_pool_empty",
           "kv_pool_scale_empty", "ops", "pooled_embed", "reference", "write_kv"]
