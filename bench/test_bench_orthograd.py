"""⊥Grad projection over a model's worth of tensors: fused multi-tensor op vs per-tensor eager.

Peers, same process and run: the authors' per-tensor loop (plain PyTorch, one set of kernels per
tensor) and pytorch-optimizer's ``OrthoGrad.apply_orthogonal_gradients`` (its foreach path on
CUDA). Sizes: a GPT-2-small-like list of tensors (~85M parameters, 148 tensors) on CUDA; a tiny
list on CPU or with ``STABLECORE_BENCH_SMOKE=1``. The floor is the bytes of the fused op (read w
and g twice, write g once) over the measured H100 bandwidth (3.0 TB/s, ``ANCHORS.md``).
"""

from __future__ import annotations

import os

import pytest
import torch

from stablecore.ops import orthogonalize as ops

SMOKE = os.environ.get("STABLECORE_BENCH_SMOKE", "") == "1" or not torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BANDWIDTH = 3.0e12  # bytes/s, measured H100 (ANCHORS.md)


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    layers, d = (2, 64) if SMOKE else (12, 768)
    shapes = [(50257 if not SMOKE else 512, d)]
    for _ in range(layers):
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
        shapes += [(d,)] * 4  # two LayerNorms
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen, device=DEVICE).to(dtype))
        p.grad = torch.randn(s, generator=gen, device=DEVICE).to(dtype)
        params.append(p)
    return params


def _per_tensor_eager(params, eps=1e-30):
    # The authors' loop: one projection per tensor, each a handful of kernels.
    for p in params:
        w, g = p.detach().view(-1), p.grad.view(-1)
        proj = torch.dot(w, g) / (torch.dot(w, w) + eps)
        g_perp = g - proj * w
        g_perp.mul_(g.norm(2) / (g_perp.norm(2) + eps))
        p.grad.copy_(g_perp.view_as(p.grad))


def _fused(params):
    ops.orthogonalize_([p.detach() for p in params], [p.grad for p in params])


def _pytorch_optimizer(params):
    pyo = pytest.importorskip("pytorch_optimizer")
    wrapper = pyo.OrthoGrad(torch.optim.SGD, params=params, lr=0.1)
    return lambda ps: wrapper.apply_orthogonal_gradients(ps)


def _timed(fn, params):
    def call():
        fn(params)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    return call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("peer", ["stablecore fused", "per-tensor eager", "pytorch-optimizer"])
def test_bench_orthogonalize(benchmark, peer, dtype):
    if SMOKE and dtype == torch.bfloat16:
        pytest.skip("bf16 runs at full size on CUDA only")
    params = _params(dtype)
    fn = {"stablecore fused": _fused, "per-tensor eager": _per_tensor_eager}.get(peer)
    if fn is None:
        fn = _pytorch_optimizer(params)
    n = sum(p.numel() for p in params)
    nbytes = 5 * n * params[0].element_size()  # fused op: read w, g twice; write g once
    fn(params)  # warm-up: compiles, builds the cached address tables
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    benchmark(_timed(fn, params))
    benchmark.extra_info.update(
        peer=peer,
        dtype=str(dtype),
        device=DEVICE,
        tensors=len(params),
        elements=n,
        floor_ms=nbytes / BANDWIDTH * 1e3 if DEVICE == "cuda" else None,
        peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else None,
    )
    for p in params:  # every peer keeps gradients finite and orthogonal to their weights
        w, g = p.detach().double().view(-1), p.grad.double().view(-1)
        assert torch.isfinite(g).all()
        assert abs(float(w @ g)) <= 1e-2 * float(w.norm() * g.norm()) + 1e-12
