"""The checkpoint registry: the released generator checkpoints we know (``lrag/data/checkpoints.json``), and
matching a file against it.

Each entry records what the release's own inference config and README command use: the backbone, the file's name
in its Hugging Face repository, the state-dict entry (``generator_ema`` or ``generator``), frames per block, the
denoising steps and the first block's steps, the release's attention (global or a rolling window with a sink), the
window and sink ``lrag generate`` runs it with, its LoRA adapter, and its geometry (which fixes every key and
shape: :class:`~lrag.models.wan.CausalWanModel` is built from it). ``sha256`` is ``null`` where none is known.

Matching (:func:`identify`): the weights of all releases have the same shapes, so without a hash a file is
recognised by its path (the release's relative path, e.g. ``framewise/causal_forcing.pt``, at the end of the given
path; or its base name when only one entry has it) and then checked: geometry, the state-dict entry the release
reads. A file whose name matches but whose structure differs is reported as the closest entry with the
differences; a renamed file is unknown (``lrag generate --checkpoint-name`` names it).
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Optional

REGISTRY_FORMAT = "lrag-checkpoint-registry/1"
EMA_KEYS = ("generator_ema", "generator")
ENTRY_DIFF = "no "      # how compare() starts the difference "the file lacks the release's state-dict entry"
GEOMETRY_FIELDS = ("num_layers", "dim", "ffn_dim", "text_dim", "freq_dim", "in_dim", "out_dim", "patch_size",
                   "qk_norm", "cross_attn_norm")


@dataclass(frozen=True)
class CheckpointEntry:
    """One released checkpoint (see the module docstring for the fields' meaning)."""

    name: str
    backbone: str
    title: str
    source: str
    file: str
    upstream: str
    sha256: Optional[str]
    geometry: dict
    ema_key: str
    frames_per_block: int
    steps: tuple[int, ...]
    first_block_steps: Optional[tuple[int, ...]]
    release_attention: dict
    window: int
    sink: int
    lora: Optional[dict]

    @property
    def use_ema(self) -> bool:
        """The ``use_ema`` argument of :func:`lrag.checkpoint.load_generator` that reads the release's entry."""
        return self.ema_key == "generator_ema"

    def schedule(self) -> dict:
        """The :class:`~lrag.config.WanConfig` schedule fields: ``frames_per_block``, ``window``, ``sink``."""
        return dict(frames_per_block=self.frames_per_block, window=self.window, sink=self.sink)

    def describe_release_attention(self) -> str:
        att = self.release_attention
        if att["local_attn_size"] == -1:
            return "global (every frame; the release's cache holds 21 latent frames at 480 x 832)"
        return f"rolling window of {att['local_attn_size']} frames with a {att['sink_size']}-frame sink"


@dataclass
class Match:
    """What :func:`identify` found: ``entry`` when a file is recognised with nothing differing; otherwise the
    ``closest`` entry (or ``None``) and the ``differences``; ``candidates``: every entry the name fits."""

    @property
    def only_entry_differs(self) -> bool:
        """The closest release fits in everything but the state-dict entry (e.g. a re-saved plain state dict)."""
        return self.closest is not None and all(d.startswith(ENTRY_DIFF) for d in self.differences)

    entry: Optional[CheckpointEntry] = None
    closest: Optional[CheckpointEntry] = None
    differences: list[str] = field(default_factory=list)
    candidates: list[CheckpointEntry] = field(default_factory=list)
    how: str = ""

    def describe(self) -> str:
        if self.entry is not None:
            return f"{self.entry.name} ({self.entry.title}; {self.how})"
        if self.closest is not None:
            return (f"no exact match; closest {self.closest.name} ({self.how}), differs: "
                    + "; ".join(self.differences))
        if len(self.candidates) > 1:
            return (f"ambiguous: the name fits {', '.join(c.name for c in self.candidates)} (pass "
                    "--checkpoint-name to lrag generate)")
        return "unknown (not a released checkpoint lrag knows by name; geometry read from the weights)"


def _check_entry(raw: dict, geometries: dict) -> CheckpointEntry:
    """One entry, validated (a ``ValueError`` naming the entry and field otherwise)."""
    name = raw.get("name", "?")

    def need(key, ok, what):
        if key not in raw or not ok(raw[key]):
            raise ValueError(f"checkpoint registry entry {name!r}: {key!r} must be {what}, got {raw.get(key)!r}")
        return raw[key]

    is_steps = lambda v: (isinstance(v, list) and v and all(isinstance(t, int) and 0 <= t <= 1000 for t in v))  # noqa: E731
    need("name", lambda v: isinstance(v, str) and v, "a non-empty string")
    for key in ("backbone", "title", "source", "file", "upstream"):
        need(key, lambda v: isinstance(v, str) and v, "a non-empty string")
    need("sha256", lambda v: v is None or (isinstance(v, str) and len(v) == 64), "null or 64 hex digits")
    need("geometry", lambda v: v in geometries, f"one of {sorted(geometries)}")
    need("ema_key", lambda v: v in EMA_KEYS, f"one of {EMA_KEYS}")
    need("frames_per_block", lambda v: isinstance(v, int) and v >= 1, "an int >= 1")
    need("steps", is_steps, "a non-empty list of ints in [0, 1000]")
    need("first_block_steps", lambda v: v is None or is_steps(v), "null or a list of ints in [0, 1000]")
    need("release_attention", lambda v: isinstance(v, dict) and set(v) == {"local_attn_size", "sink_size"},
         "{local_attn_size, sink_size}")
    need("window", lambda v: isinstance(v, int) and v >= 1, "an int >= 1")
    need("sink", lambda v: isinstance(v, int) and 0 <= v < raw["window"], "an int in [0, window)")
    need("lora", lambda v: v is None or (isinstance(v, dict) and {"file", "rank", "alpha"} <= set(v)),
         "null or {file, rank, alpha}")
    return CheckpointEntry(
        name=raw["name"], backbone=raw["backbone"], title=raw["title"], source=raw["source"], file=raw["file"],
        upstream=raw["upstream"], sha256=raw["sha256"], geometry=dict(geometries[raw["geometry"]]),
        ema_key=raw["ema_key"], frames_per_block=raw["frames_per_block"], steps=tuple(raw["steps"]),
        first_block_steps=None if raw["first_block_steps"] is None else tuple(raw["first_block_steps"]),
        release_attention=dict(raw["release_attention"]), window=raw["window"], sink=raw["sink"],
        lora=None if raw["lora"] is None else dict(raw["lora"]))


def parse_registry(doc: dict) -> tuple[dict[str, CheckpointEntry], dict[str, str]]:
    """``(entries by name, default entry name by backbone)`` of a registry document, validated.

    Raises:
        ValueError: a wrong format, a malformed entry (named), a duplicate name, or a backbone default that
            names no entry.
    """
    if not isinstance(doc, dict) or doc.get("format") != REGISTRY_FORMAT:
        raise ValueError(f"not a checkpoint registry of format {REGISTRY_FORMAT!r}")
    geometries = doc.get("geometries")
    if not isinstance(geometries, dict) or not all(isinstance(g, dict) and set(GEOMETRY_FIELDS) <= set(g)
                                                   for g in geometries.values()):
        raise ValueError(f"the registry's geometries must each give {GEOMETRY_FIELDS}")
    entries: dict[str, CheckpointEntry] = {}
    for raw in doc.get("checkpoints", []):
        entry = _check_entry(raw, geometries)
        if entry.name in entries:
            raise ValueError(f"checkpoint registry: duplicate entry name {entry.name!r}")
        entries[entry.name] = entry
    defaults = doc.get("backbone_defaults", {})
    for backbone, name in defaults.items():
        if name not in entries or entries[name].backbone != backbone:
            raise ValueError(f"checkpoint registry: backbone_defaults[{backbone!r}] = {name!r} is not a "
                             f"{backbone} entry")
    return entries, dict(defaults)


@functools.lru_cache(maxsize=1)
def _document() -> dict:
    """The package's registry file, parsed as JSON."""
    return json.loads(resources.files("lrag").joinpath("data", "checkpoints.json").read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def _registry() -> tuple[dict[str, CheckpointEntry], dict[str, str]]:
    return parse_registry(_document())


def geometry(name: str) -> dict:
    """A registered backbone geometry (``WanConfig`` fields: layers, dim, heads, ffn, text/freq dims, channels,
    patch, norms) by name."""
    return dict(_document()["geometries"][name])


def entries() -> dict[str, CheckpointEntry]:
    """Every registered checkpoint, by name."""
    return dict(_registry()[0])


def entry(name: str) -> CheckpointEntry:
    """The entry called ``name`` (``KeyError`` listing the names otherwise)."""
    known = _registry()[0]
    if name not in known:
        raise KeyError(f"no registered checkpoint {name!r}; known: {', '.join(known)}")
    return known[name]


def backbone_default(backbone: str) -> CheckpointEntry:
    """The entry whose schedule an unrecognised checkpoint of ``backbone`` gets (its chunk-wise release)."""
    known, defaults = _registry()
    return known[defaults[backbone]]


def _path_parts(path: str) -> list[str]:
    """The components of a path, split at ``/`` and ``\\`` (a Windows path given on any system), lower-cased (file
    systems and downloads differ in case)."""
    return [part for part in re.split(r"[\\/]+", path.lower()) if part not in ("", ".")]


def _path_fits(path: str, file: str) -> str | None:
    """How ``path`` (as given: a relative path is compared as written) fits the release's relative ``file``:
    ``"path"`` (ends with all its components), ``"name"`` (same base name), or ``None``."""
    given, release = _path_parts(path), _path_parts(file)
    if len(given) >= len(release) and given[-len(release):] == release:
        return "path"
    return "name" if given and given[-1] == release[-1] else None


def name_candidates(path: str) -> tuple[list[CheckpointEntry], str]:
    """The entries ``path`` fits by name, and how: those whose release path it ends with, else those with its base
    name (``([], "")`` when none)."""
    fits = [(e, _path_fits(path, e.file)) for e in _registry()[0].values()]
    by_path = [e for e, how in fits if how == "path"]
    if by_path:
        return by_path, f"file path ends with {by_path[0].file}"
    by_name = [e for e, how in fits if how == "name"]
    return by_name, "file name" if by_name else ""


def compare(found: CheckpointEntry, geometry: dict, top_level_keys: list[str] | None) -> list[str]:
    """How a checkpoint with ``geometry`` (:func:`lrag.ckpt_info.infer_geometry`) and top-level entries
    ``top_level_keys`` (``None``: a plain state dict) differs from ``found``'s release; empty when it does not."""
    diffs = []
    for key in GEOMETRY_FIELDS:
        want, got = found.geometry[key], geometry.get(key)
        if key == "patch_size":
            want, got = tuple(want), tuple(got) if got is not None else None
        if want != got:
            diffs.append(f"{key} {got} (the release: {want})")
    keys = set(top_level_keys or ())
    if found.ema_key not in keys:
        diffs.append(f"{ENTRY_DIFF}{found.ema_key!r} entry, which the release's inference reads"
                     + (f" (entries: {', '.join(sorted(keys)[:6])})" if keys else " (a plain state dict)"))
    return diffs


def identify(path: str, geometry: dict, top_level_keys: list[str] | None,
             sha256: str | None = None) -> Match:
    """Matches a generator checkpoint against the registry (see the module docstring).

    Args:
        path: the file's path (its name is what identifies a release without a hash).
        geometry: the file's geometry (:func:`lrag.ckpt_info.infer_geometry`).
        top_level_keys: the file's top-level entries (``None`` for a plain state dict).
        sha256: the file's hash when the caller has it (only compared with entries that record one).
    """
    if sha256 is not None:
        for e in _registry()[0].values():
            if e.sha256 is not None and e.sha256 == sha256:
                return Match(entry=e, candidates=[e], how="sha256")
    candidates, how = name_candidates(path)
    if len(candidates) != 1:
        return Match(candidates=candidates, how=how)
    found = candidates[0]
    diffs = compare(found, geometry, top_level_keys)
    if diffs:
        return Match(closest=found, differences=diffs, candidates=candidates, how=how)
    return Match(entry=found, candidates=candidates, how=how)
