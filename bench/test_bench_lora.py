"""LoRA linear forward, and forward+backward with a frozen base, against its peers.

GPU size (ANCHORS.md): x [8192, 4096], W [4096, 4096], r = 16, bf16. Peers in the same process:
the base matmul alone (the limit), eager ``F.linear(x, W) + s * B(A x)``, peft ``lora.Linear``.
For forward+backward with a frozen base the limit is about two base matmuls (ANCHORS: 0.76 ms),
recorded as ``floor_s`` = 2 x the base forward measured in this run.
``stablecore`` is the op ``stablecore::lora_linear``: on CUDA one Triton GEMM reads x once for
W and A and adds s·(xAᵀ)Bᵀ in its epilogue (kernels/lora.py); on CPU the reference.
No GPU number for the Triton kernel has been measured yet (it was written without a GPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, SMOKE

from stablecore.nn.lora import lora_linear

M, K, N, R = (256, 128, 128, 16) if SMOKE else (8192, 4096, 4096, 16)
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
SCALING = 2.0


def _tensors():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    mk = lambda *s: (torch.randn(s, device=DEVICE, generator=gen) / s[-1] ** 0.5).to(DTYPE)
    return mk(M, K), mk(N, K), mk(R, K), mk(N, R)


def _peft_layer(w, a, b):
    peft = pytest.importorskip("peft")
    base = torch.nn.Linear(K, N, bias=False, device=DEVICE, dtype=DTYPE)
    base.weight.data.copy_(w)
    cfg = peft.LoraConfig(r=R, lora_alpha=SCALING * R, target_modules=["lin"])
    holder = torch.nn.Module()
    holder.lin = base
    model = peft.inject_adapter_in_model(cfg, holder)
    model.lin.lora_A["default"].weight.data.copy_(a)
    model.lin.lora_B["default"].weight.data.copy_(b)
    model.lin.base_layer.weight.requires_grad_(False)
    return model.lin


def _impl(name, w, a, b):
    if name == "stablecore":
        return lambda x: lora_linear(x, w, None, a, b, SCALING)
    if name == "eager W x + B(A x)":
        return lambda x: F.linear(x, w) + SCALING * F.linear(F.linear(x, a), b)
    if name == "peft LoRA":
        return _peft_layer(w, a, b)
    if name == "base matmul (limit)":
        return lambda x: F.linear(x, w)
    raise KeyError(name)


IMPLS = ["stablecore", "eager W x + B(A x)", "peft LoRA", "base matmul (limit)"]


@pytest.mark.parametrize("impl", IMPLS)
@torch.no_grad()
def test_lora_forward(measure, impl):
    x, w, a, b = _tensors()
    fn = _impl(impl, w, a, b)
    fn(x)
    measure(lambda: fn(x), case=f"LoRA forward x[{M},{K}] W[{N},{K}] r{R} {DTYPE}", impl=impl)


@pytest.mark.parametrize("impl", IMPLS[:3])
def test_lora_forward_backward_frozen_base(measure, impl):
    x, w, a, b = _tensors()
    x.requires_grad_()
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    fn = _impl(impl, w, a, b)
    if impl == "peft LoRA":  # peft holds copies of a, b as its own Parameters
        params = [x, fn.lora_A["default"].weight, fn.lora_B["default"].weight]
    else:
        params = [x, a, b]
    grad = torch.randn(M, N, device=DEVICE, dtype=DTYPE)

    def step():
        torch.autograd.grad(fn(x), params, grad)

    step()
    measure(step, case=f"LoRA fwd+bwd frozen base x[{M},{K}] W[{N},{K}] r{R} {DTYPE}", impl=impl)
