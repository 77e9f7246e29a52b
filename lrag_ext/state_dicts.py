"""Safe reading of user-given files and strict state-dict matching, shared by every loader (generator, embedder,
``lrag inspect``, ``--resume``), plus the checks of output folders and devices shared by the ``lrag`` commands
and the embedder trainer.

Every file goes through :func:`open_regular_file`: only a regular, non-empty file is opened (a directory, a
FIFO, a socket or a device file is refused after an ``os.stat``, before any read, so nothing can block), and
every error names the file. The errors, one type per kind of mistake:

- ``FileNotFoundError``: the file does not exist (the message names it);
- :class:`InputFileError` (a ``ValueError``): anything else wrong with the file: not a regular file, empty,
  unreadable, truncated, not a checkpoint / not JSON, wrong structure, keys or shapes.

Checkpoints load without arbitrary unpickling (safetensors, or ``torch.load(weights_only=True)``); the format
is recognised by the file's first bytes, and a safetensors header is checked against the file size (every
tensor's bytes inside the file, exactly covering it) before anything is mapped.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import struct
import tempfile
from typing import Iterator

import torch


class InputFileError(ValueError):
    """A user-given file that cannot be used. ``str(e)`` is ``"<what> '<path>': <reason>"``; ``e.what``,
    ``e.path`` and ``e.reason`` hold the parts (e.g. to name a command-line option instead of ``what``)."""

    def __init__(self, path: str, reason: str, what: str = "checkpoint"):
        super().__init__(f"{what} {path!r}: {reason}")
        self.path, self.reason, self.what = path, reason, what

    def for_option(self, option: str) -> str:
        """The message with ``option`` (e.g. ``--checkpoint``) in place of ``what``."""
        return f"{option} {self.path!r}: {self.reason}"


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular_file(path: str | os.PathLike, what: str = "checkpoint", follow_symlinks: bool = True) -> int:
    """Checks with ``os.stat`` that ``path`` is a regular, non-empty file; returns its size. With
    ``follow_symlinks=False`` a symbolic link is refused too (files that must stay inside a folder).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        InputFileError: a directory, FIFO, socket or device file, a symlink (``follow_symlinks=False``), an empty
            file, or ``stat`` failed.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path!r} does not exist") from None
    except OSError as e:
        raise InputFileError(path, f"cannot be accessed ({e.strerror or e})", what) from None
    if stat.S_ISLNK(st.st_mode):
        raise InputFileError(path, "a symlink: only regular files inside the folder are read", what)
    if not stat.S_ISREG(st.st_mode):
        raise InputFileError(path, f"{_file_kind(st.st_mode)}, not a regular file", what)
    if st.st_size == 0:
        raise InputFileError(path, "the file is empty (0 bytes)", what)
    return st.st_size


@contextlib.contextmanager
def open_regular_file(path: str | os.PathLike, what: str = "checkpoint") -> Iterator:
    """Opens a regular, non-empty file for binary reading (a context manager yielding the file object).

    The file is checked with :func:`check_regular_file` before it is opened, and opened non-blocking and
    checked again with ``fstat``, so a FIFO or device swapped in meanwhile cannot block or be read either.

    Raises:
        FileNotFoundError, InputFileError: as :func:`check_regular_file`; also when the file cannot be opened.
    """
    path = os.fspath(path)
    check_regular_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path!r} does not exist") from None
    except OSError as e:
        raise InputFileError(path, f"cannot be opened ({e.strerror or e})", what) from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputFileError(path, f"{_file_kind(mode)}, not a regular file", what)
        yield f


@contextlib.contextmanager
def naming_file(path: str | None, what: str = "checkpoint") -> Iterator[None]:
    """Re-raises a ``KeyError``, ``TypeError`` or ``ValueError`` raised inside (an error about the content of a
    loaded file) as an :class:`InputFileError` naming ``path``. Does nothing when ``path`` is ``None`` (the caller
    was given an object, not a file: its errors pass unchanged)."""
    if path is None:
        yield
        return
    try:
        yield
    except InputFileError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        reason = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
        raise InputFileError(path, reason, what) from e


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """A JSON file that must hold an object (``{...}``), read through :func:`open_regular_file`.

    Raises:
        FileNotFoundError: missing.
        InputFileError: not a regular file, empty, not UTF-8 JSON, or not an object.
    """
    path = os.fspath(path)
    with open_regular_file(path, what) as f:
        raw = f.read()
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputFileError(path, f"not valid JSON ({e})", what) from None
    if not isinstance(obj, dict):
        raise InputFileError(path, f"holds a JSON {type(obj).__name__}, not an object", what)
    return obj


# --------------------------------------------------------------------------------------------------- safetensors
# safetensors dtype -> (torch dtype name, bytes per element)
SAFETENSORS_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
                      "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
                      "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
                      "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1)}
