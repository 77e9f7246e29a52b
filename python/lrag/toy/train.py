"""Train the tiny causal generator of the toy world (docs/toy_training.md).

    python -m lrag.toy.train --out RUN_DIR [--steps 2000] [--threads 2] [--resume RUN_DIR/last.safetensors]
    lrag train-toy ...                      (the same)

A :class:`~lrag.models.wan.CausalWanModel` learns the world's frames with flow matching under the block-causal
schedule it is sampled with: windows of ``--window-frames`` consecutive frames (each from a fresh clip) are
walked block by block with the inference cache (window RoPE positions, sink + sliding window; by default **no
memory slots**: like the paper's frozen generator it never sees retrieved frames; ``--memory-top-k K`` trains the
variant with K retrieved frames in its memory slots, see :func:`block_losses`). For each block ``[s, s + F)``:

1. noisy forward, with gradients: ``x_t = (1 - sigma) x0 + sigma eps`` (the scheduler's ``add_noise``, table
   sigma), loss ``mean (model(x_t, t) - (eps - x0))^2``, the flow that ``to_x0`` inverts; backward at once;
2. context rerun, without gradients: ``model(x0, t = 0, update_cache=True)`` commits the block's clean K/V,
   exactly as generation commits a generated block (teacher forcing: the context is the clean ground truth;
   stop-gradient through the cache).

So the loss covers every block of the window, and never a context frame. Timesteps: a table entry drawn
uniformly (the scheduler's shifted training distribution), or with probability ``sampler_t_prob`` (0.25) one of
the ``--sample-steps`` timesteps the sampler uses. AdamW, linear warm-up then cosine decay, grad-norm clip, an EMA of
the weights (what is exported and sampled).

Outputs in RUN_DIR: ``last.safetensors`` (model, EMA, optimizer, step, both RNG states; config and state in its
metadata; every ``--checkpoint-every`` steps and at the end), ``log.json`` (one record per checkpoint, with the
fixed validation loss on clip seeds >= 1000), and at the end ``toy_generator.safetensors`` (the EMA weights as a
plain state dict, its config in the metadata) with ``toy_generator.json`` (config, command, sha256). Seeds: the
run's ``--seed`` fixes the initial weights, the training clips (63-bit seeds drawn from it) and the noise;
validation uses clip seeds 1000..; seeds 0..999 are left for evaluation. On the CPU with the same ``--threads``,
a resumed run is bit for bit the uninterrupted one.

Errors in options or ``--resume`` exit with status 2 and ``<prog>: error: <message>`` before anything is written.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from lrag.block_memory import BlockMemory, config_for_streams
from lrag.config import WanConfig, memory_config_for
from lrag.models.wan import POSITION_MODES, CausalWanModel
from lrag.scheduler import FlowMatchScheduler
from lrag.toy.sample import null_text, sampling_timesteps
from lrag.toy.world import WorldConfig, make_clip, sample_windows
from lrag_ext.memory_config import MemoryConfig
from lrag_ext.memory_format import sha256_file
from lrag_ext.reference import mean_descriptor
from lrag_ext.progress import ProgressLine
from lrag_ext.state_dicts import (InputFileError, check_output_dir, check_regular_file, naming_file, parse_device,
                                  state_dict_mismatch)

PROG = "python -m lrag.toy.train"
LAST_NAME = "last.safetensors"
LOG_NAME = "log.json"
WEIGHTS_NAME = "toy_generator.safetensors"
CARD_NAME = "toy_generator.json"
TRAIN_FORMAT = "lrag-toy-train/1"
WEIGHTS_FORMAT = "lrag-toy-generator/1"
META_KEY = "lrag_toy"     # the one safetensors metadata entry (JSON)
VAL_SEED = 1000          # validation clips are make_clip(VAL_SEED + i); 0..999 are the evaluation's


@dataclass(frozen=True)
class ToyConfig:
    """Geometry and recipe of a toy generator, saved with every checkpoint.

    The geometry (:data:`GEOMETRY`: the backbone's sizes, the block schedule, the RoPE position mode and the
    world) must match to resume; the recipe may change between runs.
    """

    # backbone (frames come from the world: in/out channels = world.channels, latents world.size square)
    num_layers: int = 4
    dim: int = 64
    num_heads: int = 2
    ffn_dim: int = 256
    freq_dim: int = 64
    text_dim: int = 8
    text_len: int = 1
    # block schedule (as at inference) and RoPE positions
    frames_per_block: int = 3
    window: int = 12
    sink: int = 1
    position_mode: str = "window"
    # memory slots during training: 0 (none) trains like the paper's frozen generator, which never saw retrieved
    # frames; K > 0 is the variant trained with K retrieved frames in its memory slots, retrieved as at inference
    # by the reference policy (spatial-mean key, cosine top-K, recency guard R, temporal position 0)
    memory_top_k: int = 0
    memory_recent_exclude: int = 5
    world: WorldConfig = WorldConfig()
    # recipe
    window_frames: int = 48
    batch: int = 2
    steps: int = 2000
    lr: float = 3e-3
    warmup: int = 50
    min_lr: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    shift: float = 5.0
    sample_steps: int = 16
    sampler_t_prob: float = 0.25
    seed: int = 0
    val_clips: int = 8

    def __post_init__(self):
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {self.position_mode!r}")
        if self.window_frames < self.frames_per_block or self.window_frames % self.frames_per_block:
            raise ValueError(f"window_frames must be a positive multiple of frames_per_block="
                             f"{self.frames_per_block}, got {self.window_frames}")
        if not 0 <= self.memory_top_k <= self.window - self.sink - self.frames_per_block:
            raise ValueError(f"memory_top_k must be in [0, window - sink - frames_per_block] = "
                             f"[0, {self.window - self.sink - self.frames_per_block}] (the local window must hold "
                             f"the block), got {self.memory_top_k}")
        if self.memory_recent_exclude < 0:
            raise ValueError(f"memory_recent_exclude must be >= 0, got {self.memory_recent_exclude}")
        self.wan_config()  # the backbone's own checks

    def wan_config(self) -> WanConfig:
        """The backbone's :class:`WanConfig` (frames of the world used directly as latents)."""
        return WanConfig(num_layers=self.num_layers, dim=self.dim, num_heads=self.num_heads, ffn_dim=self.ffn_dim,
                         freq_dim=self.freq_dim, text_dim=self.text_dim, text_len=self.text_len,
                         in_dim=self.world.channels, out_dim=self.world.channels, latent_height=self.world.size,
                         latent_width=self.world.size, frames_per_block=self.frames_per_block, window=self.window,
                         sink=self.sink)

    def training_memory(self) -> Optional[MemoryConfig]:
        """The retrieval memory blocks are trained with (``None`` without memory slots): the reference policy
        with ``memory_top_k`` / ``memory_recent_exclude``."""
        if not self.memory_top_k:
            return None
        return MemoryConfig(top_k=self.memory_top_k, recent_exclude=self.memory_recent_exclude, memory_position=0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ToyConfig":
        """Inverse of :meth:`to_dict` (JSON lists back to tuples).

        Raises:
            ValueError: unknown or missing fields, or invalid values.
        """
        if not isinstance(d, dict) or not isinstance(d.get("world"), dict):
            raise ValueError("a toy config must be an object with a 'world' object")
        names = {f.name for f in dataclasses.fields(cls)}
        world_names = {f.name for f in dataclasses.fields(WorldConfig)}
        unknown = sorted(set(d) - names) + sorted(f"world.{k}" for k in set(d["world"]) - world_names)
        if unknown:
            raise ValueError(f"unknown toy config fields {unknown}")
        world = WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["world"].items()})
        try:
            return cls(**{**d, "world": world})
        except TypeError as e:
            raise ValueError(f"invalid toy config: {e}") from None


