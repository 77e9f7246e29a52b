"""The CUDA kernels, executed on the CPU: lrag_ext's ops routed to the emulated-CUDA build ``lrag_ext._C_emu``.

``_C_emu`` is every ``csrc/cuda/*.cu`` file (host code and kernels, unchanged) compiled by the host compiler
against ``csrc/emu/cuda_emu.h``: each CUDA thread is a fiber, ``__syncthreads`` and warp shuffles wait for every
thread they need, blocks run in a seeded random order, dynamic shared memory starts as garbage, and launch limits are
those of the driver. Its ops are ``torch.ops.lrag_ext_emu.*`` on CPU tensors. Inside :func:`enabled`, every call
of a ``torch.ops.lrag_ext.*`` op (so every :mod:`lrag_ext.ops` function and everything built on them, such as
:class:`lrag_ext.RetrievalMemory`) runs the emulated CUDA code instead of the CPU kernel::

    from lrag_ext import emulated_cuda
    with emulated_cuda.enabled(seed=3):
        scores, ids = lrag_ext.cosine_topk(q, pages, table, lo, hi, k)   # CPU tensors, CUDA code paths

The emulator raises ``RuntimeError("CUDA emulator: ...")`` for what a GPU would do silently or fatally: a
barrier not reached by every thread, a shuffle with missing lanes, a deadlock, a launch over the device limits.
What it cannot show (device math ulps, races between blocks, speed) needs a real GPU (benchmarks/gpu_check.sh).
Details: docs/cuda_emulator.md.
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

def module():
    """The compiled emulator module ``lrag_ext._C_emu``.

    Raises:
        ImportError: the extension was built without it (``LRAG_EXT_EMU=0``).
    """
    return importlib.import_module("lrag_ext._C_emu")


def available() -> bool:
    """Whether the emulated-CUDA build was compiled into this installation."""
    try:
        module()
    except ImportError:
        return False
    return True


class _RouteToEmulator(TorchDispatchMode):
    """Sends every ``lrag_ext::*`` op to the same-schema ``lrag_ext_emu::*`` op; all other ops pass through."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lrag_ext":
            func = getattr(getattr(torch.ops.lrag_ext_emu, func._opname), func._overloadname)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def enabled(seed: int = 0, drop_barrier: str = "") -> Iterator[None]:
    """Runs ``lrag_ext`` ops through the emulated CUDA code inside the ``with`` block (this thread only: the
    routing, the seed and the fault injection all belong to the calling thread).

    Args:
        seed: seeds each launch's block order, thread interleaving and shared-memory garbage (launches also mix
            in a launch counter, so two identical launches see different schedules).
        drop_barrier: ``"path/file.cu:LINE"`` of a ``__syncthreads`` that the emulator skips: fault injection,
            to show that the harness notices a missing barrier. Empty for none.

    Raises:
        ImportError: the emulator was not built.
    """
    emu = module()
    previous = (emu.seed(), emu.drop_barrier())
    emu.configure(int(seed), str(drop_barrier))
    try:
        with _RouteToEmulator():
            yield
    finally:
        emu.configure(*previous)


def stats() -> dict:
    """Emulator counters since the module loaded: launches, blocks, threads, barriers, shuffles."""
    return dict(module().stats())
