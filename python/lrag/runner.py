"""``lrag generate``: turns the parsed options into a pipeline, a renderer and a text embedding, then runs.

Two sources (:func:`run_generate`):

- ``--demo``: :func:`lrag.demo.run_demo` (the shipped toy generator continuing a toy-world clip, natively and with
  LongLive-RAG, as ``lrag eval`` runs them);
- real: ``--checkpoint`` (geometry read from its tensor shapes, see :mod:`lrag.ckpt_info`), the umT5 encoder
  and Wan VAE of ``--wan-dir``, the ``--embedder`` checkpoint.

Every input is checked before anything heavy is loaded or anything is written, so a wrong path or number fails
in a second with a message naming the option (:class:`lrag.errors.UsageError`), in this order: the options
themselves (ranges, ``--device``, ``--out`` writable), the input files (``--checkpoint`` and ``--embedder``
read lazily and matched against their geometry on the ``meta`` device, ``--wan-dir``), then the memory the run
will allocate (:func:`run_memory_needs`) against the memory available.
"""
from __future__ import annotations

import os
import re
import sys
import time
from argparse import Namespace
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lrag import registry
from lrag.errors import UsageError
from lrag.config import WanConfig, wan_1_3b
from lrag_ext.memory_config import MemoryConfig
from lrag.lora import check_lora_scaling
from lrag.generate import ModeRun, Progress, blocks_for_seconds, run_mode, write_outputs
from lrag.pipeline import Pipeline, switch_starts
from lrag_ext.state_dicts import (InputFileError, check_output_dir, check_regular_file, device_memory, error_summary,
                                  parse_device)

VAE_SPATIAL = 8              # Wan VAE: 8x spatial compression
# What a checkpoint runs with (frames per block, steps, window, sink, state-dict entry) comes from the checkpoint
# registry (lrag.registry): the file's own entry, or its backbone's default entry for an unregistered file.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The defaults of the options that the demo refuses (so the parser leaves them None when not given).
REAL_DEFAULTS = {"top_k": 6, "recent_exclude": 5, "memory_position": 0, "storage": "kv", "device_frames": 64,
                 "height": 480, "width": 832, "text_len": 512, "retrieve_every": 1, "switch_memory": "recompute"}
# The MemoryConfig fields the options set: a config error names the option instead of the field.
MEMORY_OPTIONS = {"top_k": "--top-k", "recent_exclude": "--recent-exclude", "memory_position": "--memory-position",
                  "device_frames": "--device-frames", "host_frames": "--host-frames"}


@dataclass
class Setup:
    """Everything a run needs besides the options."""

    pipe: Pipeline
    text: torch.Tensor                       # [1, L, text_dim]
    make_renderer: Callable[[str], Callable]  # mode -> a fresh renderer (the VAE decoder carries a cache)
    switches: list                           # [(latent frame, [1, L, text_dim])] prompt switches
    meta: dict


def _file_error(option: str, e: Exception) -> UsageError:
    """A loader's error about the file given to ``option``, as a usage error naming the option."""
    return UsageError(e.for_option(option) if isinstance(e, InputFileError) else f"{option}: {e}")


def output_dir(args) -> str:
    """The run's output folder: ``--out``, else ``lrag_demo`` for ``--demo`` and ``lrag_out`` otherwise."""
    return args.out or ("lrag_demo" if args.demo else "lrag_out")


def _check_common(args) -> None:
    """The options every run has, checked before anything is read, built or written."""
    try:
        check_output_dir(output_dir(args), "--out")
    except ValueError as e:
        raise UsageError(str(e)) from None
    _device_dtype(args)
    if not 0 <= args.seed < 2 ** 64:
        raise UsageError(f"--seed must be in [0, 2**64), got {args.seed}")
    if args.retrieve_every < 1:
        raise UsageError(f"--retrieve-every must be >= 1, got {args.retrieve_every}")
    if args.switch_memory_given and not args.switch:
        raise UsageError("--switch-memory needs --switch (it says what retrieval does across a prompt switch)")
    if args.switch_memory_given and args.mode == "native":
        raise UsageError("--switch-memory applies to --mode rag or both: native mode retrieves nothing")
    if args.sink is not None and args.sink < 0:
        raise UsageError(f"--sink must be >= 0, got {args.sink}")
    _retrieval(args)


