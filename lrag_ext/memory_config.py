"""Configuration of a :class:`lrag_ext.RetrievalMemory`: the K/V geometry of the backbone and the memory's
policy, storage mode, tiers and dtypes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lrag_ext.policy import RetrievalPolicy
from lrag_ext.positions import check_policy

STORAGE_MODES = ("kv", "latent", "embedding")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class KVLayout:
    """Per-frame K/V geometry of the backbone: one slot is ``[num_layers, 2, tokens_per_frame, num_heads, head_dim]``.

    ``rope_temporal_pairs`` (``None``: Wan's split, 22 for head_dim 128) and ``rope_theta`` describe how
    :meth:`RetrievalMemory.gather` re-positions K.
    """

    num_layers: int
    tokens_per_frame: int
    num_heads: int
    head_dim: int
    rope_temporal_pairs: int | None = None
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name in ("num_layers", "tokens_per_frame", "num_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KVLayout.{name} must be an int >= 1, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"KVLayout.head_dim must be even (RoPE pairs), got {self.head_dim}")

    def frame_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one frame's K/V slot ``[num_layers, 2, tokens_per_frame, num_heads, head_dim]`` in ``dtype``."""
        return (self.num_layers * 2 * self.tokens_per_frame * self.num_heads * self.head_dim
                * torch.empty((), dtype=dtype).element_size())

    @property
    def frame_shape(self) -> tuple[int, int, int, int]:
        """Shape of one frame's K (or V) across layers as :meth:`RetrievalMemory.append` takes it, minus the frame
        dim: ``(num_layers, tokens_per_frame, num_heads, head_dim)``."""
        return (self.num_layers, self.tokens_per_frame, self.num_heads, self.head_dim)


@dataclass(frozen=True)
class MemoryConfig:
    """Configuration of a :class:`RetrievalMemory` (defaults: the reference release's retrieval policy).

    The one retrieval configuration: :class:`lrag.Pipeline` takes it too, filling in the fields its backbone
    determines (``sink_frames``, ``window_frames``, ``embed_dim``, ``kv_layout``, ``latent_shape``, ``device``,
    ``dtype``; see :func:`lrag.config.memory_config_for`). So the geometry fields may be left unset (``None``)
    here; :class:`RetrievalMemory` requires the one its ``storage`` needs (:meth:`check_complete`).

    Attributes:
        top_k, recent_exclude, sink_frames, window_frames: the retrieval policy (:class:`RetrievalPolicy`).
        embed_dim: embedding size D.
        storage: ``"kv"`` | ``"latent"`` | ``"embedding"`` (what is kept per frame besides its embedding).
        kv_layout: K/V geometry; required for ``storage="kv"`` by the memory.
        latent_shape: ``(C, H, W)`` of one latent frame; required for ``storage="latent"`` by the memory.
        device: where embeddings, latents and the device K/V tier live.
        dtype: storage dtype of K/V and latents: float32, float16, bfloat16, or (K/V only) float8_e4m3fn, which
            halves the bytes of bf16 with one float32 scale per (frame, layer, K/V), dequantised by the gather.
        embed_dtype: storage dtype of embeddings.
        max_frames: frames (all streams together) the embedding pages can hold.
        page_size: frames per embedding page.
        device_frames: K/V slots on ``device``.
        host_frames: K/V slots in pinned host memory at most (``None``: unbounded); allocated lazily.
        pin_host: pin the host tier (only meaningful when ``device`` is a GPU, where the gather reads the host tier
            in place: ``False`` there requires ``host_frames=0``).
        memory_position: the temporal RoPE position policy of retrieved frames (:mod:`lrag_ext.positions`): an
            int (all at that position; ``0`` = ``"sink"``, the sink's phase, the reference's choice),
            ``"absolute"`` (their global frame index) or ``"ordered"`` (in temporal order just before the local
            window). :meth:`RetrievalMemory.gather` rotates K to it when called without ``positions``; the
            generator hands it to its cache (its attention applies RoPE by position).
    """

    top_k: int = 6
    recent_exclude: int = 5
    sink_frames: int = 1
    window_frames: int = 12
    embed_dim: int = 1024
    storage: str = "kv"
    kv_layout: KVLayout | None = None
    latent_shape: tuple[int, int, int] | None = None
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.bfloat16
    embed_dtype: torch.dtype = torch.float32
    max_frames: int = 4096
    page_size: int = 16
    device_frames: int = 64
    host_frames: int | None = None
    pin_host: bool = True
    memory_position: int | str = 0

    def __post_init__(self):
        self.policy  # validates the policy fields
        check_policy(self.memory_position, "memory_position")
        if self.storage not in STORAGE_MODES:
            raise ValueError(f"storage must be one of {STORAGE_MODES}, got {self.storage!r}")
        if self.storage == "kv" and self.kv_layout is not None and not isinstance(self.kv_layout, KVLayout):
            raise ValueError(f"storage='kv' needs kv_layout=KVLayout(num_layers, tokens_per_frame, num_heads, "
                             f"head_dim), got {type(self.kv_layout).__name__}")
        if self.storage == "latent" and self.latent_shape is not None:
            if (not isinstance(self.latent_shape, tuple) or len(self.latent_shape) != 3
                    or not all(isinstance(s, int) and s >= 1 for s in self.latent_shape)):
                raise ValueError(f"storage='latent' needs latent_shape=(C, H, W) of ints >= 1, got {self.latent_shape!r}")
        for name, low in (("embed_dim", 1), ("max_frames", 1), ("page_size", 1), ("device_frames", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.host_frames is not None and (not isinstance(self.host_frames, int) or self.host_frames < 0):
            raise ValueError(f"host_frames must be None or an int >= 0, got {self.host_frames!r}")
        if self.embed_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"embed_dtype must be float32, float16 or bfloat16, got {self.embed_dtype}")
        if self.dtype not in _FLOAT_DTYPES + (torch.float8_e4m3fn,):
            raise ValueError(f"dtype must be float32, float16, bfloat16 or float8_e4m3fn, got {self.dtype}")
        if self.dtype == torch.float8_e4m3fn and self.storage != "kv":
            raise ValueError(f"dtype float8_e4m3fn is a K/V storage option (storage='kv'), not for {self.storage!r}")
        if self.storage == "kv" and self.device_frames + (self.host_frames if self.host_frames is not None else 1) == 0:
            raise ValueError("storage='kv' needs device_frames + host_frames >= 1")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError, ValueError) as err:
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {self.device!r} ({err})") \
                from None
        if self.storage == "kv" and device.type == "cuda" and not self.pin_host and self.host_frames != 0:
            raise ValueError("pin_host=False on a CUDA device needs host_frames=0: the CUDA gather reads the host "
                             "tier in place, which only pinned memory allows")

    def check_complete(self) -> None:
        """Raises ``ValueError`` unless the geometry field ``storage`` needs is set: ``kv_layout`` for ``"kv"``,
        ``latent_shape`` for ``"latent"`` (a memory cannot be built without it; the generator fills both in)."""
        if self.storage == "kv" and self.kv_layout is None:
            raise ValueError("storage='kv' needs kv_layout=KVLayout(num_layers, tokens_per_frame, num_heads, head_dim)")
        if self.storage == "latent" and self.latent_shape is None:
            raise ValueError("storage='latent' needs latent_shape=(C, H, W) of ints >= 1, got None")

    @property
    def policy(self) -> RetrievalPolicy:
        return RetrievalPolicy(top_k=self.top_k, recent_exclude=self.recent_exclude, sink_frames=self.sink_frames,
                               window_frames=self.window_frames)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["device"] = str(self.device)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        d["embed_dtype"] = str(self.embed_dtype).removeprefix("torch.")
        d["latent_shape"] = list(self.latent_shape) if self.latent_shape else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryConfig":
        d = dict(d)
        d["dtype"] = getattr(torch, d["dtype"])
        d["embed_dtype"] = getattr(torch, d["embed_dtype"])
        d["kv_layout"] = KVLayout(**d["kv_layout"]) if d.get("kv_layout") else None
        d["latent_shape"] = tuple(d["latent_shape"]) if d.get("latent_shape") else None
        return cls(**d)
