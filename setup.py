"""Build of the compiled module ``lrag_ext._C``.

C++ sources (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) are always built. CUDA sources (``csrc/cuda/*.cu``) are built
when the installed torch is a CUDA build *and* a CUDA toolkit (``nvcc``) is found: the decision never looks at a
visible GPU, so GPU-less machines still produce GPU binaries.

Environment:
  LRAG_EXT_CUDA=auto|0|1    auto (default): build CUDA when possible; 0: never; 1: always (fail if impossible)
  TORCH_CUDA_ARCH_LIST      target archs; defaults to "8.0;9.0" when no GPU is visible
  CUDA_HOME                 the toolkit root (the directory holding bin/nvcc)
  LRAG_EXT_DEBUG=1          -O0 -g host code, -lineinfo device code
  LRAG_EXT_EMU=1|0|only     build lrag_ext._C_emu, the CUDA sources compiled for the CPU emulator (default 1);
                            only: _C_emu alone (a sanitizer build beside an already built _C)
  LRAG_EMU_SANITIZE=LIST    instrument _C_emu with -fsanitize=LIST (e.g. address,undefined or thread); the
                            sanitizer runtime must then be preloaded (LD_PRELOAD), see docs/cuda_emulator.md
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _find_cuda_home() -> str | None:
    """Toolkit root: $CUDA_HOME, else what nvcc itself reports (it may be a wrapper script on PATH)."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and os.path.exists(os.path.join(env, "bin", "nvcc")):
        return env
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "-x", "cu", "-E", "-v", "-"], input="", capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if "TOP=" in line:
            return os.path.realpath(line.split("TOP=", 1)[1].strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _nvidia_wheel_includes() -> list[str]:
    """Header folders of the NVIDIA wheels a CUDA torch depends on (cuBLAS, cuSPARSE... headers live there)."""
    dirs = []
    for sp in sys.path:
        root = os.path.join(sp, "nvidia")
        if os.path.isdir(root):
            dirs += sorted(d for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d))
    return dirs


def _want_cuda() -> tuple[bool, str | None]:
    mode = os.environ.get("LRAG_EXT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"LRAG_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, None
    cuda_home = _find_cuda_home()
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if cuda_home is None:
        problems.append("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    if problems:
        if mode == "1":
            raise SystemExit("LRAG_EXT_CUDA=1 but CUDA cannot be built: " + "; ".join(problems))
        return False, None
    return True, cuda_home


def _extension():
    with_cuda, cuda_home = _want_cuda()
    debug = os.environ.get("LRAG_EXT_DEBUG") == "1"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp"]  # the C++ standard is left to torch (C++17 or C++20, whatever its headers need)
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": cxx}
    archs = ""
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # torch guessed it at import time, possibly from a wrapper script
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        include_dirs += _nvidia_wheel_includes()
        cxx.append("-DLRAG_WITH_CUDA")
        extra["nvcc"] = ["-O3", "-DLRAG_WITH_CUDA", "--expt-relaxed-constexpr"] + (
            ["-lineinfo"] if debug else [])
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    for flags in extra.values():  # build facts reported by lrag_ext.build_info()
        flags += ["-DLRAG_TORCH_VERSION=\"%s\"" % torch.__version__, "-DLRAG_CUDA_ARCHS=\"%s\"" % archs, "-DLRAG_CUDA_VERSION=\"%s\"" % (torch.version.cuda or "")]
    ext = ext_cls("lrag_ext._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
                  extra_link_args=["-fopenmp"])
    return ext, {"torch_version": torch.__version__, "torch_cuda": torch.version.cuda, "with_cuda": with_cuda,
                 "cuda_archs": archs}


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension + a ``_build_meta.json`` beside the module, readable without loading it.

    ``lrag_ext/__init__.py`` reads it to explain an ABI mismatch (module built for another torch) instead of
    surfacing an undefined-symbol error.
    """

    def run(self):
        super().run()
        if _EMU_MODE == "only":
            return  # _C and its metadata are left as they are
        path = os.path.join(os.path.dirname(self.get_ext_fullpath(EXTENSION.name)), "_build_meta.json")
        with open(path, "w") as f:
            json.dump(BUILD_META, f, indent=1)


def _emulated_cuda_extension():
    """``lrag_ext._C_emu``: every ``csrc/cuda/*.cu`` compiled by the host compiler against csrc/emu/cuda_emu.h.

    The .cu files are not rewritten: a generated one-line ``.cpp`` per file includes it (setuptools compiles only
    C++ sources with the host compiler), so a new .cu file is emulated without touching this list.
    """
    if _EMU_MODE == "0":
        return None
    gen = os.path.join(ROOT, "build", "emu_src")
    os.makedirs(gen, exist_ok=True)
    sources = [os.path.join("csrc", "emu", "scheduler.cpp"), os.path.join("csrc", "emu", "module.cpp")]
    for cu in sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))):
        wrapper = os.path.join(gen, os.path.splitext(os.path.basename(cu))[0] + "_emu.cpp")
        text = f'// generated by setup.py: {cu} for the CPU emulator\n#include "cuda/{os.path.basename(cu)}"\n'
        if not os.path.exists(wrapper) or open(wrapper).read() != text:  # keep ninja's timestamps when unchanged
            with open(wrapper, "w") as f:
                f.write(text)
        sources.append(os.path.relpath(wrapper, ROOT))
    cxx = ["-O2", "-g", "-DLRAG_CUDA_EMU", "-Wno-unknown-pragmas"]
    link = []
    sanitize = os.environ.get("LRAG_EMU_SANITIZE", "").strip()
    if sanitize:
        flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"]
        if "undefined" in sanitize:
            flags.append("-fno-sanitize-recover=undefined")
        cxx = ["-O1", "-g", "-DLRAG_CUDA_EMU", "-Wno-unknown-pragmas"] + flags
        link = flags
    return cpp_extension.CppExtension("lrag_ext._C_emu", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                                      extra_compile_args={"cxx": cxx}, extra_link_args=link)


_EMU_MODE = os.environ.get("LRAG_EXT_EMU", "1").strip().lower()
if _EMU_MODE not in ("0", "1", "only"):
    raise SystemExit(f"LRAG_EXT_EMU must be 0, 1 or only, got {_EMU_MODE!r}")
EXTENSION, BUILD_META = _extension()
EMU_EXTENSION = _emulated_cuda_extension()
BUILD_META["emulated_cuda"] = EMU_EXTENSION is not None
EXT_MODULES = ([] if _EMU_MODE == "only" else [EXTENSION]) + ([EMU_EXTENSION] if EMU_EXTENSION is not None else [])

setup(
    packages=find_packages(include=["lrag_ext", "lrag_ext.*"]) + find_packages("python", include=["lrag", "lrag.*"]),
    package_dir={"lrag": "python/lrag"},
    # the trained toy generator of `lrag generate --demo` (lrag.toy.shipped) and the toy retrieval embedder
    # (docs/toy_embedder.md), each with its card: installed with the package
    package_data={"lrag.toy.weights": ["toy_generator.safetensors", "toy_generator.json", "toy_embedder.pt",
                                       "toy_embedder.json"],
                  "lrag": ["data/checkpoints.json"]},          # the checkpoint registry (lrag.registry)
    ext_modules=EXT_MODULES,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