def _retrieval(args, num_frames: int | None = None) -> MemoryConfig:
    """The retrieval memory's configuration from the options; ``num_frames`` (the run's) caps ``--device-frames``
    and raises ``max_frames``. An invalid one (checked by ``MemoryConfig`` itself) is a :class:`UsageError` naming
    the options."""
    device_frames, max_frames = args.device_frames, 4096
    if num_frames is not None:
        device_frames, max_frames = min(device_frames, num_frames), max(max_frames, num_frames)
    try:
        return MemoryConfig(top_k=args.top_k, recent_exclude=args.recent_exclude, memory_position=args.memory_position,
                            device_frames=device_frames, host_frames=args.host_frames, storage=args.storage,
                            max_frames=max_frames)
    except ValueError as e:
        fields = r"\b(" + "|".join(MEMORY_OPTIONS) + r")\b"
        raise UsageError(re.sub(fields, lambda m: MEMORY_OPTIONS[m.group(1)], str(e))) from None


def kv_estimate(cfg: WanConfig, num_frames: int, dtype: torch.dtype, device_frames: int,
                host_frames: int | None, storage: str = "kv") -> dict:
    """Bytes the retrieval memory will hold for a ``num_frames`` run (every generated frame is kept).

    ``storage="kv"``: one frame's K/V is ``layers x 2 x tokens x dim`` values (287.5 MB for Wan 1.3B in bf16),
    the first ``device_frames`` on the device, then up to ``host_frames`` in host memory, older ones dropped.
    ``storage="latent"``: one latent ``C x H x W`` per frame (200 KB for Wan), all on the device.
    """
    size = torch.finfo(dtype).bits // 8
    if storage == "latent":
        per_frame = cfg.in_dim * cfg.latent_height * cfg.latent_width * size
        on_device, on_host = num_frames, 0
    else:
        per_frame = cfg.num_layers * 2 * cfg.tokens_per_frame * cfg.dim * size
        on_device = min(device_frames, num_frames)
        on_host = num_frames - on_device if host_frames is None else min(host_frames, num_frames - on_device)
    return {"storage": storage, "frame_mib": per_frame / 2 ** 20, "device_gib": on_device * per_frame / 2 ** 30,
            "host_gib": on_host * per_frame / 2 ** 30, "dropped_frames": num_frames - on_device - on_host}


