"""Per-block overhead of the generator loop outside the model's matmuls: the before/after measure of issue 12
("One retrieval engine in the library ... no per-block rebuilds, copies or host syncs").

    .venv/bin/python benchmarks/block_overhead.py                 # the default run (~1-3 min on 2 shared cores)
    .venv/bin/python benchmarks/block_overhead.py --quick         # smoke run, a few seconds
    .venv/bin/python benchmarks/block_overhead.py --part memory --histories 480,5000 --json out.json
    PYTHONPATH=/tmp/old:/tmp/old/python .venv/bin/python benchmarks/block_overhead.py   # another code state
      (e.g. from `git archive <commit> lrag_ext python | tar -x -C /tmp/old` plus the built lrag_ext/_C*.so)

CPU only, 1 torch thread by default. Nothing is asserted: it prints markdown tables and, with --json, every number
(per block too, and every counted call site).

Part 1 (the library): a ``lrag_ext.RetrievalMemory`` (storage="kv", device cpu, bf16 K/V, 1024-d embeddings,
K = 6, R = 5, sink 1, window 12, page_size 16) pre-filled to N frames per stream for each of B = 2 streams; then,
per block, what the generator does: one ``retrieve`` for all streams, one ``gather`` into a cache-shaped buffer
``[layers, B, K, T, H, d]`` (``positions="sink"``), and the ``append`` of a 3-frame block for every stream: one
call per stream with ``[:, b]`` views of ``[layers, B, 3, T, H, d]`` K/V, or a single call for all streams when
``RetrievalMemory.append`` takes a list of streams (``--append``; the pipeline of each code state does the same).
Two K/V geometries:
- ``tiny``: 4 layers x 96 tokens x 2 heads x 64 (part 2's model), the pipeline's default tiers (64 device slots,
  unbounded host tier): every frame keeps its K/V and the search covers the whole history;
- ``mid``: 8 layers x 1560 tokens x 4 heads x 64 (12.8 MB a frame in bf16). 5,000 frames would need 64 GB, so
  the tiers are bounded to 32 device + 96 host slots shared by the streams (1.6 GB). Older frames are dropped:
  they keep their embedding and their place in the page tables and K/V code tables (the bookkeeping still walks
  them), but are no longer retrievable, so the search scans only the stored tail. (float8 K/V: only half the
  bytes, not enough.)
The prefill appends the first N - 96 frames of each stream in one call (K/V as an expanded view, of which only
what the tiers keep is written), then 3-frame blocks round-robin over the streams. "history" is N at the first
measured block; each block adds 3 frames per stream (about 60 over a configuration's 20 blocks).

Part 2 (the application): ``lrag.Pipeline`` in RAG mode (K = 6, R = 5, memory position 0, the default spatial-mean
embedder, the default memory tiers) with a seeded random ``CausalWanModel`` of 4 layers, dim 128, 2 heads, ffn 256,
16 x 24 latents (96 tokens a frame), float32, batch 1, generating 12 and 36 blocks (retrieval from block 6 on; the
memory frames reach K = 6 at block 8).

Three passes, so that instrumentation never distorts what another pass measures:
1. census (a ``TorchFunctionMode``, no profiler, no timing): what on a GPU would be a host->device transfer or a
   host synchronisation. Tensors are tagged "host" when built from Python data or by a factory call without
   ``device=`` (or with a CPU generator); the tag follows them through ops; everything else counts as device
   data. Per block:
   - ``lists->tensor``: ``torch.tensor`` / ``torch.as_tensor`` calls on Python data (the profiler's
     ``aten::lift_fresh`` count is shown beside it; it also counts Python scalars written into tensors, t[i] = 5);
   - ``H2D``: host-tagged tensors reaching the device, explicitly (``.to(device)``, ``copy_`` into a device
     tensor, ``torch.tensor(..., device=)``) or implicitly (passed with device tensors to an op, e.g. as an index,
     or to an ``lrag_ext`` op, as the old memory's ``_to_device`` helper does: it is the identity on CPU). The K/V
     payload of host-tier frames is not metadata and is not counted (the K/V pools count as device data);
   - ``D2H reads``: device data read on the host (``item``, ``tolist``, ``bool``/``int``/``float``, ``.cpu()``,
     ``nonzero``, boolean-mask indexing, device data written into a host tensor): a synchronisation on a GPU.
     Caveat: paths that only run for CPU tensors are counted too (``RetrievalMemory.gather`` checks ``dst_frame``
     values only when it is on the CPU: 2 reads a block); ``--json`` lists every call site.
   Part 1 runs this pass first, with the mode on from the memory's construction, so that every tensor the memory
   keeps carries its tag.
2. timing: ``time.perf_counter`` around each call (part 1; median over 10 blocks after 2 warm-up blocks) or the
   pipeline's own block timings (part 2; after one warm-up generation). In part 2 ``F.linear`` (every
   ``nn.Linear``) and ``F.scaled_dot_product_attention`` are wrapped with a wall-clock timer (~0.3 us a call, a
   few hundred calls a block): "outside matmuls (timed)" = 1 - their time / the block time.
3. ``torch.profiler`` (CPU, ``profile_memory=True``, ``record_shapes=True``), blocks delimited by
   ``record_function`` ranges. Every allocation is attributed to the ops enclosing it: "allocated" = the sum of
   allocations (frees not subtracted); "self" = allocated by the op itself; per-op MiB in the tables = allocated
   inside the op, children included (``aten::_to_copy`` and ``aten::clone`` count the ``empty_strided`` they
   call, ``aten::stack`` the ``cat`` inside it), each allocation counted once per op name; "any of the four" =
   allocated inside any of cat/_to_copy/clone/stack, each allocation once. "copied" = ``aten::copy_``
   (destination bytes: slice assignments, ``.to``/``.clone``/``.contiguous`` copies) + ``aten::cat`` (output;
   includes ``stack``) + ``aten::index_put_`` (values) + ``aten::index`` (output). "ops" = profiled op events.
   "outside matmuls (profiled)" = 1 - (outermost ``aten::linear/addmm/mm/bmm/matmul/
   scaled_dot_product_attention`` time) / (profiled block time), a cross-check: it is higher than the timed
   share, since the profiler's per-op cost falls mostly on the many small ops.
"Outside matmuls" is everything but the backbone's matmuls and attention: the patch embedding's ``conv3d``, norms,
modulation, RoPE, cache bookkeeping, retrieval and the memory all count as loop overhead here.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile, record_function

import lrag_ext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:                                                      # lrag as installed (or on PYTHONPATH) ...
    import lrag  # noqa: F401
except ImportError:                                       # ... or from this checkout
    sys.path.insert(0, os.path.join(REPO, "python"))

from lrag.config import WanConfig  # noqa: E402
from lrag.tiny import seeded_init_  # noqa: E402
from lrag.models.wan import CausalWanModel  # noqa: E402
from lrag.pipeline import Pipeline  # noqa: E402

MiB = 2 ** 20
K, R, SINK, WINDOW, EMBED, FRAMES_PER_BLOCK = 6, 5, 1, 12, 1024, 3
GEOMETRIES = {  # name: (layers, tokens per frame, heads, head_dim, device_frames, host_frames)
    "tiny": (4, 96, 2, 64, 64, None),
    "mid": (8, 1560, 4, 64, 32, 96),
}
PREFILL_TAIL = 96          # frames per stream appended as 3-frame blocks at the end of the prefill
BACKBONE_OPS = ("aten::linear", "aten::addmm", "aten::mm", "aten::bmm", "aten::matmul",
                "aten::scaled_dot_product_attention")
ISSUE_OPS = ("aten::cat", "aten::_to_copy", "aten::clone", "aten::stack")
_MARK = "lrag_bench::"     # record_function ranges of this script
_DTYPE_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4, "bool": 1,
                "unsigned char": 1, "signed char": 1, "short int": 2, "c10::complex<double>": 16,
                "c10::complex<float>": 8, "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1}


# --------------------------------------------------------------------------------------------------- machine
def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    simd = [x for x in ("avx512f", "avx2") if f" {x}" in flags]
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "--no-optional-locks", "-C", REPO, "status", "--porcelain",
                                     "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return dict(cpu=cpu, simd=simd, logical_cpus=os.cpu_count(), usable_cpus=len(os.sched_getaffinity(0)),
                memory_gib=round(mem_gib, 1), python=platform.python_version(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), lrag_ext_build=lrag_ext.build_info(),
                lrag_ext_path=os.path.dirname(lrag_ext.__file__),
                lrag_path=os.path.dirname(sys.modules["lrag.pipeline"].__file__), git_commit=commit,
                git_dirty_tracked=dirty)


# -------------------------------------------------------------------------------------------- profiler side
@dataclass
class _Op:
    name: str
    start: int
    end: int
    tid: int
    shapes: list
    dtypes: list
    parent: int = -1
    block: int = -1
    phase: str = "other"
    child_ns: int = 0


@dataclass
class ProfileStats:
    """Per-block numbers from one profiled run (every list is indexed by block)."""

    blocks: int
    block_ns: list                                # duration of each block range
    alloc: list                                   # bytes allocated (frees not subtracted)
    alloc_issue_union: list                       # bytes allocated inside any of cat/_to_copy/clone/stack
    alloc_by_phase: list                          # {phase: bytes}
    alloc_self: list                              # {op name: bytes allocated by the op itself}
    alloc_incl: list                              # {op name: bytes allocated inside the op, children included}
    net_incl: list                                # {op name: allocated minus freed inside the op}
    calls: list                                   # {op name: calls}
    copied: list                                  # {"copy_" / "cat" / "index_put_" / "index": bytes}
    self_ns: list                                 # {op name: self time}
    backbone_ns: list                             # time in outermost backbone matmul / attention ops
    unknown_dtypes: set = field(default_factory=set)


def _nbytes(shape, dtype: str, unknown: set) -> int:
    if not isinstance(shape, list):
        return 0
    if dtype not in _DTYPE_BYTES:
        unknown.add(dtype)
        return 0
    return math.prod(shape) * _DTYPE_BYTES[dtype]


def analyse(prof) -> ProfileStats:
    """Attributes the profiler's raw events to the blocks (``lrag_bench::block`` ranges) and phases (the other
    ``lrag_bench::`` ranges) they happened in; see the module docstring for the definitions."""
    ops_by_tid = collections.defaultdict(list)
    mems_by_tid = collections.defaultdict(list)
    for e in prof.profiler.kineto_results.events():
        if "CPU" not in str(e.device_type()):
            continue
        if e.name() == "[memory]":
            mems_by_tid[e.start_thread_id()].append((e.start_ns(), e.nbytes()))
        else:
            ops_by_tid[e.start_thread_id()].append(_Op(e.name(), e.start_ns(), e.start_ns() + e.duration_ns(),
                                                       e.start_thread_id(), list(e.shapes()), list(e.dtypes())))
    block_ops = sorted((o for ops in ops_by_tid.values() for o in ops if o.name == _MARK + "block"),
                       key=lambda o: o.start)
    for i, o in enumerate(block_ops):
        o.block = i
    n = len(block_ops)
    starts = [o.start for o in block_ops]

    def block_at(t: int) -> int:            # for events on threads without block ranges
        i = bisect.bisect_right(starts, t) - 1
        return i if i >= 0 and t <= block_ops[i].end else -1

    counters = lambda: [collections.Counter() for _ in range(n)]  # noqa: E731
    st = ProfileStats(blocks=n, block_ns=[o.end - o.start for o in block_ops], alloc=[0] * n,
                      alloc_issue_union=[0] * n, alloc_by_phase=counters(), alloc_self=counters(),
                      alloc_incl=counters(), net_incl=counters(), calls=counters(), copied=counters(),
                      self_ns=counters(), backbone_ns=[0] * n)
    all_ops = []
    for tid, ops in ops_by_tid.items():
        ops.sort(key=lambda o: (o.start, -o.end))
        base = len(all_ops)
        all_ops.extend(ops)
        mems = sorted(mems_by_tid.pop(tid, []))
        # One sweep over the thread's ops (by start, outer first) and allocations: the stack of open ops gives
        # every op its parent and every allocation its enclosing ops.
        stack: list[int] = []
        oi = mi = 0
        while oi < len(ops) or mi < len(mems):
            take_op = oi < len(ops) and (mi >= len(mems) or ops[oi].start <= mems[mi][0])
            t = ops[oi].start if take_op else mems[mi][0]
            while stack and all_ops[stack[-1]].end < t:
                stack.pop()
            if take_op:
                o = ops[oi]
                if stack:
                    p = all_ops[stack[-1]]
                    o.parent = stack[-1]
                    o.block = p.block if o.block < 0 else o.block
                    o.phase = p.phase
                elif o.block < 0:
                    o.block = block_at(o.start)
                if o.name.startswith(_MARK) and o.name != _MARK + "block":
                    o.phase = o.name[len(_MARK):]
                stack.append(base + oi)
                oi += 1
                continue
            nbytes = mems[mi][1]
            mi += 1
            b = all_ops[stack[-1]].block if stack else block_at(t)
            if b < 0:
                continue
            enclosing = [all_ops[j] for j in stack if not all_ops[j].name.startswith(_MARK)]
            names = {o.name for o in enclosing}
            for name in names:
                st.net_incl[b][name] += nbytes
            if nbytes <= 0:
                continue
            st.alloc[b] += nbytes
            st.alloc_by_phase[b][all_ops[stack[-1]].phase if stack else "other"] += nbytes
            st.alloc_self[b][enclosing[-1].name if enclosing else "(no op)"] += nbytes
            for name in names:
                st.alloc_incl[b][name] += nbytes
            if names.intersection(ISSUE_OPS):
                st.alloc_issue_union[b] += nbytes
    for tid, mems in mems_by_tid.items():     # allocations on threads that ran no profiled op
        for t, nbytes in mems:
            b = block_at(t)
            if b >= 0 and nbytes > 0:
                st.alloc[b] += nbytes
                st.alloc_self[b]["(no op)"] += nbytes
    # Per-op counts, copies, self times and the outermost backbone ops.
    for o in all_ops:
        if o.parent >= 0:
            all_ops[o.parent].child_ns += o.end - o.start
    for o in all_ops:
        b = o.block
        if b < 0 or o.name.startswith(_MARK):
            continue
        st.calls[b][o.name] += 1
        st.self_ns[b][o.name] += (o.end - o.start) - o.child_ns
        if o.name == "aten::copy_" and o.shapes:
            st.copied[b]["copy_"] += _nbytes(o.shapes[0], o.dtypes[0], st.unknown_dtypes)
        elif o.name == "aten::index_put_" and len(o.shapes) > 2:
            st.copied[b]["index_put_"] += _nbytes(o.shapes[2], o.dtypes[2], st.unknown_dtypes)
        if o.name in BACKBONE_OPS:
            p = o.parent
            while p >= 0 and all_ops[p].name not in BACKBONE_OPS:
                p = all_ops[p].parent
            if p < 0:
                st.backbone_ns[b] += o.end - o.start
    for b in range(n):
        st.copied[b]["cat"] = st.alloc_incl[b]["aten::cat"]
        st.copied[b]["index"] = st.alloc_incl[b]["aten::index"]
    return st


def profiled(fn):
    """Runs ``fn`` under the CPU profiler with memory and shapes; returns (fn's result, ProfileStats)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        out = fn()
    return out, analyse(prof)


# ---------------------------------------------------------------------------------------------- census side
_FACTORIES = {torch.tensor, torch.as_tensor, torch.arange, torch.full, torch.zeros, torch.ones, torch.empty,
              torch.randn, torch.rand, torch.randint, torch.randperm, torch.linspace, torch.eye, torch.empty_strided,
              torch.scalar_tensor}
_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
          torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}
