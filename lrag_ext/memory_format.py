"""The on-disk format of a saved :class:`lrag_ext.RetrievalMemory`: reading its files safely and validating every
field of ``manifest.json`` before the loader allocates anything.

A saved memory is a folder with two regular files:

- ``tensors.safetensors``: ``embedding_pages [P, page_size, D]`` (and ``latent_pages [P, page_size, C, H, W]``), the
  K/V ``kv/<stream> [stored, L, 2, T, H, Dh]`` of each stream's stored frames in frame order (and ``kv_scale/<stream>
  [stored, L, 2]`` float32 for float8 pools);
- ``manifest.json``: format and version, the config, ``next_stream``, per stream ``num_frames``, ``pages`` (logical
  page -> physical page), ``kv_code`` (frame -> ``segment << 32 | slot`` or -1), ``first_retrievable`` and the
  log (one :meth:`lrag_ext.RetrievalRecord.to_dict` per record); ``segments`` (slots per K/V segment), ``fifo``
  (the eviction queues, oldest first), ``files`` (size and SHA-256 of the tensor file) and, from version 2,
  ``manifest_sha256``: the SHA-256 of the canonical JSON (sorted keys, no whitespace) of the manifest without that
  field, so an edited manifest is refused.

Every failure is a ``ValueError`` naming the file and the field. Only regular files are opened (a FIFO or a device
would block or never end; a symlink could point out of the folder), with size limits.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re

import torch

from lrag_ext import state_dicts
from lrag_ext.memory_config import MemoryConfig
from lrag_ext.memory_log import RetrievalRecord

FORMAT = "lrag_ext.RetrievalMemory"
VERSION = 2                 # 2: manifest_sha256 added (version 1 folders still load, validated but unchecksummed)
READABLE_VERSIONS = (1, 2)
SEGMENT_SHIFT = 32          # a frame's K/V location code is segment << 32 | slot (or -1: not stored)
SLOT_MASK = (1 << SEGMENT_SHIFT) - 1
MAX_MANIFEST_BYTES = 1 << 28  # 256 MiB: ~50 bytes per frame and ~300 per block, far beyond any real video
STREAM_KEYS = frozenset({"num_frames", "pages", "kv_code", "first_retrievable", "log"})


class FormatError(ValueError):
    """A saved memory that cannot be loaded; the message names the file and the field."""


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the canonical JSON of ``manifest`` without its ``manifest_sha256`` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def check_regular_file(path: str, max_bytes: int | None = None) -> int:
    """Returns the size of ``path`` after checking that it is a regular, non-empty file (not a symlink, FIFO,
    device or folder) of at most ``max_bytes``; raises :class:`FormatError` naming it otherwise."""
    try:
        size = state_dicts.check_regular_file(path, what="saved memory file", follow_symlinks=False)
    except FileNotFoundError:
        raise FormatError(f"{path} is missing: not a saved RetrievalMemory") from None
    except state_dicts.InputFileError as err:
        raise FormatError(str(err)) from None
    if max_bytes is not None and size > max_bytes:
        raise FormatError(f"{path} has {size} bytes, more than the {max_bytes} a manifest may have")
    return size


def read_manifest(path: str) -> dict:
    """Reads and checksums ``path/manifest.json``; returns the parsed manifest (fields not yet validated)."""
    manifest_file = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise FormatError(f"{path} is not a folder: not a saved RetrievalMemory")
    check_regular_file(manifest_file, MAX_MANIFEST_BYTES)
    try:
        with open(manifest_file, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise FormatError(f"{manifest_file} is not valid JSON ({type(err).__name__}: {err}): the file is "
                          "truncated or altered") from None
    if not isinstance(manifest, dict):
        raise FormatError(f"{manifest_file}: the manifest must be a JSON object, got {type(manifest).__name__}")
    fmt, version = manifest.get("format"), manifest.get("version")
    if fmt != FORMAT or isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise FormatError(f"{manifest_file}: unsupported format {fmt!r} version {version!r} (this build reads "
                          f"{FORMAT!r} versions {', '.join(map(str, READABLE_VERSIONS))})")
    if version >= 2:
        want = manifest.get("manifest_sha256")
        try:
            got = manifest_digest(manifest)
        except (TypeError, ValueError, RecursionError) as err:
            raise FormatError(f"{manifest_file}: cannot be checksummed ({err})") from None
        if want != got:
            raise FormatError(f"{manifest_file}: field manifest_sha256 does not match the manifest's contents: the "
                              "manifest is truncated or altered")
    return manifest


class _Fields:
    """Field access that names the file and the JSON path of a bad field in every error."""

    def __init__(self, file: str):
        self.file = file

    @staticmethod
    def path(where: str, key: str) -> str:
        return f"{where}.{key}" if where else key

    def fail(self, where: str, what: str):
        raise FormatError(f"{self.file}: field {where} {what}")

    def get(self, obj: dict, key: str, where: str, kind: type | tuple):
        if not isinstance(obj, dict) or key not in obj:
            self.fail(self.path(where, key), "is missing")
        value = obj[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.fail(self.path(where, key), f"must be {names}, got {type(value).__name__}")
        return value

    def int_in(self, obj: dict, key: str, where: str, lo: int, hi: int | float = math.inf) -> int:
        value = self.get(obj, key, where, int)
        if not lo <= value <= hi:
            self.fail(self.path(where, key), f"must be in [{lo}, {hi}], got {value}")
        return value

    def int_list(self, obj: dict, key: str, where: str, lo: int, hi: int) -> list[int]:
        values = self.get(obj, key, where, list)
        for i, value in enumerate(values):
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                self.fail(f"{self.path(where, key)}[{i}]", f"must be an int in [{lo}, {hi}], got {value!r}")
        return values


def host_segment_sizes(host_frames: int | None, count: int) -> list[int]:
    """Sizes of the first ``count`` host segments as :class:`RetrievalMemory` grows them: doubling from 16, capped
    by ``host_frames``. The one definition the memory and the loader share."""
    sizes = []
    for _ in range(count):
        capacity = sum(sizes)
        size = max(16, capacity)
        if host_frames is not None:
            size = min(size, host_frames - capacity)
        if size <= 0:
            break
        sizes.append(size)
    return sizes


def validate_manifest(manifest: dict, manifest_file: str) -> MemoryConfig:
    """Checks every field of a manifest for types, ranges and consistency (page tables, counts, K/V codes, queues,
    segment sizes) before anything is allocated; returns its config. Raises :class:`FormatError` naming the field."""
    fields = _Fields(manifest_file)
    raw_config = fields.get(manifest, "config", "", dict)
    try:
        config = MemoryConfig.from_dict(raw_config)
        config.check_complete()
        torch.device(config.device)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as err:
        fields.fail("config", f"is not a valid MemoryConfig: {err}")
    n_pages = -(-config.max_frames // config.page_size)
    next_stream = fields.int_in(manifest, "next_stream", "", 0, 2 ** 62)

    segments = fields.int_list(manifest, "segments", "", 0, 2 ** 31)
    if config.storage == "kv":
        if not segments or segments[0] != config.device_frames:
            fields.fail("segments[0]", f"must equal config.device_frames ({config.device_frames}), got "
                        f"{segments[:1]}")
        if segments[1:] != host_segment_sizes(config.host_frames, len(segments) - 1):
            fields.fail("segments", f"host sizes {segments[1:]} are not how the host tier grows "
                        f"(host_frames={config.host_frames})")
        # The host tier grows only when full, so before its last segment it held at most max_frames frames.
        if sum(segments[1:-1]) > n_pages * config.page_size:
            fields.fail("segments", f"host tier of {sum(segments[1:])} slots could never have been filled by the "
                        f"{n_pages * config.page_size} frames the embedding pages hold")
    elif segments:
        fields.fail("segments", f"must be empty for storage={config.storage!r}, got {segments}")

    streams = fields.get(manifest, "streams", "", dict)
    used_pages: set[int] = set()
    used_codes: set[int] = set()
    stored: dict[str, set[tuple[int, int]]] = {"device": set(), "host": set()}
    for sid_text, rec in streams.items():
        where = f"streams[{sid_text!r}]"
        if not re.fullmatch(r"0|[1-9][0-9]{0,18}", sid_text) or not int(sid_text) < next_stream:
            fields.fail(where, f"must be a stream id in [0, next_stream={next_stream})")
        sid = int(sid_text)
        if not isinstance(rec, dict) or set(rec) != STREAM_KEYS:
            fields.fail(where, f"must be an object with the keys {sorted(STREAM_KEYS)}")
        num_frames = fields.int_in(rec, "num_frames", where, 0, n_pages * config.page_size)
        pages = fields.int_list(rec, "pages", where, 0, n_pages - 1)
        if len(pages) != -(-num_frames // config.page_size):
            fields.fail(f"{where}.pages", f"has {len(pages)} pages, {num_frames} frames need "
                        f"{-(-num_frames // config.page_size)}")
        if used_pages.intersection(pages) or len(set(pages)) != len(pages):
            fields.fail(f"{where}.pages", "repeats a page (a page belongs to one stream once)")
        used_pages.update(pages)
        first_retrievable = fields.int_in(rec, "first_retrievable", where, 0, num_frames)
        codes = fields.int_list(rec, "kv_code", where, -1, 2 ** 62)
        if len(codes) != num_frames:
            fields.fail(f"{where}.kv_code", f"has {len(codes)} entries for {num_frames} frames")
        for frame, code in enumerate(codes):
            if code < 0:
                if config.storage == "kv" and frame >= max(config.sink_frames, first_retrievable):
                    fields.fail(f"{where}.kv_code[{frame}]", "is -1 but the frame is retrievable: its K/V must be stored "
                                "(only sink frames and frames below first_retrievable have none)")
                continue
            seg, slot = code >> SEGMENT_SHIFT, code & SLOT_MASK
            if config.storage != "kv" or seg >= len(segments) or slot >= segments[seg]:
                fields.fail(f"{where}.kv_code[{frame}]", f"= {code} names no slot of segments {segments}")
            if frame < config.sink_frames or frame < first_retrievable:
                fields.fail(f"{where}.kv_code[{frame}]", "stores a frame that is never retrievable (a sink frame or "
                            "one below first_retrievable)")
            if code in used_codes:
                fields.fail(f"{where}.kv_code[{frame}]", f"= {code} is a slot already used by another frame")
            used_codes.add(code)
            stored["device" if seg == 0 else "host"].add((sid, frame))
        log = fields.get(rec, "log", where, list)
        for i, entry in enumerate(log):
            try:
                RetrievalRecord.from_dict(entry)  # what the loader builds from it
            except (TypeError, ValueError) as err:
                fields.fail(f"{where}.log[{i}]", f"is invalid: {err}")
    if len(used_pages) > n_pages:
        fields.fail("streams", f"use {len(used_pages)} pages, the config has {n_pages}")

    fifo = fields.get(manifest, "fifo", "", dict)
    queues: dict[str, list[tuple[int, int]]] = {}
    if set(fifo) != {"device", "host"}:
        fields.fail("fifo", f"must have the keys ['device', 'host'], got {sorted(fifo)}")
    for tier in ("device", "host"):
        queue = fields.get(fifo, tier, "fifo", list)
        entries = []
        for i, item in enumerate(queue):
            if (not isinstance(item, list) or len(item) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
                fields.fail(f"fifo.{tier}[{i}]", f"must be a [stream, frame] pair of ints, got {item!r}")
            entries.append(tuple(item))
        if len(set(entries)) != len(entries) or set(entries) != stored[tier]:
            fields.fail(f"fifo.{tier}", f"must list each frame stored in the {tier} tier exactly once")
        queues[tier] = entries
    # Eviction goes oldest first: within a stream, frames queue in frame order, and its host frames are older
    # than its device frames. A queue out of that order would drop newer frames before older ones.
    newest_host: dict[int, int] = {}
    for tier in ("host", "device"):
        last: dict[int, int] = {}
        for i, (sid, frame) in enumerate(queues[tier]):
            if frame <= last.get(sid, -1) or (tier == "device" and frame <= newest_host.get(sid, -1)):
                fields.fail(f"fifo.{tier}[{i}]", f"= [{sid}, {frame}] is out of age order for stream {sid}")
            last[sid] = frame
        if tier == "host":
            newest_host = last
    return config


def validate_tensors(tensors: dict, manifest: dict, config: MemoryConfig, tensor_file: str) -> None:
    """Checks names, shapes and dtypes of the tensor file against the (validated) manifest."""
    n_pages = -(-config.max_frames // config.page_size)
    want = {"embedding_pages": ((n_pages, config.page_size, config.embed_dim), config.embed_dtype)}
    if config.storage == "latent":
        want["latent_pages"] = ((n_pages, config.page_size) + tuple(config.latent_shape), config.dtype)
    if config.storage == "kv":
        L, T, H, Dh = config.kv_layout.frame_shape
        for sid, rec in manifest["streams"].items():
            n = sum(1 for c in rec["kv_code"] if c >= 0)
            if n:
                want[f"kv/{sid}"] = ((n, L, 2, T, H, Dh), config.dtype)
                if config.dtype == torch.float8_e4m3fn:
                    want[f"kv_scale/{sid}"] = ((n, L, 2), torch.float32)
    if set(tensors) != set(want):
        raise FormatError(f"{tensor_file}: holds tensors {sorted(tensors)}, the manifest needs {sorted(want)}")
    for name, (shape, dtype) in want.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise FormatError(f"{tensor_file}: tensor {name} is {t.dtype} {list(t.shape)}, the manifest needs "
                              f"{dtype} {list(shape)}")


def read_tensors(path: str, manifest: dict, config: MemoryConfig) -> dict[str, torch.Tensor]:
    """The tensors of ``path/tensors.safetensors`` after checking its size and SHA-256 against the (validated)
    manifest, and its names, shapes and dtypes (:func:`validate_tensors`)."""
    manifest_file = os.path.join(path, "manifest.json")
    tensor_file = os.path.join(path, "tensors.safetensors")
    files = manifest.get("files")
    want = files.get("tensors.safetensors") if isinstance(files, dict) else None
    if not isinstance(want, dict) or not isinstance(want.get("bytes"), int) or not isinstance(want.get("sha256"), str):
        raise FormatError(f"{manifest_file}: field files['tensors.safetensors'] must hold bytes and sha256")
    size = check_regular_file(tensor_file)
    if size != want["bytes"]:
        raise FormatError(f"{tensor_file} has {size} bytes, the manifest says {want['bytes']}: the file is "
                          "truncated or altered")
    if sha256_file(tensor_file) != want["sha256"]:
        raise FormatError(f"{tensor_file} does not match its SHA-256 in the manifest: the file is altered")
    import safetensors.torch  # noqa: PLC0415 - only loading needs it
    try:
        tensors = safetensors.torch.load_file(tensor_file)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        raise FormatError(f"{tensor_file} is not a readable safetensors file: {err}") from None
    validate_tensors(tensors, manifest, config, tensor_file)
    return tensors


def check_fits(config: MemoryConfig, segments: list[int], manifest_file: str) -> None:
    """Refuses a saved memory whose K/V tiers would not fit in the memory of the target (an edited ``device_frames``
    or host segments must give a clear error, not an allocator failure or a machine brought to swap)."""
    if config.storage != "kv":
        return
    frame_bytes = config.kv_layout.frame_bytes(config.dtype)
    device = torch.device(config.device)
    for name, slots, place in (("config.device_frames", segments[0], device),
                               ("segments (host tier)", sum(segments[1:]), torch.device("cpu"))):
        total = state_dicts.device_memory(place, available=False)
        if total is not None and slots * frame_bytes > total:
            raise FormatError(f"{manifest_file}: field {name} asks for {slots} K/V slots of {frame_bytes} bytes "
                              f"({slots * frame_bytes / 2**30:.1f} GiB), more than the {total / 2**30:.1f} GiB of "
                              f"{'host memory' if place.type == 'cpu' else place}")
