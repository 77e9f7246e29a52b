"""CPU benchmarks of the embedder on one block (3 latent frames of 16 x 60 x 104), pytest-benchmark.

    .venv/bin/python -m pytest -q benchmarks/bench_embed.py --benchmark-only

Each case checks its result against the unfused PyTorch path before timing. Groups:
- ``block``: the whole embedding of a block: the reference-style module (unfused PyTorch ``encode``) vs ours
  (conv trunk + fused ``embed_head``), NCHW and channels-last, and the pooled embedder (op vs unfused);
- ``head``: the encoder tail alone on the trunk output ``[3, 256, 8, 13]``: unfused vs ``embed_head``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import ALL_THREADS, torch_threads
from embed_models import perturbed_ae

from lrag_ext import ops
from lrag_ext.embedder import PooledEmbedder

BLOCK = (3, 16, 60, 104)
THREADS = sorted({1, ALL_THREADS})


@pytest.fixture(params=THREADS, autouse=True, ids=lambda t: f"threads{t}")
def threads(request, benchmark):
    """Every case at 1 thread and at all threads (the shared machine makes multi-thread timings noisy)."""
    benchmark.extra_info["threads"] = request.param
    with torch_threads(request.param):
        yield request.param


@pytest.fixture(scope="module")
def ae():
    return perturbed_ae()


@pytest.fixture(scope="module")
def frames():
    return torch.randn(*BLOCK, generator=torch.Generator().manual_seed(1))


def _info(benchmark, **kw):
    benchmark.extra_info.update(kw)


def _gbps(benchmark, nbytes: int) -> float | None:
    """Frame bytes read per second of the timed call (None when timing is disabled)."""
    return nbytes / benchmark.stats.stats.mean / 1e9 if benchmark.stats else None


@pytest.mark.benchmark(group="block")
def test_block_reference_unfused(benchmark, ae, frames):
    with torch.no_grad():
        out = benchmark(ae.encode, frames)
    torch.testing.assert_close(out, ae.embed(frames), rtol=1e-4, atol=1e-5)
    _info(benchmark, frames=BLOCK[0], impl="torch encode (unfused head)")


@pytest.mark.benchmark(group="block")
def test_block_fused_head(benchmark, ae, frames):
    with torch.no_grad():
        want = ae.encode(frames)
    out = benchmark(ae.embed, frames)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    _info(benchmark, frames=BLOCK[0], impl="trunk + embed_head")


@pytest.mark.benchmark(group="block")
def test_block_fused_head_channels_last(benchmark, ae, frames):
    with torch.no_grad():
        want = ae.encode(frames)
    model = perturbed_ae().to(memory_format=torch.channels_last)
    x = frames.to(memory_format=torch.channels_last)
    out = benchmark(model.embed, x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    _info(benchmark, frames=BLOCK[0], impl="channels-last trunk + embed_head")


@pytest.fixture(scope="module")
def pooled():
    torch.manual_seed(0)
    return PooledEmbedder(in_channels=16, grid=4, latent_dim=1024).eval()


@pytest.mark.benchmark(group="block")
def test_block_pooled_unfused(benchmark, pooled, frames):
    with torch.no_grad():
        out = benchmark(pooled.encode, frames)
    torch.testing.assert_close(out, pooled.embed(frames), rtol=1e-4, atol=1e-5)
    _info(benchmark, frames=BLOCK[0], impl="torch adaptive_avg_pool2d + linear + normalize",
          gbps=_gbps(benchmark, frames.numel() * 4))


@pytest.mark.benchmark(group="block")
def test_block_pooled_op(benchmark, pooled, frames):
    with torch.no_grad():
        want = pooled.encode(frames)
    out = benchmark(pooled.embed, frames)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    _info(benchmark, frames=BLOCK[0], impl="pooled_embed op",
          gbps=_gbps(benchmark, frames.numel() * 4))


@pytest.fixture(scope="module")
def head_args(ae, frames):
    with torch.no_grad():
        feat = ae.encoder.trunk(frames)
    norm = ae.encoder.final_norm[0]
    return feat, (norm.weight.detach(), norm.bias.detach(), ae.encoder.fc.weight.detach(),
                  ae.encoder.fc.bias.detach(), norm.num_groups, norm.eps)


@pytest.mark.benchmark(group="head")
def test_head_unfused(benchmark, ae, head_args):
    feat, _ = head_args

    def run():
        with torch.no_grad():
            return F.normalize(ae.encoder.head(feat), dim=-1)
    out = benchmark(run)
    torch.testing.assert_close(out, ops.embed_head(feat, *head_args[1]), rtol=1e-4, atol=1e-5)
    _info(benchmark, shape=list(feat.shape), impl="GroupNorm, SiLU, mean, Linear, normalize")


@pytest.mark.benchmark(group="head")
def test_head_fused(benchmark, ae, head_args):
    feat, params = head_args
    with torch.no_grad():
        want = F.normalize(ae.encoder.head(feat), dim=-1)
    out = benchmark(ops.embed_head, feat, *params)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    _info(benchmark, shape=list(feat.shape), impl="embed_head op")