_SHAPE_FROM_DATA = {torch.Tensor.nonzero, torch.nonzero, torch.masked_select, torch.Tensor.masked_select,
                    torch.unique, torch.Tensor.unique, torch.argwhere, torch.Tensor.argwhere}
_TO = {torch.Tensor.to, torch.Tensor.cuda}
_META = {torch.Tensor.shape.__get__, torch.Tensor.device.__get__, torch.Tensor.dtype.__get__, torch.Tensor.size,
         torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.element_size, torch.Tensor.stride,
         torch.Tensor.is_pinned, torch.Tensor.is_contiguous, torch.Tensor.is_floating_point}
_INPLACE_WRITES = {torch.Tensor.__setitem__, torch.Tensor.copy_, torch.Tensor.index_put_}
_HERE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(torch.__file__)


def _tensors(obj, out: list, depth: int = 0) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for x in obj:
            _tensors(x, out, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for x in obj.values():
            _tensors(x, out, depth + 1)
    return out


def _names_device(args, kwargs) -> bool:
    """Whether ``Tensor.to(...)`` arguments name a device."""
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str, torch.Tensor)) or (isinstance(a, int) and not isinstance(a, bool))
               for a in args)


class Census(TorchFunctionMode):
    """Counts host->device-equivalent transfers, host reads of device data and tensors built from Python data
    (see the module docstring). ``active`` turns counting on; tags are tracked all the time."""

    KINDS = ("lists->tensor", "host factories", "H2D explicit", "H2D implicit", "D2H reads", "host reads")

    def __init__(self):
        super().__init__()
        self._host: dict[int, weakref.ref] = {}
        self._sent: set[int] = set()          # host tensors already counted as sent to the device
        self.active = False
        self.key = None                       # what counts go to (a block index, a phase...)
        self.counts = collections.defaultdict(collections.Counter)   # key -> Counter{kind}
        self.nbytes = collections.defaultdict(collections.Counter)   # key -> Counter{kind}
        self.sites = collections.Counter()                           # (kind, site) -> count

    def is_host(self, t: torch.Tensor) -> bool:
        r = self._host.get(id(t))
        return r is not None and r() is t

    def _tag(self, t: torch.Tensor, host: bool) -> None:
        if host:
            if len(self._host) > 200_000:
                self._host = {k: r for k, r in self._host.items() if r() is not None}
            self._host[id(t)] = weakref.ref(t)
            self._sent.discard(id(t))
        else:
            self._host.pop(id(t), None)

    def _site(self) -> str:
        f = sys._getframe(2)
        while f is not None and (f.f_code.co_filename.startswith(_TORCH_DIR) or f.f_code.co_filename == _HERE):
            f = f.f_back
        if f is None:
            return "?"
        path = f.f_code.co_filename
        for pkg in ("lrag_ext", "lrag"):                  # package-relative, whichever checkout it comes from
            if f"{os.sep}{pkg}{os.sep}" in path:
                path = path[path.rindex(f"{os.sep}{pkg}{os.sep}") + 1:]
                break
        else:
            path = os.path.relpath(path, REPO)
        return f"{path}:{f.f_lineno} ({f.f_code.co_name})"

    def _count(self, kind: str, nbytes: int = 0) -> None:
        if not self.active:
            return
        self.counts[self.key][kind] += 1
        self.nbytes[self.key][kind] += nbytes
        self.sites[(kind, self._site())] += 1

    def _send(self, t: torch.Tensor, kind: str) -> None:
        if id(t) not in self._sent:
            self._sent.add(id(t))
            self._count(kind, t.numel() * t.element_size())

    def mark_device(self, *tensors: torch.Tensor) -> None:
        """Declares tensors that stand for device-resident data of the application (a block's K/V, the cache)."""
        for t in tensors:
            self._tag(t, False)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _META:
            return out
        ins = _tensors(args, [])
        _tensors(kwargs, ins)
        host_in = [t for t in ins if self.is_host(t)]
        dev_in = [t for t in ins if not self.is_host(t)]
        gen = kwargs.get("generator")
        device_kw = kwargs.get("device") is not None and not (isinstance(gen, torch.Generator)
                                                             and gen.device.type == "cpu")
        host_out = bool(host_in) and not dev_in and not device_kw
        if func in _READS:
            src = args[0]
            if self.is_host(src):
                self._count("host reads")
            else:
                self._count("D2H reads", src.numel() * src.element_size())
            host_out = True                   # .cpu() (the others return Python data)
        elif func in _SHAPE_FROM_DATA:
            if dev_in:
                self._count("D2H reads")
            host_out = not dev_in
        elif func in _TO:
            if func is torch.Tensor.cuda or _names_device(args[1:], kwargs):
                if self.is_host(args[0]):
                    self._count("H2D explicit", args[0].numel() * args[0].element_size())
                host_out = False
            else:
                host_out = self.is_host(args[0])
        elif func in _INPLACE_WRITES:
            dst, rest = args[0], ins[1:]
            if self.is_host(dst):
                if any(not self.is_host(t) and t.dim() > 0 for t in rest):
                    self._count("D2H reads")  # device data written into a host tensor
            else:
                for t in rest:
                    if self.is_host(t) and t.dim() > 0:
                        self._send(t, "H2D explicit" if func is torch.Tensor.copy_ else "H2D implicit")
            if func is torch.Tensor.__setitem__ and len(args) > 1:
                if any(t.dtype == torch.bool and not self.is_host(t) for t in _tensors(args[1], [])):
                    self._count("D2H reads")
            return out                        # the destination keeps its tag
        elif func in _FACTORIES:
            if func in (torch.tensor, torch.as_tensor) and args and not isinstance(args[0], torch.Tensor):
                self._count("lists->tensor")
                if device_kw and isinstance(out, torch.Tensor):     # built on the host, copied to the device
                    self._count("H2D explicit", out.numel() * out.element_size())
            elif not ins and not device_kw:
                self._count("host factories")
            if not ins:
                host_out = not device_kw
        else:
            if host_in and dev_in:
                for t in host_in:
                    if t.dim() > 0:
                        self._send(t, "H2D implicit")
            if func is torch.Tensor.__getitem__ and len(args) > 1:
                if any(t.dtype == torch.bool and not self.is_host(t) for t in _tensors(args[1], [])):
                    self._count("D2H reads")
        outs = _tensors(out, [])
        if (func in _TO or func is torch.Tensor.cpu) and isinstance(out, torch.Tensor) and out is args[0] \
                and self.is_host(out) != host_out:
            # On the CPU `.to(device)` / `.cpu()` return their input: hand back an alias so that the input keeps
            # its tag (a host tensor sent twice is two transfers on a GPU).
            out = torch.ops.aten.alias.default(out)
            outs = [out]
        for t in outs:
            if not any(t is i for i in ins):  # in-place results keep their tag
                self._tag(t, host_out)
        return out


