"""Registers and stack frame of every kernel in csrc/cuda, as ptxas reports them (needs nvcc and a CUDA torch).

    python benchmarks/ptxas_report.py [--arch 90] [--filter kv_copy] [FILE.cu ...]

Compiles each file (default: all of csrc/cuda) for one arch with ``-Xptxas=-v`` and prints one line per kernel
instantiation: registers, stack bytes, spill stores/loads, and the occupancy limit registers impose at the
kernel's block size (65,536 registers and 2,048 threads per SM; allocation granularity ignored). CI prints it for the record; nothing is
asserted. A kernel's launch size is read from its ``__launch_bounds__`` when present, else 256 is assumed.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def include_flags() -> list[str]:
    from torch.utils import cpp_extension
    try:
        paths = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch
        paths = cpp_extension.include_paths(True)
    paths += sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(cpp_extension.__file__)), "..", "nvidia",
                                           "*", "include")))
    paths.append(sysconfig.get_paths()["include"])
    return ["-I" + os.path.join(ROOT, "csrc")] + ["-I" + p for p in paths]


def demangled_name(mangled: str) -> str:
    out = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
    out = re.sub(r"\(anonymous namespace\)::|lrag::|c10::", "", out)
    return re.sub(r"\(.*\)$", "", out)  # drop the parameter list


def ptxas_lines(cu: str, arch: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["nvcc", "-c", cu, "-o", os.path.join(tmp, "k.o"), "-std=c++20", "-O3", "--expt-relaxed-constexpr",
               "-DLRAG_WITH_CUDA", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas=-v", *include_flags()]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"nvcc failed on {cu}:\n{proc.stderr[-3000:]}")
    kernels, current = [], None
    for line in proc.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            current = {"kernel": demangled_name(m.group(1)), "stack": 0, "spill_st": 0, "spill_ld": 0}
            kernels.append(current)
        elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                         line)):
            current.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            current["regs"] = int(m.group(1))
    return kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="csrc/cuda/*.cu by default")
    ap.add_argument("--arch", default="90", help="compute capability without the dot (default 90)")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    ap.add_argument("--threads", type=int, default=256, help="block size for the occupancy column (default 256)")
    args = ap.parse_args()
    files = args.files or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    print(f"{'kernel':<88} {'regs':>4} {'stack':>5} {'spill':>9} {'blocks/SM':>9}")
    for cu in files:
        for k in ptxas_lines(cu, args.arch):
            if args.filter not in k["kernel"] or "regs" not in k:
                continue
            blocks = min(65536 // (k["regs"] * args.threads), 2048 // args.threads)
            print(f"{k['kernel'][:88]:<88} {k['regs']:>4} {k['stack']:>5} {k['spill_st']:>4}/{k['spill_ld']:<4} "
                  f"{blocks:>9}")


if __name__ == "__main__":
    main()
