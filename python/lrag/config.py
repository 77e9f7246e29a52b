"""Geometry and cache policy of the causal Wan backbone (nothing else in :mod:`lrag` hard-codes a size), and the
retrieval memory's configuration derived from it (:func:`memory_config_for`)."""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass

import torch

from lrag_ext.memory_config import KVLayout, MemoryConfig
from lrag_ext.state_dicts import naming_file, read_json_object


@dataclass(frozen=True)
class WanConfig:
    """Everything the causal Wan DiT and its block loop need to know about sizes.

    Model fields follow the original Wan ``config.json`` (``dim``, ``ffn_dim``, ``num_heads``, ...). The cache
    fields describe the block-autoregressive schedule: ``window`` latent frames of self-attention cache of which
    the first ``sink`` are kept forever, ``frames_per_block`` frames generated per block.
    """

    num_layers: int
    dim: int
    num_heads: int
    ffn_dim: int
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_dim: int = 16
    out_dim: int = 16
    latent_height: int = 60
    latent_width: int = 104
    frames_per_block: int = 3
    window: int = 12
    sink: int = 1
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_max_positions: int = 1024
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        positive = ("num_layers", "dim", "num_heads", "ffn_dim", "freq_dim", "text_dim", "text_len", "in_dim",
                    "out_dim", "latent_height", "latent_width", "frames_per_block", "window")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"WanConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"WanConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2:
            raise ValueError(f"WanConfig head_dim = dim / num_heads must be even, got {self.head_dim}")
        if self.freq_dim % 2:
            raise ValueError(f"WanConfig.freq_dim must be even, got {self.freq_dim}")
        if len(self.patch_size) != 3 or self.patch_size[0] != 1:
            raise ValueError(f"WanConfig.patch_size must be (1, ph, pw), got {self.patch_size!r}")
        if self.latent_height % self.patch_size[1] or self.latent_width % self.patch_size[2]:
            raise ValueError(f"latent size {self.latent_height}x{self.latent_width} is not divisible by the patch "
                             f"{self.patch_size[1]}x{self.patch_size[2]}")
        if not 0 <= self.sink < self.window:
            raise ValueError(f"WanConfig.sink must be in [0, window), got sink={self.sink}, window={self.window}")
        if self.frames_per_block > self.window - self.sink:
            raise ValueError(f"frames_per_block ({self.frames_per_block}) must fit in the non-sink window "
                             f"({self.window - self.sink})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid ``(h, w)`` of one latent frame."""
        return self.latent_height // self.patch_size[1], self.latent_width // self.patch_size[2]

    @property
    def tokens_per_frame(self) -> int:
        return math.prod(self.grid)

    def replace(self, **changes) -> "WanConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_wan_config(cls, cfg: dict | str, **overrides) -> "WanConfig":
        """Builds a config from a Wan/diffusers ``config.json`` (a dict, a JSON string or a path).

        Keys the backbone does not use (``_class_name``, ``model_type``, ...) are ignored; ``overrides`` set the
        fields a ``config.json`` does not hold (latent size, window, sink, frames per block).

        Raises:
            FileNotFoundError: a path that does not exist.
            lrag_ext.state_dicts.InputFileError: (a ``ValueError``) a path whose file is not a JSON object or
                gives an invalid config, naming the file.
            ValueError, TypeError: the same for a dict or JSON string.
        """
        path = None
        if isinstance(cfg, str) and not cfg.lstrip().startswith("{"):
            path, cfg = cfg, read_json_object(cfg, "Wan config")
        with naming_file(path, "Wan config"):
            if isinstance(cfg, str):
                cfg = json.loads(cfg)
            if not isinstance(cfg, dict):
                raise TypeError(f"a Wan config must be a JSON object, got {type(cfg).__name__}")
            names = {f.name for f in dataclasses.fields(cls)}
            kwargs = {k: v for k, v in cfg.items() if k in names}
            if "patch_size" in kwargs:
                kwargs["patch_size"] = tuple(kwargs["patch_size"])
            kwargs.update(overrides)
            return cls(**kwargs)


def wan_1_3b(**overrides) -> WanConfig:
    """Wan2.1-T2V-1.3B as used by Self-Forcing / Causal-Forcing / LongLive (480x832 video, 60x104 latents): the
    geometry of the checkpoint registry (``lrag/data/checkpoints.json``), 512 text tokens, the reference schedule
    (3 frames per block, window 12, sink 1)."""
    from lrag.registry import geometry  # noqa: PLC0415

    base = dict(geometry("wan2.1-t2v-1.3b"), text_len=512, latent_height=60, latent_width=104, frames_per_block=3,
                window=12, sink=1)
    base["patch_size"] = tuple(base["patch_size"])
    base.update(overrides)
    return WanConfig(**base)


def tiny_from_run_json(run: dict | str, **overrides) -> WanConfig:
    """The tiny test model of the official fixtures, from a ``*_run.json`` (dict or path).

    Reads ``tiny_model_config_json`` for the DiT, and the run's block size and window/sink for the schedule;
    the latent size follows from ``tokens_per_frame`` and the patch (square latents, as in the fixtures).

    Raises:
        As :meth:`WanConfig.from_wan_config` (a missing or ill-typed entry is a ``ValueError`` naming the file).
    """
    path = None
    if isinstance(run, str):
        path, run = run, read_json_object(run, "run JSON")
    with naming_file(path, "run JSON"):
        kwargs = _entry(run, "resolved_config", dict).get("model_kwargs", {})
        if not isinstance(kwargs, dict):
            raise TypeError(f"resolved_config.model_kwargs must be an object, got {type(kwargs).__name__}")
        model_cfg = _entry(run, "tiny_model_config_json", (dict, str))
        if isinstance(model_cfg, str):
            model_cfg = json.loads(model_cfg)
        if not isinstance(model_cfg, dict):
            raise TypeError(f"tiny_model_config_json must be an object, got {type(model_cfg).__name__}")
        patch = model_cfg.get("patch_size", (1, 2, 2))
        if not isinstance(patch, (list, tuple)) or len(patch) != 3:
            raise ValueError(f"patch_size must be 3 ints, got {patch!r}")
        tokens = _entry(run, "tokens_per_frame", int)
        side = int(round(math.sqrt(tokens))) * patch[1]
        base = dict(latent_height=side, latent_width=side, frames_per_block=_entry(run, "num_frame_per_block", int),
                    window=kwargs.get("local_attn_size", 12), sink=kwargs.get("sink_size", 1))
        base.update(overrides)
        return WanConfig.from_wan_config(model_cfg, **base)


def _entry(obj: dict, key: str, types):
    """``obj[key]``, which must be of ``types`` (a ``ValueError`` / ``TypeError`` naming ``key`` otherwise)."""
    if key not in obj:
        raise ValueError(f"no {key!r} entry")
    if not isinstance(obj[key], types):
        raise TypeError(f"{key!r} has the wrong type ({type(obj[key]).__name__})")
    return obj[key]



GENERATOR_STORAGE = ("kv", "latent")      # the MemoryConfig.storage modes the generator can attend to


def memory_config_for(cfg: WanConfig, retrieval: MemoryConfig | None, embed_dim: int | None = None,
                      device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> MemoryConfig:
    """The configuration of the generator's retrieval memory: ``retrieval`` (the user's choices: ``top_k``,
    ``recent_exclude``, ``memory_position``, ``storage``, the tiers, ...; default ``MemoryConfig()``) with the
    fields the backbone determines filled in: ``sink_frames`` / ``window_frames`` = the
    model's ``sink`` / ``window``; ``kv_layout`` from its layers, tokens per frame, heads, head size and RoPE theta;
    ``latent_shape`` = ``(in_dim, latent_height, latent_width)``; ``device`` / ``dtype`` = the model's (K/V and
    latents are stored in the model's dtype); ``embed_dim`` = the embedder's output size. ``embed_dim``,
    ``device`` or ``dtype`` ``None``: that field is kept as given and not checked (not known yet: the pipeline
    fills them in when it builds the memory, from the model as it is then and the embedder's output).

    Conflicts: a model-derived field left at its ``MemoryConfig`` default counts as unset and is filled in; one set
    to any other value must equal the backbone's, else this raises. A plain dataclass cannot tell an explicit
    default from an omitted one, so an explicit default is filled in silently, but a deliberate non-default value
    (say ``sink_frames=2`` for a ``sink=1`` backbone, or ``dtype=torch.float8_e4m3fn``) is never silently replaced.
    ``device="cuda"`` matches any CUDA device.

    Raises:
        TypeError: ``retrieval`` is not a :class:`lrag_ext.MemoryConfig`.
        ValueError: ``storage="embedding"`` (the generator attends to stored K/V or latents), or a model-derived
            field that conflicts with the backbone (naming the field).
    """
    retrieval = MemoryConfig() if retrieval is None else retrieval
    if not isinstance(retrieval, MemoryConfig):
        raise TypeError(f"retrieval must be an lrag_ext.MemoryConfig, got {type(retrieval).__name__}")
    if retrieval.storage not in GENERATOR_STORAGE:
        raise ValueError(f"MemoryConfig.storage must be one of {GENERATOR_STORAGE} for the generator (it attends to "
                         f"the retrieved frames' K/V), got {retrieval.storage!r}")
    derived = dict(sink_frames=cfg.sink, window_frames=cfg.window,
                   kv_layout=KVLayout(num_layers=cfg.num_layers, tokens_per_frame=cfg.tokens_per_frame,
                                      num_heads=cfg.num_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta),
                   latent_shape=(cfg.in_dim, cfg.latent_height, cfg.latent_width))
    for name, value in (("embed_dim", embed_dim), ("device", device), ("dtype", dtype)):
        if value is not None:
            derived[name] = torch.device(value) if name == "device" else value
    defaults = {f.name: f.default for f in dataclasses.fields(MemoryConfig)}
    for name, want in derived.items():
        have = getattr(retrieval, name)
        if have == defaults[name] or _same_value(have, want):
            continue
        source = "embedder" if name == "embed_dim" else "backbone"
        raise ValueError(f"MemoryConfig.{name}={have!r} conflicts with the {source}'s {want!r}: the generator "
                         f"derives {name} from its {source}; leave it at its default ({defaults[name]!r})")
    return dataclasses.replace(retrieval, **derived)


def _same_value(have, want) -> bool:
    """Whether a user's model-derived field agrees with the backbone's (a device without index matches any)."""
    if isinstance(want, torch.device):
        have = torch.device(have)
        return have.type == want.type and have.index in (None, want.index)
    return have == want


def RetrievalConfig(k: int = 6, recent_exclude: int = 5, memory_position: int | str = 0,  # noqa: N802
                    device_frames: int = 64, host_frames: int | None = None, max_frames: int = 4096,
                    storage: str = "kv") -> MemoryConfig:
    """Deprecated: the generator takes :class:`lrag_ext.MemoryConfig`. Returns the equivalent one (``k`` is
    ``top_k``; the other arguments keep their names), after a ``DeprecationWarning``."""
    warnings.warn("lrag.RetrievalConfig is deprecated: pass lrag_ext.MemoryConfig(top_k=..., recent_exclude=..., "
                  "memory_position=..., ...) to Pipeline(retrieval=...)", DeprecationWarning, stacklevel=2)
    return MemoryConfig(top_k=k, recent_exclude=recent_exclude, memory_position=memory_position,
                        device_frames=device_frames, host_frames=host_frames, max_frames=max_frames, storage=storage)