def _pipeline_retrieval():
    """K and R in the retrieval config the code state's ``Pipeline`` takes: an ``lrag_ext.MemoryConfig`` (issue 12
    on) or, before, ``lrag.config.RetrievalConfig`` (``k``)."""
    if "MemoryConfig" in str(inspect.signature(Pipeline.__init__).parameters["retrieval"].annotation):
        return lrag_ext.MemoryConfig(top_k=K, recent_exclude=R)
    from lrag.config import RetrievalConfig  # noqa: PLC0415  (older code states)
    return RetrievalConfig(k=K, recent_exclude=R)


# ----------------------------------------------------------------------------------------- part 1: memory
def _memory_config(geometry: str, max_frames: int) -> lrag_ext.MemoryConfig:
    L, T, H, Dh, device_frames, host_frames = GEOMETRIES[geometry]
    return lrag_ext.MemoryConfig(
        top_k=K, recent_exclude=R, sink_frames=SINK, window_frames=WINDOW, embed_dim=EMBED, storage="kv",
        kv_layout=lrag_ext.KVLayout(num_layers=L, tokens_per_frame=T, num_heads=H, head_dim=Dh), device="cpu",
        dtype=torch.bfloat16, max_frames=max_frames, device_frames=device_frames, host_frames=host_frames)