def run_memory_needs(cfg: WanConfig, num_frames: int, dtype: torch.dtype, device: torch.device, modes: list[str],
                     retrieval: MemoryConfig, embed_dim: int, model_params: int) -> dict[str, dict[str, int]]:
    """Bytes a run will allocate, per place (``"host"``, ``"device"``; the same place on a CPU run) and buffer.

    The buffers: the model's parameters; the initial noise (float32, drawn on the host) and, on the device, its
    copy and the output latents (``num_frames`` latent frames each); in ``rag`` mode the retrieval memory: its
    embedding pages (``max_frames x embed_dim`` float32) and either the latents (``storage="latent"``) or the
    K/V tiers: the device tier's ``device_frames`` slots (allocated up front on a GPU; on a CPU only the slots
    used are touched) and the host tier's frames (see :func:`kv_estimate`).
    """
    size = torch.finfo(dtype).bits // 8
    frame = cfg.in_dim * cfg.latent_height * cfg.latent_width
    ps = retrieval.page_size
    pages = -(-max(retrieval.max_frames, num_frames) // ps) * ps
    dev = {"model": model_params * size, "latents": 2 * num_frames * frame * size}
    host = {"noise": num_frames * frame * 4}
    if "rag" in modes:
        dev["memory embeddings"] = pages * embed_dim * 4
        if retrieval.storage == "latent":
            dev["memory latents"] = pages * frame * size
        else:
            kv = kv_estimate(cfg, num_frames, dtype, retrieval.device_frames, retrieval.host_frames)
            per_frame = int(kv["frame_mib"] * 2 ** 20)
            slots = retrieval.device_frames if device.type == "cuda" else min(retrieval.device_frames, num_frames)
            dev["memory K/V, device tier"] = slots * per_frame
            host["memory K/V, host tier"] = round(kv["host_gib"] * 2 ** 30)
    if device.type == "cpu":
        return {"host": {**dev, **host}}
    return {"host": host, "device": dev}


def _check_resources(args, cfg: WanConfig, num_blocks: int, modes: list[str], embed_dim: int,
                     model_params: int) -> None:
    """:func:`check_memory` of the run the options describe."""
    device, dtype = _device_dtype(args)
    frames = num_blocks * cfg.frames_per_block
    check_memory(cfg, frames, device, dtype, modes, _retrieval(args, frames), embed_dim, model_params, args.seconds)


def check_memory(cfg: WanConfig, frames: int, device: torch.device, dtype: torch.dtype, modes: list[str],
                 retrieval: MemoryConfig, embed_dim: int, model_params: int, seconds: float) -> None:
    """Refuses a run of ``frames`` latent frames (``--seconds seconds``) whose buffers (:func:`run_memory_needs`)
    exceed the memory available, before any is allocated or any output written.

    Raises:
        UsageError: naming ``--seconds`` (and the retrieval memory's bounds when they are a large part).
    """
    needs = run_memory_needs(cfg, frames, dtype, device, modes, retrieval, embed_dim, model_params)
    for place, parts in needs.items():
        need, have = sum(parts.values()), device_memory(device if place == "device" else "cpu")
        if have is None or need <= have:
            continue
        where = "host memory" if place == "host" else f"memory on {device}"
        detail = ", ".join(f"{k} {v / 2 ** 30:.3g}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v)
        hint = ("; or bound the retrieval memory with --device-frames / --host-frames, or use --storage latent"
                if any(k.startswith("memory") and v > need / 4 for k, v in parts.items()) else "")
        raise UsageError(f"--seconds {seconds:g} ({frames} latent frames of {cfg.in_dim} x {cfg.latent_height} x "
                         f"{cfg.latent_width}) needs about {need / 2 ** 30:.3g} GiB of {where} (GiB: {detail}), but "
                         f"only {have / 2 ** 30:.3g} GiB are available: shorten --seconds{hint}")


def _device_dtype(args) -> tuple[torch.device, torch.dtype]:
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = parse_device(args.device, "--device")
        except ValueError as e:
            raise UsageError(str(e)) from None
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def _check_blocks(args, cfg: WanConfig, modes: list[str]) -> int:
    try:
        num_blocks = blocks_for_seconds(args.seconds, cfg.frames_per_block)
    except ValueError as e:
        raise UsageError(str(e)) from None
    frames = num_blocks * cfg.frames_per_block
    if "rag" in modes and args.top_k > cfg.window - cfg.sink - 1:
        raise UsageError(f"--top-k must be <= window - sink - 1 = {cfg.window - cfg.sink - 1} (the retrieved frames "
                         f"share the {cfg.window}-frame attention window), got {args.top_k}")
    switches = args.switch or ()
    try:
        args.switch_starts = switch_starts([frame for frame, _ in switches], frames, cfg.frames_per_block,
                                           names=[f"--switch {frame}:..." for frame, _ in switches])
    except ValueError as e:
        raise UsageError(f"{e} (--seconds {args.seconds:g} = {frames} latent frames)") from None
    if "native" in modes and frames > cfg.rope_max_positions:
        raise UsageError(f"--seconds {args.seconds:g} needs {frames} latent frames; native mode uses absolute RoPE "
                         f"positions, at most {cfg.rope_max_positions} frames "
                         f"({cfg.rope_max_positions // cfg.frames_per_block * 0.75:g} s)")
    return num_blocks


def _real_checks(args) -> None:
    """Everything about a real run that can be checked without reading a weight."""
    from lrag.wan_dir import check_wan_dir  # noqa: PLC0415

    if args.checkpoint_name is not None and args.checkpoint_name not in registry.entries():
        raise UsageError(f"--checkpoint-name {args.checkpoint_name!r} is not a registered release; known: "
                         f"{', '.join(registry.entries())}")
    if args.checkpoint is None:
        raise UsageError("--checkpoint is required without --demo (the released generator weights)")
    if args.backbone is None and args.checkpoint_name is None and not registry.name_candidates(args.checkpoint)[0]:
        raise UsageError(_BACKBONE_REQUIRED)
    if args.prompt is None or not args.prompt.strip():
        raise UsageError("--prompt is required without --demo")
    if args.lora is None:
        given = [o for o, v in (("--lora-alpha", args.lora_alpha), ("--lora-scale", args.lora_scale),
                                ("--lora-unmerged", args.lora_unmerged)) if v not in (None, False)]
        if given:
            raise UsageError(f"{', '.join(given)} needs --lora (the adapter file)")
    try:
        check_lora_scaling(args.lora_alpha, 1.0 if args.lora_scale is None else args.lora_scale,
                           names=("--lora-alpha", "--lora-scale"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    for option, path in (("--checkpoint", args.checkpoint), ("--embedder", args.embedder), ("--lora", args.lora)):
        if path is not None:
            try:
                check_regular_file(path, option)
            except (FileNotFoundError, InputFileError) as e:
                raise UsageError(str(e)) from None
    for name in ("height", "width"):
        value = getattr(args, name)
        if value < 16 or value % 16:
            raise UsageError(f"--{name} must be a positive multiple of 16, got {value}")
    try:
        check_wan_dir(args.wan_dir)
    except (FileNotFoundError, ValueError) as e:          # WanDirError, or an unreadable file (InputFileError)
        raise UsageError(str(e)) from None


def _real_config(args) -> tuple[WanConfig, int]:
    """The model config from the checkpoint's shapes and the options, and the parameter count; the checkpoint is
    checked to fit it (read lazily, matched on the ``meta`` device)."""
    from lrag.checkpoint import check_generator  # noqa: PLC0415
    from lrag.ckpt_info import describe_checkpoint  # noqa: PLC0415

    try:
        info = describe_checkpoint(args.checkpoint)
    except (FileNotFoundError, InputFileError) as e:
        raise _file_error("--checkpoint", e) from None
    if info["kind"] != "generator":
        raise UsageError(f"--checkpoint {args.checkpoint!r} is not a Wan generator checkpoint ({info['kind']})")
    geo = dict(info["geometry"])
    if args.num_heads is not None:
        geo["num_heads"] = args.num_heads
    if "num_heads" not in geo:
        raise UsageError(f"cannot infer the number of heads from dim={geo['dim']}: pass --num-heads")
    schedule = _release_schedule(args, info)
    try:
        cfg = wan_1_3b(**geo, **schedule, text_len=args.text_len, latent_height=args.height // VAE_SPATIAL,
                       latent_width=args.width // VAE_SPATIAL)
    except ValueError as e:
        if args.sink is not None and "sink" in str(e):
            raise UsageError(f"--sink {args.sink} does not fit the {schedule['window']}-frame window: {e}") from None
        raise UsageError(f"the checkpoint's geometry does not fit the options: {e}") from None
    try:
        check_generator(cfg, args.checkpoint, use_ema=args.use_ema)
    except (FileNotFoundError, InputFileError) as e:
        raise _file_error("--checkpoint", e) from None
    _check_lora(args, cfg)
    return cfg, info["num_params"]


_BACKBONE_REQUIRED = ("--backbone is required without --demo (self-forcing, causal-forcing or longlive) when "
                      "--checkpoint is not a registered release (lrag inspect says; --checkpoint-name names one)")


def _release_schedule(args, info: dict) -> dict:
    """Resolves what the checkpoint runs with from the registry (:mod:`lrag.registry`) and the options, and
    refuses combinations that cannot work. Sets on ``args`` (the run's own copy): ``release`` (the registered
    entry or ``None``), ``backbone``, ``steps``, ``first_block_steps``, ``use_ema``; returns the
    :class:`~lrag.config.WanConfig` schedule fields."""
    release, own_entry = None, False
    top = info.get("all_top_level_keys")
    if args.checkpoint_name is not None:
        release = registry.entry(args.checkpoint_name)
        diffs = registry.compare(release, info["geometry"], top)
        own_entry = any(d.startswith(registry.ENTRY_DIFF) for d in diffs)
        geometry = [d for d in diffs if not d.startswith(registry.ENTRY_DIFF)]
        if geometry:
            print(f"lrag: warning: --checkpoint-name {release.name}: the file differs from that release "
                  f"({'; '.join(geometry)}); its geometry is read from the weights", file=sys.stderr)
    else:
        match = registry.identify(args.checkpoint, info["geometry"], top)
        release = match.entry
        if release is None and match.only_entry_differs:
            release, own_entry = match.closest, True
        elif release is None and (match.closest is not None or len(match.candidates) > 1):
            print(f"lrag: note: --checkpoint: {match.describe()}", file=sys.stderr)
    if own_entry:
        print(f"lrag: note: --checkpoint is {release.name} by its name and shapes but has no {release.ema_key!r} "
              "entry: its own generator weights are used (generator_ema when present)", file=sys.stderr)
    if release is not None:
        if args.backbone is not None and args.backbone != release.backbone:
            raise UsageError(f"--backbone {args.backbone} does not fit --checkpoint, the {release.backbone} release "
                             f"{release.name} ({release.title}); drop --backbone, or name the file with "
                             "--checkpoint-name")
        if args.frames_per_block is not None and args.frames_per_block != release.frames_per_block:
            raise UsageError(f"--frames-per-block {args.frames_per_block} cannot work with {release.name}: it was "
                             f"trained to generate {release.frames_per_block} latent frame(s) per block")
        if release.lora is not None and args.lora is None:
            print(f"lrag: note: {release.name} is released with a LoRA adapter ({release.lora['file']}, rank "
                  f"{release.lora['rank']}); without --lora this runs the base generator alone", file=sys.stderr)
        args.backbone = release.backbone
    elif args.backbone is None:
        raise UsageError(_BACKBONE_REQUIRED)
    defaults = release or registry.backbone_default(args.backbone)
    args.release = release
    args.steps = list(args.steps or defaults.steps)
    first = defaults.first_block_steps if args.first_block_steps is None else args.first_block_steps
    args.first_block_steps = list(first) if first else None
    args.use_ema = False if args.no_ema else (release.use_ema if release is not None and not own_entry else None)
    return dict(frames_per_block=defaults.frames_per_block if args.frames_per_block is None else args.frames_per_block,
                window=defaults.window,
                sink=defaults.sink if args.sink is None else args.sink)


def _check_lora(args, cfg: WanConfig) -> None:
    """Checks ``--lora`` (read lazily) against the generator's layers on the ``meta`` device."""
    if args.lora is None:
        return
    from lrag.lora import check_lora, read_lora  # noqa: PLC0415
    from lrag.models.wan import CausalWanModel  # noqa: PLC0415

    try:
        adapter = read_lora(args.lora, lazy=True)
    except (FileNotFoundError, InputFileError) as e:
        raise _file_error("--lora", e) from None
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    try:
        check_lora(model, adapter)
    except ValueError as e:
        raise UsageError(f"--lora {args.lora!r} does not fit --checkpoint: {e}") from None
    release = args.release
    if args.lora_alpha is None and release is not None and release.lora and release.lora["rank"] == adapter.rank:
        args.lora_alpha = release.lora["alpha"]          # the release's adapter: its config's alpha


def _check_embedder(args, cfg: WanConfig) -> int:
    """Checks ``--embedder`` (read lazily, on the ``meta`` device) against the latents; returns the embedding
    size (the spatial-mean descriptor's ``C`` without one)."""
    if not args.embedder:
        return cfg.in_dim
    from lrag_ext.embedder.checkpoint import check_embedder, check_embedder_input  # noqa: PLC0415

    try:
        config = check_embedder(args.embedder)
        check_embedder_input(config, cfg.in_dim, cfg.latent_height, cfg.latent_width)
    except (FileNotFoundError, InputFileError) as e:
        raise _file_error("--embedder", e) from None
    except ValueError as e:
        raise UsageError(f"--embedder {args.embedder!r} does not fit the generator: {e}") from None
    return config.latent_dim


def _from_wan_dir(args, what: str, load: Callable):
    """``load()`` (transformers / diffusers reading ``--wan-dir``); their errors are the folder's, reported as
    usage errors naming it."""
    try:
        return load()
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001  (any failure to read the user's files, or a missing optional package)
        raise UsageError(f"--wan-dir {args.wan_dir!r}: cannot load the {what} ({error_summary(e)})") from None


def _real_setup(args, cfg: WanConfig, num_frames: int, tokenizer=None) -> Setup:
    from lrag.checkpoint import build_generator  # noqa: PLC0415
    from lrag.text import TextEncoder  # noqa: PLC0415
    from lrag.vae import StreamingVAEDecoder, load_vae  # noqa: PLC0415

    device, dtype = _device_dtype(args)
    if args.embedder:
        from lrag_ext.embedder import load_embedder  # noqa: PLC0415  (cheap: load it first)
        try:
            embed = load_embedder(args.embedder, map_location=device).embed
        except (FileNotFoundError, InputFileError) as e:
            raise _file_error("--embedder", e) from None
        embedder = args.embedder
    else:
        embed, embedder = None, "spatial-mean descriptor (no --embedder)"
        print("lrag: no --embedder given: retrieval uses the spatial-mean descriptor (SPEC §5 fallback)",
              file=sys.stderr)
    encoder = _from_wan_dir(args, "text encoder", lambda: TextEncoder(args.wan_dir, text_len=cfg.text_len,
                                                                      device=device, dtype=dtype,
                                                                      tokenizer=tokenizer))
    if encoder.dim != cfg.text_dim:
        raise UsageError(f"the text encoder of --wan-dir gives {encoder.dim}-d states but the checkpoint expects "
                         f"text_dim={cfg.text_dim}")
    text = encoder.encode([args.prompt]).to(dtype)
    switches = [(frame, encoder.encode([prompt]).to(dtype)) for frame, prompt in args.switch or ()]
    del encoder                                   # free the umT5 weights before loading the DiT
    vae = _from_wan_dir(args, "VAE", lambda: load_vae(args.wan_dir, device=device))
    if vae.config.z_dim != cfg.in_dim:
        raise UsageError(f"the VAE of --wan-dir has {vae.config.z_dim} latent channels, the checkpoint "
                         f"{cfg.in_dim}")
    # A merged adapter goes into the checkpoint's weights on the host, before the one cast to --dtype; an attached
    # one hooks the model where it runs (its matrices copied to that device and dtype).
    merge_first = args.lora is not None and not args.lora_unmerged
    try:
        model = build_generator(cfg, args.checkpoint, use_ema=args.use_ema,
                                dtype=None if merge_first else dtype, device="cpu" if merge_first else device)
    except (FileNotFoundError, InputFileError) as e:   # changed since the check
        raise _file_error("--checkpoint", e) from None
    lora = _apply_lora(args, model)
    model = model.to(device=device, dtype=dtype)
    pipe = Pipeline(model, denoising_steps=args.steps, first_block_steps=args.first_block_steps,
                    retrieval=_retrieval(args, num_frames), embed=embed, retrieve_every=args.retrieve_every,
                    switch_memory=args.switch_memory)
    def make_renderer(mode: str):
        decode = StreamingVAEDecoder(vae).decode
        return lambda block: decode(block.latents[0])

    release = args.release
    return Setup(pipe, text, make_renderer, switches,
                 {"source": f"{args.backbone}: {args.checkpoint}", "embedder": embedder, "lora": lora,
                  "release": None if release is None else release.name,
                  "state_dict_entry": {True: "generator_ema", False: "generator", None: "generator_ema if present"}[
                      args.use_ema],
                  "steps": args.steps, "first_block_steps": args.first_block_steps,
                  "retrieve_every": args.retrieve_every,
                  "switches": [{"frame": f, "start_frame": start, "prompt": p}
                               for (f, p), start in zip(args.switch or (), args.switch_starts)],
                  "switch_memory": args.switch_memory if args.switch else None})


def _apply_lora(args, model) -> dict | None:
    """Merges (or attaches, ``--lora-unmerged``) ``--lora`` into ``model``; what was applied, for the run log."""
    if args.lora is None:
        return None
    from lrag.lora import apply_lora, read_lora  # noqa: PLC0415

    scale = 1.0 if args.lora_scale is None else args.lora_scale
    try:
        adapter = read_lora(args.lora)
        apply_lora(model, adapter, alpha=args.lora_alpha, scale=scale, merge=not args.lora_unmerged)
    except (FileNotFoundError, InputFileError) as e:   # changed since the check
        raise _file_error("--lora", e) from None
    except ValueError as e:
        raise UsageError(f"--lora {args.lora!r}: {e}") from None
    return {"path": args.lora, "rank": adapter.rank, "layers": len(adapter.layers),
            "alpha": adapter.alpha(args.lora_alpha), "lora_scale": scale,
            "scaling": adapter.scaling(args.lora_alpha, scale), "merged": not args.lora_unmerged}


def _build(args, modes: list[str], tokenizer) -> tuple[Setup, int]:
    """Checks the options against the geometry and the memory, then builds the real setup."""
    _real_checks(args)
    cfg, params = _real_config(args)
    num_blocks = _check_blocks(args, cfg, modes)
    _check_resources(args, cfg, num_blocks, modes, _check_embedder(args, cfg), params)
    return _real_setup(args, cfg, num_blocks * cfg.frames_per_block, tokenizer=tokenizer), num_blocks


def _announce_memory(args, setup: Setup, num_blocks: int, device: str) -> dict:
    cfg = setup.pipe.cfg
    est = kv_estimate(cfg, num_blocks * cfg.frames_per_block, setup.pipe.model.dtype, args.device_frames,
                      args.host_frames, args.storage)
    if not args.quiet:
        what = "K/V" if args.storage == "kv" else "latent"
        print(f"lrag: retrieval memory: {est['frame_mib']:.2f} MiB of {what} per latent frame; up to "
              f"{est['device_gib']:.2f} GiB on {device} + {est['host_gib']:.2f} GiB host memory "
              f"(bound them with --device-frames / --host-frames)", file=sys.stderr)
    if est["dropped_frames"]:
        print(f"lrag: warning: --device-frames + --host-frames hold fewer frames than the video has: the oldest "
              f"{est['dropped_frames']} frames' K/V will be dropped and can no longer be retrieved", file=sys.stderr)
    return est


def run_generate(args, on_block: Optional[Callable] = None, tokenizer=None) -> dict[str, str]:
    """Runs ``lrag generate`` for parsed ``args`` (``--demo``: :func:`lrag.demo.run_demo`); returns the artefacts'
    paths.

    Args:
        on_block: extra per-block hook (after the block's frames are written), e.g. a test interrupting a run.
        tokenizer: a tokenizer to use instead of ``--wan-dir/tokenizer`` (tests).

    Raises:
        UsageError: a bad option or input, before any heavy loading and before anything is written.
        KeyboardInterrupt: after the finished blocks' video and logs have been written.
    """
    if args.demo:
        from lrag.demo import run_demo  # noqa: PLC0415

        return run_demo(args, on_block)
    # a copy with the defaults of the options the demo refuses (the caller's args stay as parsed)
    args = Namespace(**{**vars(args), **{k: v for k, v in REAL_DEFAULTS.items() if getattr(args, k) is None},
                        "switch_memory_given": args.switch_memory is not None})
    out = output_dir(args)
    _check_common(args)
    modes = {"both": ["rag", "native"], None: ["rag"]}.get(args.mode, [args.mode])
    setup, num_blocks = _build(args, modes, tokenizer)
    os.makedirs(out, exist_ok=True)
    cfg = setup.pipe.cfg
    meta = {**setup.meta, "prompt": args.prompt, "seed": args.seed,
            "seconds_requested": args.seconds, "num_blocks": num_blocks, "frames_per_block": cfg.frames_per_block,
            "latent_shape": [cfg.in_dim, cfg.latent_height, cfg.latent_width], "window": cfg.window,
            "sink": cfg.sink, "top_k": args.top_k, "recent_exclude": args.recent_exclude,
            "memory_position": args.memory_position, "storage": args.storage,
            "device": str(setup.pipe.model.device),
            "dtype": str(setup.pipe.model.dtype).replace("torch.", ""), "modes": modes,
            "title": args.backbone}
    if "rag" in modes:
        meta["kv_memory_estimate"] = _announce_memory(args, setup, num_blocks, meta["device"])
    runs, interrupted, start = [], True, time.perf_counter()
    try:
        for mode in modes:
            run = ModeRun(mode, num_blocks, os.path.join(out, f"{mode}.mp4"))
            runs.append(run)
            run_mode(setup.pipe, setup.text, num_blocks, mode, setup.make_renderer(mode), run.video, seed=args.seed,
                     on_block=on_block, progress=Progress(mode, num_blocks, enabled=not args.quiet), run=run,
                     switches=setup.switches)
        interrupted = False
    finally:
        meta["wall_s"] = time.perf_counter() - start
        paths = write_outputs(out, runs, meta, cfg.frames_per_block, interrupted)
    videos = {f"video_{r.mode}": r.video for r in runs}
    if len(runs) > 1:
        from lrag.video import side_by_side  # noqa: PLC0415
        videos["side_by_side"] = os.path.join(out, "side_by_side.mp4")
        side_by_side([r.video for r in runs], videos["side_by_side"])
    return {**videos, **paths}