MAX_SAFETENSORS_HEADER = 100 * 2 ** 20      # the safetensors library's own limit


def _is_dim(v) -> bool:
    return type(v) is int and v >= 0


def read_safetensors_header(f, path: str, size: int, what: str = "checkpoint") -> dict[str, tuple[torch.dtype, list]]:
    """``{name: (dtype, shape)}`` of the safetensors file open as ``f`` (``size`` bytes), checked against the file.

    The header (8-byte little-endian length, then JSON) must fit in the file, every tensor's ``data_offsets``
    must hold exactly ``numel x itemsize`` bytes inside the file, and the tensors must cover the data exactly
    (as the safetensors library requires).

    Raises:
        InputFileError: truncated (the header or a tensor's bytes go past the end of the file), or not / a
            corrupt safetensors file, naming ``path``.
    """
    def bad(reason: str) -> InputFileError:
        return InputFileError(path, reason, what)

    f.seek(0)
    raw = f.read(8)
    if len(raw) < 8:
        raise bad(f"truncated: {size} bytes, shorter than the 8-byte length of a safetensors header")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_SAFETENSORS_HEADER:
        raise bad(f"not a safetensors file (its first 8 bytes give a header length of {n} bytes)")
    if 8 + n > size:
        raise bad(f"truncated: the safetensors header is {n} bytes but the file has only {size - 8} after its "
                  f"8-byte length")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"not a safetensors file (its header is not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise bad(f"not a safetensors file (its header is a JSON {type(header).__name__}, not an object)")
    data_len = size - 8 - n
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"corrupt safetensors header: entry {name!r} lacks dtype, shape or two data_offsets") from None
        if dtype_name not in SAFETENSORS_DTYPES or not hasattr(torch, SAFETENSORS_DTYPES[dtype_name][0]):
            raise bad(f"tensor {name!r} has an unsupported dtype {dtype_name!r}")
        if not isinstance(shape, list) or not all(map(_is_dim, shape)):
            raise bad(f"corrupt safetensors header: tensor {name!r} has shape {shape!r}")
        if not (_is_dim(begin) and _is_dim(end) and begin <= end):
            raise bad(f"corrupt safetensors header: tensor {name!r} has data_offsets {[begin, end]!r}")
        torch_name, itemsize = SAFETENSORS_DTYPES[dtype_name]
        nbytes = math.prod(shape) * itemsize
        if end - begin != nbytes:
            raise bad(f"corrupt safetensors header: tensor {name!r} ({dtype_name} {shape}) needs {nbytes} bytes, its "
                      f"data_offsets span {end - begin}")
        if end > data_len:
            raise bad(f"truncated: tensor {name!r} ends at byte {end} of the data, but the file holds only "
                      f"{data_len} bytes of data")
        spans.append((begin, end, name))
        out[name] = (getattr(torch, torch_name), shape)
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            raise bad(f"corrupt safetensors header: tensor {name!r} starts at byte {begin}, expected {covered} "
                      f"(tensors overlap or leave a gap)")
        covered = end
    if covered != data_len:
        raise bad(f"corrupt safetensors file: {data_len - covered} bytes after its last tensor")
    return out


# --------------------------------------------------------------------------------------------------- checkpoints
def _sniff(head: bytes, path: str) -> str:
    """``"zip"`` (torch.save), ``"pickle"`` (legacy torch.save) or ``"safetensors"``, from the first bytes."""
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[8:9] == b"{":                     # 8-byte header length, then the JSON header
        return "safetensors"
    if head[:1] == b"\x80":                   # pickle protocol >= 2 (torch.save's legacy format)
        return "pickle"
    return "safetensors" if path.endswith(".safetensors") else "unknown"