def _memory_takes_stream_lists() -> bool:
    """Whether ``RetrievalMemory.append`` takes a list of streams (one call per block for all streams)."""
    ann = inspect.signature(lrag_ext.RetrievalMemory.append).parameters["stream"].annotation
    return "list" in str(ann)


class MemoryBench:
    """One memory pre-filled to ``history`` frames per stream, and the per-block steps."""

    def __init__(self, geometry: str, history: int, streams: int, blocks_after: int, seed: int = 0,
                 census: Census | None = None, batched_append: bool | None = None):
        L, T, H, Dh = GEOMETRIES[geometry][:4]
        self.geometry, self.B = geometry, streams
        self.g = torch.Generator().manual_seed(seed)
        self.mem = lrag_ext.RetrievalMemory(_memory_config(
            geometry, streams * (history + FRAMES_PER_BLOCK * blocks_after) + 64))
        self.streams = [self.mem.add_stream() for _ in range(streams)]
        # The block's K/V as the pipeline hands them over: [:, b] views of [layers, B, F, T, H, d].
        self.block_k = torch.randn((L, streams, FRAMES_PER_BLOCK, T, H, Dh), generator=self.g).bfloat16()
        self.block_v = torch.randn((L, streams, FRAMES_PER_BLOCK, T, H, Dh), generator=self.g).bfloat16()
        self.cache_k = torch.zeros((L, streams, K, T, H, Dh), dtype=torch.bfloat16)
        self.cache_v = torch.zeros_like(self.cache_k)
        self.dst_frame = torch.arange(K).expand(streams, -1)
        self.census = census
        self.batched_append = batched_append if batched_append is not None else _memory_takes_stream_lists()
        if census is not None:               # what the generator holds on its device
            census.mark_device(self.block_k, self.block_v, self.cache_k, self.cache_v, self.dst_frame)
        self.frame_bytes = L * 2 * T * H * Dh * 2
        head = max(0, history - PREFILL_TAIL)
        one_k = self.block_k[:, 0, :1]
        for s in self.streams:             # the bulk: one append per stream, K/V as an expanded view
            if head:
                kv = one_k.expand(L, head, T, H, Dh)
                self.mem.append(s, self._embeddings(head), k=kv, v=kv)
        while self.mem.num_frames(self.streams[-1]) < history:
            for s in self.streams:
                n = min(FRAMES_PER_BLOCK, history - self.mem.num_frames(s))
                self.mem.append(s, self._embeddings(n), k=self.block_k[:, 0, :n], v=self.block_v[:, 0, :n])
        self.history = history
        self.retrieved_frames = 0

    def _embeddings(self, n: int) -> torch.Tensor:
        """Frame embeddings as the embedder returns them (on the device)."""
        e = torch.randn((n, EMBED), generator=self.g)
        if self.census is not None:
            self.census.mark_device(e)
        return e

    def stored_frames(self) -> int:
        """Frames whose K/V are stored (a private field, read only for the report; -1 if it is not there)."""
        try:
            return sum(1 for s in self.streams for c in self.mem._streams[s].kv_code if c >= 0)
        except (AttributeError, KeyError, TypeError):
            return -1

    def block(self, census: Census | None = None, annotate: bool = False) -> dict:
        """One steady-state block: retrieve, gather, append (per stream); returns the calls' seconds."""
        active = census is not None and census.active
        if active:
            census.active = False            # the benchmark's own inputs are not counted
        embs = self._embeddings(self.B * FRAMES_PER_BLOCK).view(self.B, FRAMES_PER_BLOCK, EMBED)  # not timed
        if active:
            census.mark_device(embs)
            census.active = True
        times = {}

        def phase(name, fn):
            if census is not None:
                census.key = name
            t0 = time.perf_counter()
            if annotate:
                with record_function(_MARK + name):
                    out = fn()
            else:
                out = fn()
            times[name] = time.perf_counter() - t0
            return out

        plan = phase("retrieve", lambda: self.mem.retrieve(self.streams))
        phase("gather", lambda: self.mem.gather(plan, self.cache_k, self.cache_v, dst_frame=self.dst_frame,
                                                 positions="sink"))
        if self.batched_append:              # one call for every stream, as the pipeline does when it can
            phase("append", lambda: self.mem.append(self.streams, embs, k=self.block_k, v=self.block_v))
        else:
            phase("append", lambda: [self.mem.append(s, embs[b], k=self.block_k[:, b], v=self.block_v[:, b])
                                     for b, s in enumerate(self.streams)])
        self.retrieved_frames = sum(plan.counts)
        times["block"] = sum(times.values())
        return times


