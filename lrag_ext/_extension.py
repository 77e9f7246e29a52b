"""Loads the compiled module ``lrag_ext._C`` and explains, rather than crashes on, a build/runtime mismatch."""
from __future__ import annotations

import json
import os

import torch

_REBUILD = "Rebuild it against the installed torch: pip install --no-build-isolation -e .  (or: make build)"


def _build_meta() -> dict | None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_meta.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_compiled_module():
    """Imports and returns ``lrag_ext._C``.

    Raises:
        ImportError: the module is missing, or was compiled against another torch than the one installed (the
            message names both versions and the rebuild command).
    """
    meta = _build_meta()
    if meta is not None and meta.get("torch_version") != torch.__version__:
        raise ImportError(
            f"lrag_ext._C was built for torch {meta.get('torch_version')} but torch {torch.__version__} is "
            f"installed. {_REBUILD}")
    try:
        from lrag_ext import _C  # noqa: PLC0415 - the import is the point of this function
    except ImportError as err:
        built_for = f" (it was built for torch {meta['torch_version']})" if meta else ""
        raise ImportError(
            f"cannot load lrag_ext._C{built_for} with torch {torch.__version__}: {err}. {_REBUILD}") from err
    built = _C.build_info()["torch_version"]
    if built != torch.__version__:
        raise ImportError(f"lrag_ext._C was built for torch {built} but torch {torch.__version__} is installed. "
                          f"{_REBUILD}")
    return _C
