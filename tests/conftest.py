"""Shared test fixtures: the devices to run on and the official golden data."""
from __future__ import annotations

import os

import pytest
import torch

import lrag_ext
from lrag_ext import emulated_cuda

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The official golden data, trimmed to what the tests read (tests/fixtures/README.md); LRAG_FIXTURES overrides it.
FIXTURES = os.environ.get("LRAG_FIXTURES") or os.path.join(REPO, "tests", "fixtures")

HAS_CUDA = torch.cuda.is_available()
CUDA_KERNELS = HAS_CUDA and lrag_ext.build_info()["cuda"]
EMULATED_CUDA = emulated_cuda.available()
# CI builds the emulator (.ci/run sets LRAG_REQUIRE_EMU=1): there a missing or broken _C_emu must fail the run,
# not skip every emu case.
if not EMULATED_CUDA and os.environ.get("LRAG_REQUIRE_EMU") == "1":
    emulated_cuda.module()  # raises the ImportError that says why


class EmulatedDevice(str):
    """The "emu" device of the tests: tensors live on the CPU ("cpu" is what torch sees), and every lrag_ext op
    runs the CUDA host code and kernels on the CPU emulator (lrag_ext.emulated_cuda)."""

    emulated = True


EMU = EmulatedDevice("cpu")

# Every op test is parametrised over these: the CPU kernels; the CUDA kernels where a GPU and a CUDA build exist;
# the same CUDA code on the CPU emulator wherever lrag_ext._C_emu was built (every default build).
DEVICES = ["cpu",
           pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_KERNELS, reason="no CUDA device/kernels")),
           pytest.param("emu", marks=pytest.mark.skipif(not EMULATED_CUDA, reason="built with LRAG_EXT_EMU=0"))]


def cuda_code(device) -> bool:
    """Whether ops on `device` run the CUDA host code (real GPU or emulator), whose semantics differ from the CPU
    kernels' where documented (e.g. no value checks that would need a host synchronisation)."""
    return device == "cuda" or getattr(device, "emulated", False)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the tiny models'
    ops gain nothing from more threads, and on a busy machine OpenMP spinning makes 2 threads several times slower
    (measured: the tiny-VAE test 19 s vs 0.6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The emulator's schedule seed: vary it (LRAG_EMU_SEED=n) to explore other interleavings and block orders.
EMU_SEED = int(os.environ.get("LRAG_EMU_SEED", "0"))


def _enter_device(request):
    """Yields the device of request.param; for "emu", with the ops routed to the emulator meanwhile."""
    if request.param == "emu":
        marker = request.node.get_closest_marker("registration_only")
        if marker is not None:
            pytest.skip(marker.kwargs.get("reason", "checks op registration, not kernels"))
        with emulated_cuda.enabled(seed=EMU_SEED):
            yield EMU
    else:
        yield request.param


@pytest.fixture(params=DEVICES)
def device(request):
    """The device a test's tensors go to; for "emu", the test body runs with the ops routed to the emulator."""
    yield from _enter_device(request)


@pytest.fixture(params=DEVICES[1:])
def cuda_code_device(request):
    """Like `device`, for tests of behaviour specific to the CUDA host code: a real GPU and the emulator."""
    yield from _enter_device(request)


def fixture_path(name: str) -> str:
    path = os.path.join(FIXTURES, name)
    if not os.path.exists(path):
        hint = ("LRAG_FIXTURES is set: unset it to use tests/fixtures, which ships with the repository"
                if os.environ.get("LRAG_FIXTURES") else
                "tests/fixtures ships with the repository; regenerate it with `python tests/fixtures/trim.py "
                "SRC_DIR` from the upstream fixtures/official folder (tests/fixtures/README.md)")
        pytest.fail(f"official fixture {path} is missing ({hint})")
    return path


def read_video(path):
    """Every frame of a video file, ``uint8 [N, H, W, 3]`` (imageio, imported here: only the CLI tests need it)."""
    import imageio.v2 as imageio
    import numpy as np

    reader = imageio.get_reader(path)
    try:
        return np.stack([frame for frame in reader.iter_data()])
    finally:
        reader.close()


def cli_error(argv, capsys) -> str:
    """Runs ``lrag argv``, which must stop with a user error (exit status 2); returns its stderr."""
    from lrag import cli

    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err