def run_memory(geometry: str, history: int, streams: int, warmup: int, timed: int, profiled_blocks: int,
               census_blocks: int, batched_append: bool | None = None) -> dict:
    total_blocks = warmup + timed + profiled_blocks + census_blocks
    census = Census()
    t0 = time.perf_counter()
    # The census pass comes first, with the mode on from the memory's construction, so that every tensor the
    # memory keeps (its host tables included) was made under the mode and carries its tag.
    with census:
        bench = MemoryBench(geometry, history, streams, total_blocks, census=census, batched_append=batched_append)
        prefill_s = time.perf_counter() - t0
        for _ in range(warmup):
            bench.block(census=census)
        census.active = True
        for _ in range(census_blocks):
            bench.block(census=census)
        census.active = False
    times = [bench.block() for _ in range(timed)]

    def prof_blocks():
        for _ in range(profiled_blocks):
            with record_function(_MARK + "block"):
                bench.block(annotate=True)
    _, ps = profiled(prof_blocks)
    med = {k: statistics.median(t[k] for t in times) * 1e3 for k in times[0]}
    per_block = lambda xs: statistics.median(xs)  # noqa: E731
    self_top = collections.Counter()
    incl = collections.Counter()
    calls = collections.Counter()
    copied = collections.Counter()
    for b in range(ps.blocks):
        self_top.update(ps.alloc_self[b])
        incl.update(ps.alloc_incl[b])
        calls.update(ps.calls[b])
        copied.update(ps.copied[b])
    nb = max(ps.blocks, 1)
    phases = ("retrieve", "gather", "append")
    cens = {ph: {kind: census.counts[ph][kind] / census_blocks for kind in Census.KINDS} for ph in phases}
    cens_bytes = {ph: {kind: census.nbytes[ph][kind] / census_blocks for kind in Census.KINDS} for ph in phases}
    res = dict(
        geometry=geometry, batched_append=bench.batched_append, kv_layout=GEOMETRIES[geometry][:4],
        device_frames=GEOMETRIES[geometry][4], host_frames=GEOMETRIES[geometry][5], history=history,
        streams=streams, frame_bytes=bench.frame_bytes,
        stored_frames_at_end=bench.stored_frames(), prefill_s=round(prefill_s, 2),
        blocks=dict(warmup=warmup, timed=timed, profiled=profiled_blocks, census=census_blocks),
        ms_median={k: round(v, 3) for k, v in med.items()},
        ms_all={k: [round(t[k] * 1e3, 3) for t in times] for k in times[0]},
        alloc_per_block_median=per_block(ps.alloc), alloc_per_block_max=max(ps.alloc) if ps.alloc else 0,
        alloc_per_block=ps.alloc,
        alloc_by_phase={ph: per_block([ps.alloc_by_phase[b][ph] for b in range(ps.blocks)]) for ph in phases},
        alloc_self_top={k: v / nb for k, v in self_top.most_common(6)},
        alloc_incl={k: incl[k] / nb for k in ("aten::cat", "aten::_to_copy", "aten::clone", "aten::stack",
                                              "aten::index", "aten::full", "aten::zeros", "aten::arange",
                                              "lrag_ext::cosine_topk") if incl[k]},
        calls_per_block={k: calls[k] / nb for k in ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::index",
                                                    "aten::index_put_", "aten::lift_fresh", "lrag_ext::cosine_topk",
                                                    "lrag_ext::gather_kv", "lrag_ext::write_kv")},
        ops_per_block=sum(calls.values()) / nb,
        copied_per_block={k: v / nb for k, v in copied.items()},
        payload_per_block=dict(retrieved=bench.retrieved_frames * bench.frame_bytes,
                               appended=streams * FRAMES_PER_BLOCK * bench.frame_bytes),
        census_per_block=cens, census_bytes_per_block=cens_bytes,
        census_sites={f"{kind} @ {site}": n / census_blocks for (kind, site), n in census.sites.most_common()},
        unknown_dtypes=sorted(ps.unknown_dtypes))
    del bench
    return res


# -------------------------------------------------------------------------------------- part 2: generator
def gen_config(layers: int, dim: int, heads: int, height: int, width: int) -> WanConfig:
    return WanConfig(num_layers=layers, dim=dim, num_heads=heads, ffn_dim=2 * dim, freq_dim=256, text_dim=32,
                     text_len=16, latent_height=height, latent_width=width, frames_per_block=FRAMES_PER_BLOCK,
                     window=WINDOW, sink=SINK)