def error_summary(e: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"`` (at most ``limit`` characters): a library's error, quoted in ours."""
    text = str(e).strip().splitlines()
    line = re.sub(r"\x1b\[[0-9;]*m", "", text[0] if text else "").strip()
    line = line if len(line) <= limit else line[:limit - 3] + "..."
    return f"{type(e).__name__}: {line}".rstrip(": ")


def _torch_load_reason(e: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a line: refused objects, or a truncated / corrupt file."""
    refused = [line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line]
    if refused:
        return ("holds pickled objects other than tensors, which loading with weights_only=True refuses (Weights only "
                f"load failed: {refused[0][:200]})")
    return f"cannot be read as a PyTorch checkpoint: truncated, corrupt or another kind of file ({error_summary(e)})"


def read_checkpoint(path: str | os.PathLike, lazy: bool = False, what: str = "checkpoint") -> dict:
    """Reads a checkpoint without arbitrary unpickling, recognising the format by its first bytes: a PyTorch
    file (zip or legacy pickle) with ``torch.load(map_location="cpu", weights_only=True)``, or safetensors.

    Args:
        lazy: read no tensor data: safetensors tensors become ``meta`` tensors of the header's shapes and
            dtypes, and a zip ``.pt`` is memory-mapped (``mmap=True``), so tensors stay on disk until touched.
        what: how errors name the file.

    Returns:
        The top-level dict (a state dict, or a wrapper such as ``{"generator_ema": ..., ...}``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        InputFileError: not a regular file, empty, truncated, not a checkpoint, refused by ``weights_only``
            (a pickle of other objects), or not holding a dict.
    """
    path = os.fspath(path)
    with open_regular_file(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(16)
        fmt = _sniff(head, path)
        if fmt == "unknown":
            raise InputFileError(path, f"not a PyTorch or safetensors checkpoint (it starts with {head[:8]!r}; "
                                       "truncated, or another kind of file)", what)
        if fmt == "safetensors":
            header = read_safetensors_header(f, path, size, what)
            if lazy:
                return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape) in header.items()}
        else:
            f.seek(0)
            try:
                obj = (torch.load(path, map_location="cpu", weights_only=True, mmap=True) if lazy and fmt == "zip"
                       else torch.load(f, map_location="cpu", weights_only=True))
            except MemoryError:
                raise
            except Exception as e:  # noqa: BLE001  (any reader failure means a malformed or refused file)
                raise InputFileError(path, _torch_load_reason(e), what) from None
    if fmt == "safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415
        try:
            obj = load_file(path)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001
            raise InputFileError(path, f"cannot be read as safetensors ({error_summary(e)})", what) from None
    if not isinstance(obj, dict):
        raise InputFileError(path, f"holds a {type(obj).__name__}, not a dict of tensors", what)
    return obj


def checkpoint_source(source, lazy: bool = False, what: str = "checkpoint") -> tuple[object, str | None]:
    """``(checkpoint object, path or None)``: a path is read with :func:`read_checkpoint`, anything else (an
    already loaded object) is returned as is, with ``None``."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        return read_checkpoint(path, lazy=lazy, what=what), path
    return source, None


def state_dict_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
                        ) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """How ``state`` differs from a module's own state dict ``own``.

    Returns:
        ``(missing, unexpected, bad_shapes)``: keys of ``own`` absent from ``state``, keys of ``state`` absent
        from ``own`` (both sorted), and ``(key, own_shape, state_shape)`` for shared keys whose shapes differ.

    Raises:
        TypeError: a value of ``state`` is not a tensor.
    """
    missing = sorted(set(own) - set(state))
    unexpected = sorted(map(str, set(state) - set(own)))
    not_tensors = sorted(k for k in set(own) & set(state) if not isinstance(state[k], torch.Tensor))
    if not_tensors:
        raise TypeError(f"entries that should be tensors are not: {not_tensors[:10]}")
    bad_shapes = [(k, tuple(own[k].shape), tuple(state[k].shape)) for k in sorted(set(own) & set(state))
                  if tuple(own[k].shape) != tuple(state[k].shape)]
    return missing, unexpected, bad_shapes


# ------------------------------------------------------------------------------------------- outputs and devices
def check_output_dir(path: str | os.PathLike, option: str = "--out") -> str:
    """Checks, writing nothing that stays, that ``path`` can be an output folder: an existing directory we can
    create files in, or a path whose nearest existing ancestor is such a directory. Returns ``path`` as a str.

    Raises:
        ValueError: naming ``option`` and ``path``: it exists and is not a directory, an ancestor is not a
            directory, or it is not writable.
    """
    path = os.fspath(path)
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        if probe == os.path.abspath(path):
            raise ValueError(f"{option} {path!r} exists and is not a directory")
        raise ValueError(f"{option} {path!r} cannot be created: {probe!r} is not a directory")
    writable = os.access(probe, os.W_OK | os.X_OK)
    if writable:
        try:                                  # root passes os.access; read-only file systems do not
            tempfile.TemporaryFile(dir=probe).close()
        except OSError:
            writable = False
    if not writable:
        where = "" if probe == os.path.abspath(path) else f" (cannot create files in {probe!r})"
        raise ValueError(f"{option} {path!r} is not writable{where}")
    return path


def parse_device(value: str, option: str = "--device") -> torch.device:
    """``torch.device(value)`` for ``cpu``, ``cuda`` or ``cuda:N``, checked to exist here.

    Raises:
        ValueError: naming ``option``: not a device name, another device type, CUDA not available, or no
            such GPU.
    """
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{option} {value!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{option} {value!r}: only cpu and cuda (cuda:N) are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {value} but CUDA is not available (use {option} cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {value}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


def device_memory(device: torch.device, available: bool = True) -> int | None:
    """Bytes of memory on ``device``: free now (``available``: ``MemAvailable`` of /proc/meminfo for the host,
    ``cudaMemGetInfo`` for a GPU) or in total; None when the host does not say."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        return free if available else total
    if available:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES" if available else "SC_PHYS_PAGES")
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
