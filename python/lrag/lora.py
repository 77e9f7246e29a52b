"""LoRA adapters in the format LongLive releases (``lora.pt``), applied to :class:`~lrag.models.wan.CausalWanModel`.

**File format** (NVlabs/LongLive v1.0: ``trainer/distillation.py::save`` writes it, ``inference.py`` reads it with
``peft.set_peft_model_state_dict``): a ``torch.save`` dict ``{"generator_lora": sd, "critic_lora": sd, "step": n}``,
or the generator's ``sd`` alone. ``sd`` is ``peft.get_peft_model_state_dict`` of the peft-wrapped backbone: for
every adapted ``nn.Linear`` named ``<module>`` it holds

- ``base_model.model.<module>.lora_A.weight`` ``[r, in_features]`` and
- ``base_model.model.<module>.lora_B.weight`` ``[out_features, r]``.

LongLive adapts every ``nn.Linear`` inside the attention blocks (self- and cross-attention q, k, v, o and
``ffn.0`` / ``ffn.2``: ten per block); an adapter may cover fewer layers. The ``critic_lora`` entry (the training
critic's adapter) is ignored.

**The arithmetic** (peft's ``LoraLayer.forward`` with dropout 0): an adapted layer computes

    y = W x + b + s · B (A x),      s = lora_scale · alpha / r.

The file does not record ``alpha``: it comes from the run's config (LongLive's released
``configs/longlive_inference.yaml``: rank 256, alpha 256, so ``s = 1``; ``alpha`` defaults to ``r`` here, as in
LongLive's ``configure_lora_for_model``). ``lora_scale`` is ours (1 = the released behaviour).

**Two ways to apply it:**

- :func:`merge_lora` (the default of :func:`apply_lora` and of ``lrag generate --lora``): ``W ← W + s · B A``,
  computed in float32 (float64 for a float64 model) and cast to the weight's dtype; ``lrag generate`` merges into
  the checkpoint's weights before casting them to ``--dtype``. No cost per forward. In float32 the result differs from
  peft's unmerged forward by rounding only (``W x + s B(A x)`` and ``(W + s B A) x`` are summed in another order).
- :func:`attach_lora`: forward hooks that add ``s · B (A x)`` to the layer's output, the operations of peft's
  forward in its order, so a float32 run is bit-identical to LongLive's. Costs two small matmuls per adapted layer;
  the scale can change between forwards (:attr:`AttachedLora.scale`), and :meth:`AttachedLora.remove` restores
  the base model.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lrag.checkpoint import strip_wrappers
from lrag_ext.state_dicts import checkpoint_source, naming_file

GENERATOR_ENTRY = "generator_lora"
_PEFT_PREFIX = "base_model.model."
# peft's adapter weights: "<module>.lora_A.weight" as get_peft_model_state_dict saves them, or
# "<module>.lora_A.<adapter name>.weight" as the raw PeftModel.state_dict() holds them
_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# LongLive adapts the Linear layers inside the attention blocks only (configure_lora_for_model)
ADAPTED_PREFIX = "blocks."


@dataclass(frozen=True)
class LoraAdapter:
    """A parsed adapter: ``layers[module] = (A [r, in], B [out, r])`` with ``module`` a name in the backbone
    (``blocks.0.self_attn.q``); one rank ``r`` for all layers."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int

    def alpha(self, alpha: float | None = None) -> float:
        """The alpha in use: ``alpha``, or the rank when ``None`` (LongLive's ``configure_lora_for_model``)."""
        return float(self.rank if alpha is None else alpha)

    def scaling(self, alpha: float | None = None, scale: float = 1.0) -> float:
        """``s = scale · alpha / r`` (``alpha`` defaults to ``r``)."""
        return float(scale) * self.alpha(alpha) / self.rank

    @property
    def num_params(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.layers.values())