class _BackboneTimer:
    """Wall time spent in ``F.linear`` (every ``nn.Linear``) and ``F.scaled_dot_product_attention``, the model's
    matmuls and attention, measured without the profiler by wrapping the two functions (~0.3 us a call)."""

    def __init__(self):
        self.seconds = 0.0
        self._saved = {}

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s

    def __enter__(self):
        for name in ("linear", "scaled_dot_product_attention"):
            self._saved[name] = getattr(torch.nn.functional, name)
            setattr(torch.nn.functional, name, self._wrap(self._saved[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch.nn.functional, name, fn)
        self._saved.clear()


class _BlockMarks:
    """A pipeline callback that closes the current ``lrag_bench::block`` range and opens the next one (and moves
    the census to the next block)."""

    def __init__(self, blocks: int, census: Census | None = None, profiling: bool = False):
        self.blocks, self.census, self.profiling, self.rf, self.index = blocks, census, profiling, None, 0

    def open(self):
        if self.census is not None:
            self.census.key = self.index
        if self.profiling:
            self.rf = record_function(_MARK + "block")
            self.rf.__enter__()

    def close(self):
        if self.rf is not None:
            self.rf.__exit__(None, None, None)
            self.rf = None

    def __call__(self, block):
        self.close()
        self.index += 1
        if self.index < self.blocks:
            self.open()
        elif self.census is not None:
            self.census.key = None


def run_generator(cfg: WanConfig, blocks: int, streams: int = 1, warmup: bool = True) -> dict:
    model = seeded_init_(CausalWanModel(cfg), 11).eval()
    text = torch.randn((streams, cfg.text_len, cfg.text_dim), generator=torch.Generator().manual_seed(1))
    pipe = Pipeline(model, retrieval=_pipeline_retrieval())
    frames = blocks * cfg.frames_per_block

    def generate(callback=None):
        return pipe.generate(text, frames, generator=torch.Generator().manual_seed(2), mode="rag", callback=callback)

    if warmup:
        generate()                                            # warm-up (allocator, one-time tables)
    timer = _BackboneTimer()
    backbone_s = []
    with timer:                                               # timing pass
        res = generate(lambda block: backbone_s.append(timer.take()))
    timings = [b.timings for b in res.blocks]
    marks = _BlockMarks(blocks, profiling=True)

    def prof_run():
        marks.open()
        out = generate(marks)
        marks.close()
        return out
    _, ps = profiled(prof_run)
    census = Census()
    cmarks = _BlockMarks(blocks, census=census)
    with census:                      # a fresh Pipeline, so that its host tables (scheduler) are tagged host
        pipe = Pipeline(model, retrieval=_pipeline_retrieval())
        census.active = True
        cmarks.open()
        generate(cmarks)
        census.active = False
    retrieval_blocks = [b for b in range(blocks) if b >= 6]   # memory frames present from block 6 on
    first = min(6, blocks)

    def over(xs, which):
        xs = [xs[b] for b in which if b < len(xs)]
        return sum(xs) / len(xs) if xs else 0.0

    all_blocks = list(range(blocks))
    out = dict(config=dict(layers=cfg.num_layers, dim=cfg.dim, heads=cfg.num_heads, ffn_dim=cfg.ffn_dim,
                           latent=[cfg.latent_height, cfg.latent_width], tokens_per_frame=cfg.tokens_per_frame,
                           dtype="float32", batch=streams, k=K, recent_exclude=R),
               blocks=blocks, profiled_blocks=ps.blocks)
    for label, which in (("all", all_blocks), ("retrieval", retrieval_blocks), ("first6", list(range(first)))):
        if not which:
            continue
        d = {}
        d["ms_block_median"] = statistics.median(timings[b]["total"] for b in which) * 1e3
        for key in ("retrieval", "denoise", "rerun", "memory"):
            d[f"ms_{key}_median"] = statistics.median(timings[b][key] for b in which) * 1e3
        d["ms_block_profiled_mean"] = over(ps.block_ns, which) / 1e6
        d["ms_backbone_profiled_mean"] = over(ps.backbone_ns, which) / 1e6
        d["alloc"] = over(ps.alloc, which)
        d["issue_ops_incl_net"] = {op: over([ps.net_incl[b][op] for b in range(ps.blocks)], which)
                                   for op in ISSUE_OPS}
        d["issue_ops_incl_alloc"] = {op: over([ps.alloc_incl[b][op] for b in range(ps.blocks)], which)
                                     for op in ISSUE_OPS}
        # Allocations inside any of the four ops, each counted once (stack's inner cat not twice).
        d["issue_ops_union_alloc"] = over(ps.alloc_issue_union, which)
        d["copied"] = {k: over([ps.copied[b][k] for b in range(ps.blocks)], which)
                       for k in ("copy_", "cat", "index_put_", "index")}
        d["copied_total"] = sum(d["copied"].values())
        d["calls"] = {op: over([ps.calls[b][op] for b in range(ps.blocks)], which)
                      for op in ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::clone", "aten::stack",
                                 "aten::lift_fresh", "aten::index", "aten::index_put_")}
        d["ops"] = over([sum(ps.calls[b].values()) for b in range(ps.blocks)], which)
        d["census"] = {kind: over([census.counts[b][kind] for b in range(blocks)], which) for kind in Census.KINDS}
        d["census_bytes"] = {kind: over([census.nbytes[b][kind] for b in range(blocks)], which)
                             for kind in Census.KINDS}
        blk, mm = d["ms_block_profiled_mean"], d["ms_backbone_profiled_mean"]
        d["overhead_share_profiled"] = 1 - mm / blk if blk else 0.0
        d["ms_block_mean"] = over([t["total"] * 1e3 for t in timings], which)
        d["ms_backbone_mean"] = over([x * 1e3 for x in backbone_s], which)
        d["overhead_share"] = 1 - d["ms_backbone_mean"] / d["ms_block_mean"] if d["ms_block_mean"] else 0.0
        out[label] = d
    top = collections.Counter()
    alloc_self = collections.Counter()
    for b in retrieval_blocks or all_blocks:
        if b < ps.blocks:
            top.update(ps.self_ns[b])
            alloc_self.update(ps.alloc_self[b])
    nsel = len(retrieval_blocks or all_blocks)
    backbone_self = {"aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul",
                     "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
                     "aten::t", "aten::transpose", "aten::view", "aten::expand", "aten::as_strided"}
    out["top_self_time_ms"] = {k: v / nsel / 1e6 for k, v in top.most_common(40) if k not in backbone_self}
    out["top_self_time_ms"] = dict(list(out["top_self_time_ms"].items())[:10])
    out["alloc_self_top"] = {k: v / nsel for k, v in alloc_self.most_common(8)}
    out["per_block"] = dict(alloc=ps.alloc, ops=[sum(c.values()) for c in ps.calls],
                            ms_total=[round(t["total"] * 1e3, 3) for t in timings],
                            issue_ops_union_alloc=ps.alloc_issue_union,
                            h2d=[census.counts[b]["H2D explicit"] + census.counts[b]["H2D implicit"]
                                 for b in range(blocks)],
                            d2h=[census.counts[b]["D2H reads"] for b in range(blocks)])
    out["census_sites"] = {f"{kind} @ {site}": n / blocks for (kind, site), n in census.sites.most_common()}
    out["unknown_dtypes"] = sorted(ps.unknown_dtypes)
    return out


# ---------------------------------------------------------------------------------------------- reporting
def _mib(x: float) -> str:
    return f"{x / MiB:.2f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def report_memory(results: list[dict]) -> list[str]:
    out = ["### Part 1: RetrievalMemory per block (retrieve + gather + append of one 3-frame block per stream)", ""]
    if not results:
        return out
    r0 = results[0]
    out.append(f"B = {r0['streams']} streams, K = {K}, R = {R}, 1024-d float32 embeddings, bf16 K/V, device cpu. "
               "Times: median over the timed blocks (ms); bytes and counts: per block (median over profiled "
               "blocks for allocations, mean for the rest). In brackets: the ratio to the same geometry's "
               "smallest history (same run).")
    out.append("")
    out.append("| geometry | history | stored K/V frames | retrieve ms | gather ms | append ms | block ms | "
               "allocated MiB | copy_ n / MiB | _to_copy n / MiB | cat n / MiB | lists->tensor | lift_fresh | "
               "H2D n / KiB | D2H reads | K/V payload MiB | ops |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = {}
    for r in results:
        c = r["census_per_block"]
        h2d = sum(c[ph]["H2D explicit"] + c[ph]["H2D implicit"] for ph in c)
        cb = r["census_bytes_per_block"]
        h2d_bytes = sum(cb[ph]["H2D explicit"] + cb[ph]["H2D implicit"] for ph in cb)
        d2h = sum(c[ph]["D2H reads"] for ph in c)
        lists = sum(c[ph]["lists->tensor"] for ph in c)
        m = r["ms_median"]
        calls, cp = r["calls_per_block"], r["copied_per_block"]
        row = dict(block=m["block"], alloc=r["alloc_per_block_median"], ops=r["ops_per_block"], h2d=h2d)
        key = r["geometry"]
        if r["history"] == min(x["history"] for x in results if x["geometry"] == key):
            base[key] = row
        b = base.get(key, row)
        growth = "" if row is b else (f" ({_ratio(row['block'], b['block'])})")
        out.append(
            f"| {key} | {r['history']} | {r['stored_frames_at_end']} | {m['retrieve']:.3f} | {m['gather']:.3f} | "
            f"{m['append']:.3f} | {m['block']:.3f}{growth} | {_mib(r['alloc_per_block_median'])}"
            f"{'' if row is b else ' (' + _ratio(row['alloc'], b['alloc']) + ')'} | "
            f"{calls['aten::copy_']:.0f} / {_mib(cp.get('copy_', 0))} | {calls['aten::_to_copy']:.0f} / "
            f"{_mib(r['alloc_incl'].get('aten::_to_copy', 0))} | "
            f"{calls['aten::cat']:.0f} / {_mib(cp.get('cat', 0))} | {lists:.1f} | {calls['aten::lift_fresh']:.1f} | "
            f"{h2d:.1f} / {h2d_bytes / 1024:.1f} | {d2h:.1f} | {_mib(sum(r['payload_per_block'].values()))} | "
            f"{r['ops_per_block']:.0f}{'' if row is b else ' (' + _ratio(row['ops'], b['ops']) + ')'} |")
    out.append("")
    out.append("Per phase (allocated MiB per block, and census counts per block: lists->tensor / H2D / D2H reads):")
    out.append("")
    out.append("| geometry | history | retrieve | gather | append |")
    out.append("|---|---:|---|---|---|")
    for r in results:
        cells = []
        for ph in ("retrieve", "gather", "append"):
            c = r["census_per_block"][ph]
            cells.append(f"{_mib(r['alloc_by_phase'][ph])} MiB; {c['lists->tensor']:.1f} / "
                         f"{c['H2D explicit'] + c['H2D implicit']:.1f} / {c['D2H reads']:.1f}")
        out.append(f"| {r['geometry']} | {r['history']} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("Top allocating ops (self, MiB per block):")
    out.append("")
    for r in results:
        tops = ", ".join(f"{k} {_mib(v)}" for k, v in list(r["alloc_self_top"].items())[:5])
        out.append(f"- {r['geometry']} {r['history']}: {tops}")
    r = max(results, key=lambda x: (x["geometry"] == "tiny", x["history"]))
    out.append("")
    out.append(f"Census call sites ({r['geometry']}, history {r['history']}, per block; lists->tensor, H2D and D2H "
               "reads only):")
    out.append("")
    out += _sites(r["census_sites"], 20)
    return out


def report_generator(results: list[dict]) -> list[str]:
    out = ["### Part 2: lrag.Pipeline, RAG mode, per block", ""]
    if not results:
        return out
    c = results[0]["config"]
    out.append(f"CausalWanModel {c['layers']} layers, dim {c['dim']}, {c['heads']} heads, ffn {c['ffn_dim']}, "
               f"{c['latent'][0]}x{c['latent'][1]} latents ({c['tokens_per_frame']} tokens a frame), float32, "
               f"batch {c['batch']}, K = {K}, R = {R}, spatial-mean embedder. `all` = mean over every block of the "
               "generation (the issue's \"per block over N blocks\"), `retr` = mean over the blocks with "
               "retrieval (block >= 6). MiB per block from the profiler; allocations inside each op, children "
               "included (stack = its cat).")
    out.append("")
    out.append("| blocks | which | cat MiB | _to_copy MiB | clone MiB | stack MiB | any of the four MiB | "
               "allocated MiB (all ops) | copied MiB | lists->tensor | lift_fresh | H2D | D2H reads | "
               "ops | block ms | outside matmuls: timed / profiled |")
    out.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        for label in ("all", "retrieval"):
            if label not in r:
                continue
            d = r[label]
            inc = d["issue_ops_incl_alloc"]
            cs = d["census"]
            out.append(
                f"| {r['blocks']} | {'all' if label == 'all' else 'retr'} | {_mib(inc['aten::cat'])} | "
                f"{_mib(inc['aten::_to_copy'])} | {_mib(inc['aten::clone'])} | {_mib(inc['aten::stack'])} | "
                f"{_mib(d['issue_ops_union_alloc'])} | {_mib(d['alloc'])} | {_mib(d['copied_total'])} | "
                f"{cs['lists->tensor']:.1f} | {d['calls']['aten::lift_fresh']:.1f} | "
                f"{cs['H2D explicit'] + cs['H2D implicit']:.1f} | {cs['D2H reads']:.1f} | "
                f"{d['ops']:.0f} | {d['ms_block_median']:.2f} | {100 * d['overhead_share']:.1f} % / "
                f"{100 * d['overhead_share_profiled']:.1f} % |")
    out.append("")
    out.append("copied = " + "; ".join(
        f"{r['blocks']} blocks (retr): " + ", ".join(f"{k} {_mib(v)}" for k, v in r["retrieval"]["copied"].items())
        for r in results if "retrieval" in r) + " MiB.")
    out.append("")
    out.append("Net (allocated minus freed inside the op, as the profiler's \"CPU Mem\" column) MiB per block, "
               "all blocks: " + "; ".join(
                   f"{r['blocks']} blocks: " + ", ".join(f"{op.split('::')[1]} {_mib(v)}"
                                                         for op, v in r["all"]["issue_ops_incl_net"].items())
                   for r in results))
    if len(results) >= 2 and all("retrieval" in r for r in results):
        a, b = results[0], results[-1]
        ra, rb = a["retrieval"], b["retrieval"]
        out.append("")
        out.append(f"Ratios {b['blocks']} vs {a['blocks']} blocks (same run): allocated "
                   f"{_ratio(b['all']['alloc'], a['all']['alloc'])} (all blocks), {_ratio(rb['alloc'], ra['alloc'])} "
                   f"(retrieval blocks); any of the four "
                   f"{_ratio(b['all']['issue_ops_union_alloc'], a['all']['issue_ops_union_alloc'])} (all blocks), "
                   f"{_ratio(rb['issue_ops_union_alloc'], ra['issue_ops_union_alloc'])} (retrieval blocks); block ms "
                   f"{_ratio(rb['ms_block_median'], ra['ms_block_median'])} (retrieval blocks).")
    r = results[-1]
    pb = r["per_block"]
    if r["blocks"] >= 18:             # growth within one generation: first 6 retrieval blocks vs the last 6
        early, late = range(6, 12), range(r["blocks"] - 6, r["blocks"])
        mean = lambda xs, idx: sum(xs[i] for i in idx) / len(idx)  # noqa: E731
        out.append("")
        out.append(f"Within the {r['blocks']}-block generation, blocks {early[0]}-{early[-1]} -> "
                   f"{late[0]}-{late[-1]} (history {3 * early[0]}-{3 * early[-1]} -> {3 * late[0]}-{3 * late[-1]} "
                   f"frames): allocated {_mib(mean(pb['alloc'], early))} -> {_mib(mean(pb['alloc'], late))} MiB, "
                   f"any of the four {_mib(mean(pb['issue_ops_union_alloc'], early))} -> "
                   f"{_mib(mean(pb['issue_ops_union_alloc'], late))} MiB, ops {mean(pb['ops'], early):.0f} -> "
                   f"{mean(pb['ops'], late):.0f}, H2D {mean(pb['h2d'], early):.1f} -> {mean(pb['h2d'], late):.1f}, "
                   f"D2H reads {mean(pb['d2h'], early):.1f} -> {mean(pb['d2h'], late):.1f}, block ms (unprofiled) "
                   f"{mean(pb['ms_total'], early):.1f} -> {mean(pb['ms_total'], late):.1f}.")
    out.append("")
    d = r["retrieval"] if "retrieval" in r else r["all"]
    out.append(f"Time split ({r['blocks']} blocks, retrieval blocks, unprofiled medians, ms): retrieval "
               f"{d['ms_retrieval_median']:.2f}, 4 denoising forwards {d['ms_denoise_median']:.2f}, rerun "
               f"{d['ms_rerun_median']:.2f}, memory append {d['ms_memory_median']:.2f}; mean block "
               f"{d['ms_block_mean']:.2f} ms of which F.linear + F.scaled_dot_product_attention "
               f"{d['ms_backbone_mean']:.2f} ms; profiled: block {d['ms_block_profiled_mean']:.2f} ms, outermost "
               f"linear/addmm/mm/bmm/matmul/sdpa ops {d['ms_backbone_profiled_mean']:.2f} ms.")
    out.append("")
    out.append("Top self-time ops outside the backbone matmuls (profiled, ms per retrieval block): " + ", ".join(
        f"{k} {v:.2f}" for k, v in r["top_self_time_ms"].items()))
    out.append("")
    out.append("Top allocating ops (self, MiB per retrieval block): " + ", ".join(
        f"{k} {_mib(v)}" for k, v in r["alloc_self_top"].items()))
    out.append("")
    out.append(f"Census call sites ({r['blocks']} blocks, per block, mean over all blocks; lists->tensor, H2D and "
               "D2H reads only):")
    out.append("")
    out += _sites(r["census_sites"], 14)
    return out


def _sites(sites: dict, n: int) -> list[str]:
    shown = [(k, v) for k, v in sites.items() if k.split(" @ ")[0] in ("lists->tensor", "H2D explicit",
                                                                         "H2D implicit", "D2H reads")]
    return [f"- {v:.2f} x {k}" for k, v in shown[:n]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                 epilog="See the module docstring (head of this file) for the definitions.")
    ap.add_argument("--quick", action="store_true", help="smoke run: small histories, few blocks (seconds)")
    ap.add_argument("--part", choices=("all", "memory", "generator"), default="all")
    ap.add_argument("--histories", default=None, help="comma-separated frames per stream (default 480,5000)")
    ap.add_argument("--geometries", default=None, help="memory part: comma-separated of tiny,mid (default both)")
    ap.add_argument("--streams", type=int, default=2, help="memory part: streams B (default 2)")
    ap.add_argument("--append", choices=("auto", "batched", "per-stream"), default="auto",
                    help="memory part: one append per stream, or one for all streams (auto: batched when\n"
                         "RetrievalMemory.append takes a list of streams, as the pipeline then does)")
    ap.add_argument("--timed-blocks", type=int, default=None, help="memory part: timed blocks (default 10)")
    ap.add_argument("--gen-blocks", default=None, help="generator part: comma-separated blocks (default 12,36)")
    ap.add_argument("--gen-geometry", default=None,
                    help="generator part: layers,dim,heads,latent_h,latent_w (default 4,128,2,16,24;\n"
                         "--quick: 2,64,2,16,24)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--label", default=None, help="free text printed with the results (e.g. which code state)")
    ap.add_argument("--json", default=None, help="write every number (per block too) to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    histories = [int(x) for x in (args.histories or ("96,300" if args.quick else "480,5000")).split(",")]
    geometries = (args.geometries or ("tiny" if args.quick else "tiny,mid")).split(",")
    timed = args.timed_blocks or (3 if args.quick else 10)
    prof_blocks, census_blocks = (2, 2) if args.quick else (4, 4)
    gen_blocks = [int(x) for x in (args.gen_blocks or ("7" if args.quick else "12,36")).split(",")]
    gen_geometry = args.gen_geometry or ("2,64,2,16,24" if args.quick else "4,128,2,16,24")
    layers, dim, heads, lh, lw = (int(x) for x in gen_geometry.split(","))
    unknown_geometries = sorted(set(geometries) - set(GEOMETRIES))
    if unknown_geometries:
        ap.error(f"unknown geometries {unknown_geometries}: choose among {sorted(GEOMETRIES)}")
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    info = machine()
    info["loadavg_before"] = [round(x, 2) for x in load_before]
    result = dict(machine=info, argv=sys.argv[1:], label=args.label, memory=[], generator=[])
    print(f"# block_overhead: {info['cpu']} ({', '.join(info['simd'])}), {info['usable_cpus']} usable CPUs, "
          f"{info['memory_gib']} GiB, torch {info['torch']}, {info['torch_threads']} thread(s), checkout at "
          f"{info['git_commit']}{' (tracked files modified)' if info['git_dirty_tracked'] else ''}; load average "
          f"before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)
    print(f"# code: lrag_ext from {info['lrag_ext_path']}, lrag from {info['lrag_path']}"
          + (f"; label: {args.label}" if args.label else ""), flush=True)
    if args.part in ("all", "memory"):
        for geometry in geometries:
            for history in histories:
                t0 = time.perf_counter()
                r = run_memory(geometry, history, args.streams, warmup=1 if args.quick else 2, timed=timed,
                               profiled_blocks=prof_blocks, census_blocks=census_blocks,
                               batched_append={"auto": None, "batched": True, "per-stream": False}[args.append])
                result["memory"].append(r)
                print(f"  memory {geometry} history {history}: {time.perf_counter() - t0:.1f} s "
                      f"(prefill {r['prefill_s']} s)", flush=True)
    if args.part in ("all", "generator"):
        cfg = gen_config(layers, dim, heads, lh, lw)
        for blocks in gen_blocks:
            t0 = time.perf_counter()
            result["generator"].append(run_generator(cfg, blocks, warmup=not args.quick))
            print(f"  generator {blocks} blocks: {time.perf_counter() - t0:.1f} s", flush=True)
    load_after = os.getloadavg()
    info["loadavg_after"] = [round(x, 2) for x in load_after]
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    lines = [""]
    if result["memory"]:
        lines += report_memory(result["memory"]) + [""]
    if result["generator"]:
        lines += report_generator(result["generator"]) + [""]
    contended = max(load_before[0], load_after[0]) > 1.5
    lines.append(f"Wall {info['wall_s']} s; load average after {load_after[0]:.2f} {load_after[1]:.2f} "
                 f"{load_after[2]:.2f}" + ("; load > 1.5: timings are contended (bytes and counts are not)."
                                           if contended else "."))
    unknown = sorted({d for r in result["memory"] + result["generator"] for d in r["unknown_dtypes"]})
    if unknown:
        lines.append(f"Warning: copy_ bytes of dtypes {unknown} not counted (unknown element size).")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
