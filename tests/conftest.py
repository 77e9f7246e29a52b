"""Shared test fixtures: the devices to run on and the official golden data."""
from __future__ import annotations

import os

import pytest
import torch

import lrag_ext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.environ.get("LRAG_FIXTURES", os.path.join(os.path.dirname(REPO), "shared", "fixtures", "official"))

HAS_CUDA = torch.cuda.is_available()
CUDA_KERNELS = HAS_CUDA and lrag_ext.build_info()["cuda"]

# Every op test is parametrised over these; CUDA runs only where a GPU and CUDA kernels exist.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_KERNELS, reason="no CUDA device/kernels"))]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def fixture_path(name: str) -> str:
    path = os.path.join(FIXTURES, name)
    if not os.path.exists(path):
        pytest.fail(f"official fixture {path} is missing (set LRAG_FIXTURES to the fixtures/official folder)")
    return path