def select_lora_state_dict(ckpt) -> dict:
    """The generator adapter's state dict of a loaded ``lora.pt``: ``ckpt["generator_lora"]`` when present (the
    training checkpoint form), else ``ckpt`` itself.

    Raises:
        TypeError: ``ckpt`` or its ``generator_lora`` entry is not a dict.
    """
    if not isinstance(ckpt, dict):
        raise TypeError(f"a LoRA checkpoint must hold a dict, got {type(ckpt).__name__}")
    if GENERATOR_ENTRY in ckpt:
        sd = ckpt[GENERATOR_ENTRY]
        if not isinstance(sd, dict):
            raise TypeError(f"checkpoint[{GENERATOR_ENTRY!r}] must be a state dict, got {type(sd).__name__}")
        return sd
    return ckpt


def _module_name(key: str) -> tuple[str, str, str | None] | None:
    """``(module, "A" | "B", adapter name or None)`` of a peft adapter key, or ``None`` when ``key`` is not a
    ``lora_A`` / ``lora_B`` weight. Wrapper prefixes are removed (:func:`lrag.checkpoint.strip_wrappers`, peft's
    ``base_model.model.``, then again for an adapter made on ``WanDiffusionWrapper`` rather than its ``.model``)."""
    match = _ADAPTER_KEY.match(key)
    if match is None:
        return None
    module = strip_wrappers(match["module"])
    if module.startswith(_PEFT_PREFIX):
        module = strip_wrappers(module[len(_PEFT_PREFIX):])
    return module, match["which"], match["adapter"]


def _not_an_adapter(unknown: list[str]) -> str:
    """Why a state dict with keys that are not adapter weights was refused, as specifically as the keys tell."""
    names = sorted(unknown)
    if {"generator", "generator_ema"} & set(names):
        return ("this is a generator checkpoint (entries " + ", ".join(n for n in names if n.startswith("generator"))
                + "), not a LoRA adapter: give it to --checkpoint")
    if any(".base_layer." in n for n in names):
        return (f"a raw peft model state dict ({len(names)} base-model keys such as {names[0]!r}): save the adapter "
                "alone with peft.get_peft_model_state_dict, as LongLive's trainer does")
    if any("patch_embedding" in n or n.endswith("head.head.weight") for n in names):
        return f"a model's weights ({len(names)} keys such as {names[0]!r}), not a LoRA adapter"
    return (f"not a LoRA adapter of lora_A / lora_B weights: {len(names)} other keys {names[:6]} (DoRA, LoRA biases "
            "and embedding adapters are not supported)")