GEOMETRY = ("num_layers", "dim", "num_heads", "ffn_dim", "freq_dim", "text_dim", "text_len", "frames_per_block",
            "window", "sink", "position_mode", "memory_top_k", "memory_recent_exclude", "world")


class OptionError(ValueError):
    """A command-line option outside its valid range or not fitting ``--resume`` (the message names it)."""


# ------------------------------------------------------------------------------------------------- the loss
def training_timesteps(scheduler: FlowMatchScheduler, shape: tuple, generator: torch.Generator,
                       sample_steps: int, sampler_t_prob: float) -> torch.Tensor:
    """float32 timesteps of ``shape``: a uniform table entry (the scheduler's shifted distribution), or with
    probability ``sampler_t_prob`` one of the ``sample_steps`` timesteps the sampler visits."""
    table = scheduler.timesteps
    t = table[torch.randint(0, len(table), shape, generator=generator)]
    sampler = sampling_timesteps(scheduler, sample_steps)
    pick = sampler[torch.randint(0, len(sampler), shape, generator=generator)]
    return torch.where(torch.rand(shape, generator=generator) < sampler_t_prob, pick, t)


def block_losses(model: CausalWanModel, frames: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
                 scheduler: FlowMatchScheduler, position_mode: str = "window", backward: bool = False,
                 scale: float = 1.0, retrieval: Optional[MemoryConfig] = None) -> torch.Tensor:
    """Teacher-forced flow-matching loss of every block of windows ``frames``, under the inference schedule.

    Walks the windows block by block with one cache (``position_mode``; memory slots only with ``retrieval``).
    Block ``b`` (frames ``[s, s + F)``): ``x_t = add_noise(x0, noise, t_b)``, loss ``mean (model(x_t, t_b) - (noise
    - x0))^2`` over the block; then the t = 0 rerun of the clean ``x0`` commits it (no gradients: the cache is
    written in place). With ``retrieval`` (an :class:`lrag_ext.MemoryConfig`: K, R, position) the windows are also
    the memory, exactly as in generation (:class:`lrag.block_memory.BlockMemory`, spatial-mean key, one stream per
    window): before each block up to K earlier clean frames are retrieved into the memory slots (no gradients
    through them), and each committed block is appended.

    Args:
        frames, noise: ``[B, L, C, H, W]``, ``L`` a multiple of ``frames_per_block``.
        timesteps: ``[B, L / F]`` float32, one per block (shared by its frames, as in sampling).
        backward: backpropagate ``scale * sum`` of the block losses, block by block (gradients accumulate).

    Returns:
        ``[B, L / F]`` float32 per-block losses (detached).
    """
    F = model.cfg.frames_per_block
    B, L = frames.shape[:2]
    if L % F or timesteps.shape != (B, L // F) or noise.shape != frames.shape:
        raise ValueError(f"frames [B, L, ...] with L a multiple of {F}, noise of the same shape and timesteps "
                         f"[B, L/{F}], got {tuple(frames.shape)}, {tuple(noise.shape)}, {tuple(timesteps.shape)}")
    device, dtype = model.device, model.dtype
    frames, noise = frames.to(device, dtype), noise.to(device, dtype)
    cache = model.new_cache(B, position_mode, memory_slots=retrieval.top_k if retrieval else 0)
    memory = None
    if retrieval is not None:
        sized = config_for_streams(retrieval, B, L)
        memory = BlockMemory(model, lambda dim: memory_config_for(model.cfg, sized, dim, device, dtype),
                             mean_descriptor)
    text = null_text(model, B)
    losses = torch.zeros(B, L // F)
    zeros = torch.zeros(B, F, dtype=torch.float32, device=device)
    for b in range(L // F):
        x0, eps = frames[:, b * F:(b + 1) * F], noise[:, b * F:(b + 1) * F]
        t = timesteps[:, b, None].expand(B, F).to(device)
        if memory is not None:
            with torch.no_grad():
                memory.retrieve(b * F, cache)
        with torch.set_grad_enabled(backward):
            model.set_text(cache, text)              # a fresh text graph per block (each block backwards its own)
            flow = model(scheduler.add_noise(x0, eps, t), t, cache)
            per = (flow.float() - (eps - x0).float()).pow(2).mean(dim=(1, 2, 3, 4))
            if backward:
                (per.sum() * scale).backward()
        losses[:, b] = per.detach().cpu()
        with torch.no_grad():
            model(x0, zeros, cache, update_cache=True)
            if memory is not None:
                memory.append(x0, cache)
    return losses


def flow_baseline(frames: torch.Tensor, noise: torch.Tensor) -> float:
    """The loss of the best constant prediction: ``mean (target - mean_c target)^2`` with ``target = noise -
    frames`` and the mean per channel over everything (the trivial baseline of :func:`block_losses`)."""
    target = (noise - frames).double()
    return float((target - target.mean(dim=(0, 1, 3, 4), keepdim=True)).pow(2).mean())


@dataclass
class Validation:
    """A fixed validation batch: clips ``make_clip(VAL_SEED + i)`` from frame 0, fixed noise and timesteps."""

    frames: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    baseline: float

    @classmethod
    def build(cls, cfg: ToyConfig, scheduler: FlowMatchScheduler) -> "Validation":
        frames = torch.from_numpy(np.stack([make_clip(VAL_SEED + i, cfg.window_frames, cfg.world)[0]
                                            for i in range(cfg.val_clips)]))
        gen = torch.Generator().manual_seed(VAL_SEED)
        noise = torch.randn(frames.shape, generator=gen)
        t = training_timesteps(scheduler, (cfg.val_clips, cfg.window_frames // cfg.frames_per_block), gen,
                               cfg.sample_steps, cfg.sampler_t_prob)
        return cls(frames, noise, t, flow_baseline(frames, noise))

    @torch.no_grad()
    def loss(self, model: CausalWanModel, cfg: ToyConfig, scheduler: FlowMatchScheduler) -> float:
        return float(block_losses(model, self.frames, self.timesteps, self.noise, scheduler,
                                  cfg.position_mode, retrieval=cfg.training_memory()).mean())


# ------------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Everything a run needs to continue bit for bit."""

    config: ToyConfig
    model: CausalWanModel
    ema: CausalWanModel
    optimizer: torch.optim.Optimizer
    data_rng: np.random.Generator
    noise_gen: torch.Generator
    step: int = 0
    seconds: float = 0.0
    log: list = field(default_factory=list)


def _optimizer(model: torch.nn.Module, cfg: ToyConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def learning_rate(cfg: ToyConfig, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr * lr`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


def new_state(cfg: ToyConfig, device: torch.device) -> TrainState:
    """A fresh run: weights from ``torch.manual_seed(cfg.seed)``, data and noise generators seeded from it."""
    torch.manual_seed(cfg.seed)
    model = CausalWanModel(cfg.wan_config()).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    return TrainState(cfg, model, ema, _optimizer(model, cfg), np.random.default_rng(cfg.seed),
                      torch.Generator().manual_seed(cfg.seed))


def train_step(state: TrainState, scheduler: FlowMatchScheduler) -> float:
    """One optimizer step on a fresh batch of windows; returns the mean block loss."""
    cfg, model = state.config, state.model
    frames, _ = sample_windows(state.data_rng, cfg.batch, cfg.window_frames, cfg.world)
    frames = torch.from_numpy(frames)
    noise = torch.randn(frames.shape, generator=state.noise_gen)
    blocks = cfg.window_frames // cfg.frames_per_block
    t = training_timesteps(scheduler, (cfg.batch, blocks), state.noise_gen, cfg.sample_steps, cfg.sampler_t_prob)
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(cfg, state.step)
    model.train()
    state.optimizer.zero_grad(set_to_none=True)
    losses = block_losses(model, frames, t, noise, scheduler, cfg.position_mode, backward=True,
                          scale=1.0 / (cfg.batch * blocks), retrieval=cfg.training_memory())
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    state.optimizer.step()
    decay = min(cfg.ema_decay, (1 + state.step) / (10 + state.step))
    with torch.no_grad():
        for e, p in zip(state.ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)
    state.step += 1
    return float(losses.mean())


def _write_safetensors(path: str, tensors: dict, metadata: dict) -> None:
    """Writes atomically (a temporary file, then a rename), ``metadata`` as JSON under one key: safetensors writes
    its metadata entries in a per-process random order, one entry keeps the file's bytes (and checksum)
    reproducible."""
    from safetensors.torch import save_file  # noqa: PLC0415
    tmp = path + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
              metadata={META_KEY: json.dumps(metadata)})
    os.replace(tmp, path)


def save_state(path: str, state: TrainState) -> None:
    """``last.safetensors``: ``model.*``, ``ema.*``, ``optim.<param>.<key>`` tensors and ``rng.torch``; the config,
    step, log, optimizer hyper-parameters and NumPy RNG state as JSON metadata."""
    names = [n for n, _ in state.model.named_parameters()]
    opt = state.optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in state.model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in state.ema.state_dict().items()})
    for index, entry in opt["state"].items():
        tensors.update({f"optim.{names[index]}.{k}": v for k, v in entry.items()})
    tensors["rng.torch"] = state.noise_gen.get_state()
    meta = {"format": TRAIN_FORMAT, "config": state.config.to_dict(),
            "state": {"step": state.step, "seconds": state.seconds, "log": state.log,
                      "param_groups": opt["param_groups"], "data_rng": state.data_rng.bit_generator.state}}
    _write_safetensors(path, tensors, meta)


def _read_safetensors(path: str, what: str) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors file written by this module (metadata values JSON-decoded).

    Raises:
        FileNotFoundError; InputFileError: not a regular file, not safetensors, or metadata not this format.
    """
    from safetensors import safe_open  # noqa: PLC0415
    check_regular_file(path, what)
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if not isinstance(meta, dict):
            raise ValueError(f"metadata {META_KEY!r} is not a JSON object")
    except Exception as e:  # noqa: BLE001  (any reader failure means a malformed file)
        raise InputFileError(path, f"cannot be read as a safetensors file with JSON metadata ({type(e).__name__}: "
                                   f"{str(e)[:200]})", what) from None
    return tensors, meta


def _strict(model: torch.nn.Module, state: dict, what: str) -> None:
    missing, unexpected, bad = state_dict_mismatch(model.state_dict(), state)
    if missing or unexpected or bad:
        raise ValueError(f"its {what} weights do not fit the config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shapes {bad[:5]}")


def load_state(path: str, device: torch.device) -> TrainState:
    """Reads a ``last.safetensors`` written by :func:`save_state` (every tensor checked against the config
    before anything is loaded).

    Raises:
        FileNotFoundError; InputFileError: (a ``ValueError`` naming the file) not such a checkpoint, or its
            tensors do not fit its config.
    """
    tensors, meta = _read_safetensors(path, "--resume")
    with naming_file(path, "--resume"):
        if meta.get("format") != TRAIN_FORMAT:
            raise ValueError(f"not a toy training checkpoint (format {meta.get('format')!r}, expected "
                             f"{TRAIN_FORMAT!r})")
        cfg, info = ToyConfig.from_dict(meta.get("config")), meta.get("state")
        if not isinstance(info, dict):
            raise ValueError("its metadata has no 'state' object")
        part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        with torch.device("meta"):
            shell = CausalWanModel(cfg.wan_config())
        _strict(shell, part("model."), "model")
        _strict(shell, part("ema."), "EMA")
        state = new_state(cfg, device)
        state.model.load_state_dict(part("model."))
        state.ema.load_state_dict(part("ema."))
        params = dict(state.model.named_parameters())
        names = list(params)
        opt_state = {}
        for key, value in part("optim.").items():
            name, _, slot = key.rpartition(".")
            if name not in params or (value.dim() and value.shape != params[name].shape):
                raise ValueError(f"its optimizer entry {key!r} does not fit the model")
            opt_state.setdefault(names.index(name), {})[slot] = value   # load_state_dict moves it
        state.optimizer.load_state_dict({"state": opt_state, "param_groups": info["param_groups"]})
        state.noise_gen.set_state(tensors["rng.torch"])
        state.data_rng.bit_generator.state = info["data_rng"]
        state.step, state.seconds, state.log = int(info["step"]), float(info["seconds"]), list(info["log"])
    return state


def export_weights(out: str, state: TrainState, command: str, validation: dict) -> dict:
    """Writes ``toy_generator.safetensors`` (the EMA weights, a plain state dict: :func:`lrag.checkpoint.
    load_generator` reads it given ``ToyConfig.wan_config()``; the config in its metadata) and
    ``toy_generator.json`` (config, step, command, validation, sha256 of the weights file). Returns the card."""
    path = os.path.join(out, WEIGHTS_NAME)
    _write_safetensors(path, state.ema.state_dict(),
                       {"format": WEIGHTS_FORMAT, "config": state.config.to_dict(), "step": state.step})
    card = {"weights": WEIGHTS_NAME, "sha256": sha256_file(path), "bytes": os.path.getsize(path), "step": state.step,
            "train_seconds": round(state.seconds, 1), "command": command, "validation": validation,
            "config": state.config.to_dict()}
    with open(os.path.join(out, CARD_NAME), "w") as f:
        json.dump(card, f, indent=1)
    return card


def load_toy_generator(path: str, device="cpu") -> tuple[CausalWanModel, ToyConfig]:
    """The toy generator of a ``toy_generator.safetensors`` (eval mode) and its config.

    Raises:
        FileNotFoundError; InputFileError: not such a file, or its weights do not fit its config.
    """
    tensors, meta = _read_safetensors(path, "toy generator")
    with naming_file(path, "toy generator"):
        if meta.get("format") != WEIGHTS_FORMAT:
            raise ValueError(f"not a toy generator (format {meta.get('format')!r}, expected {WEIGHTS_FORMAT!r})")
        cfg = ToyConfig.from_dict(meta.get("config"))
        with torch.device("meta"):
            shell = CausalWanModel(cfg.wan_config())
        _strict(shell, tensors, "generator")
        model = CausalWanModel(cfg.wan_config())
        model.load_state_dict(tensors)
    return model.to(device).eval(), cfg


# ------------------------------------------------------------------------------------------------- command line
# option -> ToyConfig field, type, help; every one defaults to the --resume checkpoint's value, else ToyConfig's
_CONFIG_OPTIONS = {
    "steps": ("steps", int, "total optimizer steps"),
    "batch": ("batch", int, "windows per step (each from a fresh clip)"),
    "window_frames": ("window_frames", int, "frames per training window (> longest period + attention window)"),
    "lr": ("lr", float, "peak learning rate (linear warm-up, then cosine decay)"),
    "warmup": ("warmup", int, "warm-up steps"),
    "grad_clip": ("grad_clip", float, "grad-norm clip"),
    "ema_decay": ("ema_decay", float, "EMA decay of the exported weights"),
    "sample_steps": ("sample_steps", int, "denoising steps of the sampler (its timesteps are trained more often)"),
    "seed": ("seed", int, "seed of the weights, the training clips and the noise"),
    "val_clips": ("val_clips", int, "validation clips (seeds 1000..)"),
    "layers": ("num_layers", int, "DiT blocks"),
    "dim": ("dim", int, "model width"),
    "heads": ("num_heads", int, "attention heads"),
    "ffn_dim": ("ffn_dim", int, "FFN width"),
    "memory_top_k": ("memory_top_k", int, "retrieved frames in the memory slots during training (0: none, as the "
                                          "paper's generator)"),
    "memory_recent_exclude": ("memory_recent_exclude", int, "recency guard R of the training retrieval"),
}
_RANGES = {"steps": (1, None), "batch": (1, None), "warmup": (1, None), "sample_steps": (1, 1000),
           "seed": (0, 2 ** 63 - 1), "val_clips": (1, None), "layers": (1, None), "dim": (1, None),
           "heads": (1, None), "ffn_dim": (1, None), "checkpoint_every": (1, None), "threads": (0, None),
           "memory_top_k": (0, None), "memory_recent_exclude": (0, None)}


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    """Parses the options (types only; :func:`check_options` checks their ranges). The training options default to
    the ``--resume`` checkpoint's values, else to :class:`ToyConfig`'s."""
    d = ToyConfig()
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run folder (last.safetensors, log.json, toy_generator.*)")
    p.add_argument("--resume", default="", help="continue from a last.safetensors (its config is the default)")
    for option, (name, kind, text) in _CONFIG_OPTIONS.items():
        p.add_argument("--" + option.replace("_", "-"), type=kind, default=None,
                       help=f"{text} (default {getattr(d, name)})")
    p.add_argument("--position-mode", choices=POSITION_MODES, default=None,
                   help=f"RoPE positions of the cache (default {d.position_mode!r}, as LongLive-RAG)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints + validation")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p.parse_args(argv)


def _config_from_args(args: argparse.Namespace, base: ToyConfig) -> ToyConfig:
    """``base`` with the training options that were given."""
    changes = {name: getattr(args, option) for option, (name, _, _) in _CONFIG_OPTIONS.items()
               if getattr(args, option) is not None}
    if args.position_mode is not None:
        changes["position_mode"] = args.position_mode
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as e:
        raise OptionError(str(e)) from None


def check_options(args: argparse.Namespace) -> torch.device:
    """Ranges of the options given, ``--out`` writable, ``--device`` present. Reads and writes nothing; returns the
    device.

    Raises:
        OptionError: naming the option.
    """
    def bad(option: str, requirement: str) -> OptionError:
        return OptionError(f"--{option.replace('_', '-')} must be {requirement}, got {getattr(args, option)!r}")

    for option, (lo, hi) in _RANGES.items():
        value = getattr(args, option)
        if value is not None and not (value >= lo and (hi is None or value <= hi)):
            raise bad(option, f">= {lo}" if hi is None else f"in [{lo}, {hi}]")
    floats = {"lr": (args.lr is None or (math.isfinite(args.lr) and args.lr > 0), "a finite number > 0"),
              "grad_clip": (args.grad_clip is None or args.grad_clip > 0, "> 0"),
              "ema_decay": (args.ema_decay is None or 0 <= args.ema_decay < 1, "in [0, 1)")}
    for option, (ok, requirement) in floats.items():
        if not ok:
            raise bad(option, requirement)
    try:
        device = parse_device(args.device, "--device")
        check_output_dir(args.out, "--out")
    except ValueError as e:
        raise OptionError(str(e)) from None
    if args.resume:
        check_regular_file(args.resume, "--resume")
    return device


def prepare(args: argparse.Namespace) -> TrainState:
    """Checks the options, builds the run or loads ``--resume`` (its geometry must agree with any geometry option
    given). Writes nothing.

    Raises:
        OptionError, FileNotFoundError, InputFileError: naming the option or file.
    """
    device = check_options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.resume:
        return new_state(_config_from_args(args, ToyConfig()), device)
    state = load_state(args.resume, device)
    saved = state.config
    wanted = _config_from_args(args, saved)
    differ = [f"{name}: {getattr(saved, name)!r} in the checkpoint, {getattr(wanted, name)!r} asked"
              for name in GEOMETRY if getattr(saved, name) != getattr(wanted, name)]
    if differ:
        raise OptionError(f"--resume {args.resume} is a model of another geometry ({'; '.join(differ)}); leave "
                          "the geometry options out to continue it")
    if state.step >= wanted.steps:
        raise OptionError(f"--steps {wanted.steps}: the --resume checkpoint is already at step {state.step}")
    state.config = wanted
    return state


def train(args: argparse.Namespace, state: TrainState | None = None, command: str | None = None) -> dict:
    """Runs the training (prepared by :func:`prepare` unless ``state`` is given) to ``--steps``; checkpoints and
    validates every ``--checkpoint-every`` steps and at the end; exports the EMA weights. Returns
    ``{"state", "log", "card"}``."""
    state = state or prepare(args)
    cfg = state.config
    scheduler = FlowMatchScheduler(cfg.shift)
    val = Validation.build(cfg, scheduler)
    os.makedirs(args.out, exist_ok=True)
    line = ProgressLine("train-toy", cfg.steps, unit="step", enabled=not args.quiet)
    first, window_losses, t_start = state.step, [], time.perf_counter()
    while state.step < cfg.steps:
        t0 = time.perf_counter()
        window_losses.append(train_step(state, scheduler))
        state.seconds += time.perf_counter() - t0
        rate = (state.step - first) / max(time.perf_counter() - t_start, 1e-9) * 60
        line.show(state.step, f"loss {window_losses[-1]:.4f} lr {learning_rate(cfg, state.step - 1):.2e} "
                              f"({rate:.1f} steps/min)")
        if state.step % args.checkpoint_every == 0 or state.step == cfg.steps:
            val_loss = val.loss(state.ema, cfg, scheduler)
            state.log.append({"step": state.step, "train_loss": float(np.mean(window_losses)), "val_loss": val_loss,
                              "val_baseline": val.baseline, "lr": learning_rate(cfg, state.step - 1),
                              "seconds": round(state.seconds, 2)})
            window_losses = []
            save_state(os.path.join(args.out, LAST_NAME), state)
            with open(os.path.join(args.out, LOG_NAME), "w") as f:
                json.dump({"config": cfg.to_dict(), "records": state.log}, f, indent=1)
            if not args.quiet:
                rec = state.log[-1]
                print(f"step {rec['step']}: train {rec['train_loss']:.4f} val (EMA) {val_loss:.4f} (constant "
                      f"baseline {val.baseline:.4f}) {state.seconds:.0f} s", file=sys.stderr)
    line.close()
    validation = {"val_loss": state.log[-1]["val_loss"], "val_baseline": val.baseline,
                  "val_seeds": [VAL_SEED, VAL_SEED + cfg.val_clips - 1]}
    card = export_weights(args.out, state, command or shlex.join([PROG] + sys.argv[1:]), validation)
    return {"state": state, "log": state.log, "card": card}


def main(argv: list[str] | None = None, prog: str = PROG, error_prefix: str | None = None) -> int:
    """The command line: 0 after training; 2 after ``<error_prefix or prog>: error: <message>`` for a mistake
    in the options or ``--resume`` (nothing trained or written)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, prog)
    try:
        state = prepare(args)
    except (OptionError, InputFileError, FileNotFoundError) as err:
        print(f"{error_prefix or prog}: error: {err}", file=sys.stderr)
        return 2
    train(args, state, command=shlex.join(prog.split() + argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
