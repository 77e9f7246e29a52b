"""The CUDA emulator (csrc/emu) catches what it exists to catch.

1. Kernels with deliberate defects (tests/emu/selftest_kernels.cpp, written like csrc/cuda's kernels) are reported
   as the defect they have: a barrier not reached by every thread, barriers or shuffles at different places, a
   shuffle with a missing lane, launches beyond the device limits; a removed barrier gives wrong results.
2. Under AddressSanitizer a one-past-the-end shared-memory write is reported; under ThreadSanitizer a removed
   barrier is reported as a data race between the kernel's own lines, and correct kernels are clean.
3. Removing any synchronising __syncthreads from our real kernels (fault injection: the emulator skips it)
   changes their results against the reference, for every seed tried.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import lrag_ext
from lrag_ext import emulated_cuda, reference

from conftest import EMULATED_CUDA, REPO

EMU_SOURCES = [os.path.join(REPO, "tests", "emu", "selftest_kernels.cpp"), os.path.join(REPO, "csrc", "emu", "scheduler.cpp")]
CXX = shutil.which(os.environ.get("CXX", "g++"))
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler to build the emulator self-tests")
needs_emu = pytest.mark.skipif(not EMULATED_CUDA, reason="built with LRAG_EXT_EMU=0")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for the compiler and the self-test programs: without a sanitizer runtime that a CI stage
    preloads into this process (an ASan runtime cannot load into a TSan program, and the compiler needs neither)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "TSAN_OPTIONS")}
    env.update(extra)
    return env


def build(tmp_root: str, kind: str, flags: list[str], extra: list[str], shared: bool) -> str:
    """Compiles the self-test kernels + the emulator engine (cached by content hash); returns the output path."""
    digest = hashlib.sha256()
    for path in EMU_SOURCES + extra + [os.path.join(REPO, "csrc", "emu", "cuda_emu.h"),
                                       os.path.join(REPO, "csrc", "emu", "scheduler.h")]:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(flags).encode())
    out = os.path.join(tmp_root, f"selftest_{kind}_{digest.hexdigest()[:12]}" + (".so" if shared else ""))
    if not os.path.exists(out):
        cmd = [CXX, "-std=c++17", "-O1", "-g", "-I", os.path.join(REPO, "csrc"), *flags, *EMU_SOURCES, *extra,
               "-o", out + ".tmp"] + (["-shared", "-fPIC"] if shared else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env())
        if proc.returncode != 0:
            if flags and "sanitize" in " ".join(flags):
                pytest.skip(f"this compiler cannot build with {flags}: {proc.stderr[-300:]}")
            raise AssertionError(f"building the emulator self-tests failed:\n{proc.stderr}")
        os.replace(out + ".tmp", out)
    return out


@pytest.fixture(scope="module")
def build_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("emu_selftest"))


@pytest.fixture(scope="module")
def selftest(build_root):
    lib = ctypes.CDLL(build(build_root, "plain", [], [], shared=True))
    fn = lib.lrag_emu_selftest
    fn.argtypes = [ctypes.c_char_p, ctypes.c_ulonglong, ctypes.c_char_p, ctypes.c_size_t]

    def run(case: str, seed: int = 0) -> str:
        buf = ctypes.create_string_buffer(4096)
        fn(case.encode(), seed, buf, len(buf))
        return buf.value.decode()

    return run


SITE = r"selftest_kernels\.cpp:\d+"
CASES = {
    "block_sum": "",
    "warp_sum": "",
    "smem_over_default_limit_raised": "",
    "half_warp_sums": "",
    "fault_then_ok": "",
    "block_sum_without_barrier": r"^wrong result",
    "warp_sum_missing_lane": rf"warp shuffle at .*{SITE} with a missing lane: thread \(\d+,0,0\) waits, "
                             r"thread \(3,0,0\) exited",
    "barrier_in_branch": rf"__syncthreads at .*{SITE} is not reached by every thread: thread \(\d+,0,0\) exited",
    "early_exit_then_barrier": r"is not reached by every thread: thread \(0,0,0\) exited",
    "two_barriers": rf"divergent __syncthreads: thread .* waits at .*{SITE}, thread .* at .*{SITE}",
    "shuffle_in_two_places": rf"divergent warp shuffle: lanes of warp \d wait at .*{SITE} and at .*{SITE}",
    "block_too_large": r"invalid configuration argument: block \(1025,1,1\) exceeds 1024 threads",
    "grid_y_too_large": r"invalid configuration argument: grid \(1,65536,1\)",
    "empty_grid": r"invalid configuration argument: empty grid \(0,1,1\)",
    "smem_over_default_limit": r"too much dynamic shared memory: 49156 bytes > 49152",
}


@needs_cxx
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_selftest_kernels_are_reported_as_their_defect(selftest, case, seed):
    outcome = selftest(case, seed)
    if CASES[case] == "":
        assert outcome == "", outcome
    else:
        assert re.search(CASES[case], outcome), outcome
        if not outcome.startswith("wrong result"):
            assert outcome.startswith("CUDA emulator: ") and "(kernel " in outcome and "launched at " in outcome


def run_program(path: str, case: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([path, case], capture_output=True, text=True, env=clean_env(**env_extra), timeout=300)


@needs_cxx
def test_address_sanitizer_reports_a_shared_memory_overrun(build_root):
    exe = build(build_root, "asan", ["-fsanitize=address", "-fno-omit-frame-pointer"],
                [os.path.join(REPO, "tests", "emu", "selftest_main.cpp")], shared=False)
    clean = run_program(exe, "block_sum", {"ASAN_OPTIONS": "detect_leaks=0"})
    assert clean.returncode == 0, clean.stdout + clean.stderr
    bad = run_program(exe, "smem_one_past_end", {"ASAN_OPTIONS": "detect_leaks=0"})
    assert bad.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in bad.stderr
    assert re.search(r"in smem_one_past_end .*selftest_kernels\.cpp:\d+", bad.stderr), bad.stderr[-2000:]
    assert "0 bytes to the right of 256-byte region" in bad.stderr  # exactly one element past 64 floats


@needs_cxx
def test_thread_sanitizer_reports_a_removed_barrier_as_a_race(build_root):
    exe = build(build_root, "tsan", ["-fsanitize=thread"], [os.path.join(REPO, "tests", "emu", "selftest_main.cpp")],
                shared=False)
    env = {"TSAN_OPTIONS": "halt_on_error=1"}
    for case in ("block_sum", "warp_sum", "smem_over_default_limit_raised"):
        clean = run_program(exe, case, env)
        if "FATAL: ThreadSanitizer" in clean.stderr:  # e.g. an unsupported memory layout of this kernel
            pytest.skip("ThreadSanitizer cannot run here: " + clean.stderr.strip().splitlines()[0])
        assert clean.returncode == 0 and "ThreadSanitizer" not in clean.stderr, clean.stderr[-2000:]
    racy = run_program(exe, "block_sum_without_barrier", env)
    assert "WARNING: ThreadSanitizer: data race" in racy.stderr, racy.stderr[-2000:]
    # both sides of the race are lines of the kernel: the store to shared memory and the first read of it
    frames = re.findall(r"#0 block_sum<false> .*selftest_kernels\.cpp:(\d+)", racy.stderr)
    assert len(set(frames)) == 2, racy.stderr[-3000:]


# ---------------------------------------------------------------- removed barriers in the real kernels

def barrier_sites() -> list[str]:
    """Every __syncthreads of csrc/cuda, as "cuda/FILE:LINE" (the form the emulator's fault injection takes)."""
    sites = []
    cuda_dir = os.path.join(REPO, "csrc", "cuda")
    for name in sorted(os.listdir(cuda_dir)):
        with open(os.path.join(cuda_dir, name)) as f:
            for i, line in enumerate(f, 1):
                if "__syncthreads()" in line and not line.strip().startswith("//"):
                    sites.append(f"cuda/{name}:{i}")
    return sites


def is_defensive(site: str) -> bool:
    """Barriers whose removal cannot change a result with today's callers: block_sum's first barrier protects
    scratch from a previous call's readers, and every kernel calls block_sum once."""
    file, line = site.rsplit(":", 1)
    with open(os.path.join(REPO, "csrc", file)) as f:
        text = f.read().splitlines()[int(line) - 1]
    return "may still be read by a previous call" in text


def workloads():
    """(name, run) pairs: every op whose CUDA kernels have barriers, at sizes that make each barrier matter."""
    g = torch.Generator().manual_seed(11)
    B, D, page_size, max_pages = 2, 40, 16, 40
    pages = torch.randn(max_pages * B, page_size, D, generator=g)
    table = torch.randperm(max_pages * B, generator=g).int().reshape(B, max_pages)
    q = torch.randn(B, D, generator=g)
    lo, hi = torch.tensor([0, 7]), torch.tensor([max_pages * page_size, 500])
    feat = torch.randn(3, 64, 5, 6, generator=g)
    gn_w, gn_b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    fc_w, fc_b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    frames = torch.randn(3, 4, 12, 12, generator=g)
    pw, pb = torch.randn(96, 4 * 4 * 4, generator=g), torch.randn(96, generator=g)
    # k about half a chunk (128 ids): the chunk's sort decides which half goes on to the merge, so a misplaced key
    # shows (with a small k it would only show if it belonged to the top-k, with k = the chunk never)
    half_table = table[:, :8].contiguous()
    half_lo, half_hi = torch.tensor([0, 3]), torch.tensor([128, 120])
    return [
        ("cosine_topk", lambda: lrag_ext.cosine_topk(q, pages, table, lo, hi, 9),
         lambda: reference.cosine_topk(q, pages, table, lo, hi, 9)),
        ("cosine_topk (k = 60)", lambda: lrag_ext.cosine_topk(q, pages, half_table, half_lo, half_hi, 60),
         lambda: reference.cosine_topk(q, pages, half_table, half_lo, half_hi, 60)),
        ("embed_head", lambda: lrag_ext.embed_head(feat, gn_w, gn_b, fc_w, fc_b, 8, 1e-5),
         lambda: reference.embed_head(feat, gn_w, gn_b, fc_w, fc_b, 8, 1e-5)),
        ("pooled_embed", lambda: lrag_ext.pooled_embed(frames, pw, pb, 4), lambda: reference.pooled_embed(frames, pw, pb, 4)),
    ]


def same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(same(x, y) for x, y in zip(a, b))
    if a.dtype == torch.int64:
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@needs_emu
def test_every_barrier_site_is_found():
    sites = barrier_sites()
    assert len(sites) >= 8 and all(re.fullmatch(r"cuda/\w+\.cuh?:\d+", s) for s in sites), sites


# A removed barrier shows in a result only when the schedule and the data make a thread read what another has
# not written yet, and downstream steps can hide it (a chunk's sort that is slightly off still passes the right
# keys to the merge, which sorts again). So each site gets the same budget of schedules, and must be caught by at
# least one of them; ThreadSanitizer (the emulator's TSan build, test_removed_barrier_is_a_race_under_tsan)
# reports every one of them deterministically.
SCHEDULES = range(8)


# Removing it leaves the first pass of the chunk's sort reading keys not yet written; the rest of the sort and
# the merge repair the order often enough that results rarely change (ThreadSanitizer reports the race).
def is_hidden_downstream(site: str) -> bool:
    file, line = site.rsplit(":", 1)
    with open(os.path.join(REPO, "csrc", file)) as f:
        lines = f.read().splitlines()
    return file.endswith("cosine_topk.cu") and "bitonic_sort_desc(keys, chunk)" in lines[int(line)]


@needs_emu
@pytest.mark.parametrize("site", [s for s in barrier_sites() if not is_defensive(s) and not is_hidden_downstream(s)])
def test_removing_a_barrier_from_a_real_kernel_changes_its_results(site):
    cases = workloads()
    caught = []
    for seed in SCHEDULES:
        with emulated_cuda.enabled(seed=seed):
            for name, run, ref in cases:  # the intact kernels agree with the reference under this schedule
                assert same(run(), ref()), name
        with emulated_cuda.enabled(seed=seed, drop_barrier=site):
            caught += [(seed, name) for name, run, ref in cases if not same(run(), ref())]
    assert caught, f"no op changed with the barrier at {site} removed, in {len(SCHEDULES)} schedules"


@needs_emu
def test_emulated_launches_are_counted_and_use_the_device_geometry():
    before = emulated_cuda.stats()
    q, pages = torch.randn(1, 8), torch.randn(4, 4, 8)
    with emulated_cuda.enabled():
        lrag_ext.cosine_topk(q, pages, torch.arange(4, dtype=torch.int32)[None], torch.tensor([0]),
                             torch.tensor([16]), 3)
    after = emulated_cuda.stats()
    assert after["launches"] == before["launches"] + 2  # score_chunks + merge_partials
    assert after["barriers"] > before["barriers"] and after["shuffles"] > before["shuffles"]
    assert emulated_cuda.module().sm_count() == int(os.environ.get("LRAG_EMU_SMS", "132"))


@needs_emu
def test_emulator_is_off_outside_the_context():
    q, pages = torch.randn(1, 8), torch.randn(4, 4, 8)
    args = (q, pages, torch.arange(4, dtype=torch.int32)[None], torch.tensor([0]), torch.tensor([16]), 3)
    before = emulated_cuda.stats()["launches"]
    lrag_ext.cosine_topk(*args)
    assert emulated_cuda.stats()["launches"] == before
    # the CPU kernel validates values; the CUDA host code clamps instead (no host synchronisation)
    bad = args[:3] + (torch.tensor([-3]),) + args[4:]
    with pytest.raises(RuntimeError, match="lo"):
        lrag_ext.cosine_topk(*bad)
    with emulated_cuda.enabled():
        scores, ids = lrag_ext.cosine_topk(*bad)
    assert torch.equal(ids, lrag_ext.cosine_topk(*args)[1])


TSAN_BUILD = os.environ.get("LRAG_EMU_SANITIZER") == "thread"


@needs_emu
@pytest.mark.skipif(not TSAN_BUILD, reason="needs the ThreadSanitizer build of the emulator (LRAG_EMU_SANITIZER=thread, "
                                           "see .ci/run's TSan stage)")
@pytest.mark.parametrize("site", [s for s in barrier_sites() if not is_defensive(s)])
def test_removed_barrier_is_a_race_under_tsan(site):
    """In the TSan build, every removed barrier of a real kernel is reported as a data race in that kernel's file,
    deterministically: fibers synchronise only through barriers. (The intact kernels run clean: the TSan stage runs
    op tests on the emulator with halt_on_error=1.)"""
    script = (
        "import sys; sys.path.insert(0, 'tests'); import torch; from lrag_ext import emulated_cuda; "
        "from test_cuda_emulator import workloads; site = sys.argv[1]\n"
        "with emulated_cuda.enabled(seed=0, drop_barrier=site):\n"
        "    for name, run, ref in workloads(): run()\n")
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 report_signal_unsafe=0")
    proc = subprocess.run([sys.executable, "-c", script, site], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=600)
    assert "WARNING: ThreadSanitizer: data race" in proc.stderr, proc.stderr[-3000:]
    file = site.split(":")[0].split("/")[-1]
    assert re.search(rf"#0 .* .*{re.escape(file)}:\d+", proc.stderr), proc.stderr[-3000:]