def parse_lora(sd: dict) -> LoraAdapter:
    """Parses a peft adapter state dict (see the module docstring).

    Raises:
        ValueError: a key that is not a ``lora_A`` / ``lora_B`` weight (for example DoRA's
            ``lora_magnitude_vector``, a LoRA bias, an embedding adapter, or a full model's weights: all listed),
            a layer with only one of its two matrices, a tensor that is not a 2-D floating-point matrix, ``A`` and
            ``B`` whose ranks disagree, layers of different ranks, or an empty adapter.
        TypeError: a key that is not a string.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown, adapters = [], set()
    for key, value in sd.items():
        if not isinstance(key, str):
            raise TypeError(f"LoRA state dict keys must be strings, got {key!r}")
        parsed = _module_name(key)
        if parsed is None:
            unknown.append(key)
            continue
        module, which, adapter = parsed
        adapters.add(adapter)
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
            what = (f"a {value.dim()}-d {value.dtype} tensor" if isinstance(value, torch.Tensor)
                    else type(value).__name__)
            raise ValueError(f"{key}: a LoRA matrix must be a 2-d floating-point tensor, got {what}")
        if which in parts.setdefault(module, {}):
            raise ValueError(f"{key}: layer {module!r} has two lora_{which} matrices")
        parts[module][which] = value
    if unknown:
        raise ValueError(_not_an_adapter(unknown))
    if len(adapters) > 1:
        raise ValueError(f"the state dict holds several peft adapters {sorted(map(str, adapters))}: keep one")
    if not parts:
        raise ValueError("the LoRA state dict holds no lora_A / lora_B weights")
    layers, ranks = {}, {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"layer {module!r} has lora_{''.join(ab)} but not lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise ValueError(f"layer {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not share a "
                             "rank (A [r, in], B [out, r], r > 0)")
        layers[module] = (a, b)
        ranks.setdefault(int(a.shape[0]), []).append(module)
    if len(ranks) > 1:
        summary = {r: f"{len(m)} layers, e.g. {m[0]}" for r, m in sorted(ranks.items())}
        raise ValueError(f"the adapter's layers have different ranks {summary}: one rank per adapter is supported "
                         "(LongLive's config has a single 'rank')")
    return LoraAdapter(layers, next(iter(ranks)))


def read_lora(path_or_ckpt, lazy: bool = False) -> LoraAdapter:
    """Reads a ``lora.pt`` (``torch.load(weights_only=True)``) or ``.safetensors`` file, or parses an already
    loaded object, as :func:`select_lora_state_dict` then :func:`parse_lora`.

    Args:
        lazy: read tensors lazily (memory-mapped; for checks that need only shapes).

    Raises:
        FileNotFoundError: missing file.
        lrag_ext.state_dicts.InputFileError: (a ``ValueError`` naming the file) unusable or not an adapter.
    """
    ckpt, path = checkpoint_source(path_or_ckpt, lazy=lazy, what="LoRA checkpoint")
    with naming_file(path, "LoRA checkpoint"):
        return parse_lora(select_lora_state_dict(ckpt))


def check_lora(model: nn.Module, adapter: LoraAdapter) -> None:
    """Checks that every adapted layer is an ``nn.Linear`` inside the attention blocks of ``model`` (``blocks.*``,
    where LongLive's ``configure_lora_for_model`` places adapters) with matching features, and that its matrices
    have the adapter's rank.

    Raises:
        ValueError: every layer that does not fit, listed.
    """
    modules = dict(model.named_modules())
    problems = []
    for name, (a, b) in adapter.layers.items():
        layer = modules.get(name)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != adapter.rank or b.shape[1] != adapter.rank:
            problems.append(f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not [{adapter.rank}, in] "
                            f"and [out, {adapter.rank}] (the adapter's rank)")
        elif not name.startswith(ADAPTED_PREFIX):
            problems.append(f"{name}: outside the attention blocks, where LongLive places no adapter (peft would "
                            "ignore it)")
        elif not isinstance(layer, nn.Linear):
            problems.append(f"{name}: " + ("no such layer" if layer is None else
                                           f"a {type(layer).__name__}, not a Linear layer"))
        elif (a.shape[1], b.shape[0]) != (layer.in_features, layer.out_features):
            problems.append(f"{name}: adapter maps {a.shape[1]} -> {b.shape[0]} features, the layer "
                            f"{layer.in_features} -> {layer.out_features}")
    if problems:
        raise ValueError(f"the LoRA adapter does not fit the model ({len(problems)} of {len(adapter.layers)} "
                         "layers):\n  " + "\n  ".join(problems[:10]) +
                         (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""))


def check_lora_scaling(alpha, scale, names: tuple[str, str] = ("LoRA alpha", "LoRA scale")) -> None:
    """``ValueError`` for an ``alpha`` that is not a finite number > 0 (``None``: the rank) or a ``scale`` that is
    not a finite number; the messages call them ``names``."""
    for name, value in zip(names, (alpha, scale)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if alpha is not None and alpha <= 0:
        raise ValueError(f"{names[0]} must be > 0, got {alpha!r}")


@torch.no_grad()
def merge_lora(model: nn.Module, adapter: LoraAdapter, alpha: float | None = None, scale: float = 1.0) -> nn.Module:
    """Adds ``s · B A`` to the weight of every adapted layer of ``model``, in place (float32 arithmetic, float64 for
    a float64 model; the result cast to the weight's dtype). ``model`` is unchanged when anything fails (the new
    weights are all computed before the first is written). Merging the same adapter twice adds it twice.

    Raises:
        ValueError: as :func:`check_lora`, or a non-finite / non-positive ``alpha`` or non-finite ``scale``.
    """
    check_lora_scaling(alpha, scale)
    check_lora(model, adapter)
    s = adapter.scaling(alpha, scale)
    modules = dict(model.named_modules())
    merged = {}
    for name, (a, b) in adapter.layers.items():      # every new weight first: a failure changes nothing
        weight = modules[name].weight
        work = torch.promote_types(weight.dtype, torch.float32)    # float32, or float64 for a float64 model
        delta = b.to(weight.device, work) @ a.to(weight.device, work)
        merged[name] = (weight.to(work) + s * delta).to(weight.dtype)
    for name, weight in merged.items():
        modules[name].weight.copy_(weight)
    return model


class AttachedLora:
    """The forward hooks of :func:`attach_lora`: each adapted layer's output gets ``+ s · B (A x)``.

    Attributes:
        scale: the ``lora_scale`` factor of ``s`` (settable between forwards, a finite number; 0 turns the
            adapter off).
    """

    def __init__(self, model: nn.Module, adapter: LoraAdapter, alpha: float | None, scale: float):
        self.adapter, self.alpha = adapter, alpha
        self.scale = scale
        modules = dict(model.named_modules())
        pairs = {}
        for name, (a, b) in adapter.layers.items():     # every copy first: a failure leaves no hook behind
            w = modules[name].weight
            pairs[name] = (a.to(w.device, w.dtype), b.to(w.device, w.dtype))
        self._handles = [modules[name].register_forward_hook(self._hook(pair)) for name, pair in pairs.items()]

    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        check_lora_scaling(None, value)
        self._scale = float(value)

    @property
    def scaling(self) -> float:
        return self.adapter.scaling(self.alpha, self.scale)

    def _hook(self, pair):
        a, b = pair

        def add_low_rank(module, args, output):
            # peft's order: result = base(x); result = result + lora_B(lora_A(x)) * scaling
            return output + F.linear(F.linear(args[0], a), b) * self.scaling
        return add_low_rank

    def remove(self) -> None:
        """Detaches the adapter: the model computes its base weights again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def attach_lora(model: nn.Module, adapter: LoraAdapter, alpha: float | None = None,
                scale: float = 1.0) -> AttachedLora:
    """Applies ``adapter`` without changing the weights (see the module docstring); ``model`` is checked first.
    The adapter matrices are copied to each layer's device and dtype.

    Raises:
        ValueError: as :func:`merge_lora`.
    """
    check_lora_scaling(alpha, scale)
    check_lora(model, adapter)
    return AttachedLora(model, adapter, alpha, scale)


def apply_lora(model: nn.Module, source: LoraAdapter | str | os.PathLike | dict, alpha: float | None = None,
               scale: float = 1.0, merge: bool = True) -> AttachedLora | None:
    """Merges an adapter into ``model`` (``merge=True``: returns ``None``) or attaches it (returns the
    :class:`AttachedLora`). ``source`` is a :class:`LoraAdapter`, or what :func:`read_lora` reads. ``model`` is
    unchanged when anything fails.

    Raises:
        As :func:`read_lora` and :func:`merge_lora`; a file's content errors name the file.
    """
    check_lora_scaling(alpha, scale)          # an argument error, not the file's
    adapter = source if isinstance(source, LoraAdapter) else read_lora(source)
    path = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    with naming_file(path, "LoRA checkpoint"):
        if merge:
            merge_lora(model, adapter, alpha, scale)
            return None
        return attach_lora(model, adapter, alpha, scale)
