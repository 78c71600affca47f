"""StableMaxCrossEntropyLoss: a module over the fused op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stablecore.nn.losses import StableMaxCrossEntropyLoss
from stablecore.testing import assert_close, seed_all


def oracle(x, t, **kw):
    xd = x.detach().double().requires_grad_()
    loss = F.cross_entropy(torch.sign(xd) * torch.log1p(xd.abs()), t, **kw)
    (grad,) = torch.autograd.grad(loss, xd)
    return loss.detach(), grad


@pytest.mark.parametrize("inplace", [False, True])
def test_module_matches_oracle(inplace):
    seed_all(0)
    x = torch.randn(6, 19) * 20
    t = torch.randint(0, 19, (6,))
    t[1] = 3
    loss_fn = StableMaxCrossEntropyLoss(ignore_index=3, label_smoothing=0.1, inplace_grad=inplace)
    leaf = x.clone().requires_grad_()
    loss = loss_fn(leaf * 1, t)
    loss.backward()
    ref, ref_grad = oracle(x, t, ignore_index=3, label_smoothing=0.1)
    assert_close(loss, ref)
    assert_close(leaf.grad, ref_grad)


def test_module_reduction_none_repr_and_state_dict():
    loss_fn = StableMaxCrossEntropyLoss(reduction="none")
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    out = loss_fn(x, torch.randint(0, 7, (2, 3)))
    assert out.shape == (2, 3) and out.dtype == torch.float64
    assert "reduction='none'" in repr(loss_fn)
    clone = StableMaxCrossEntropyLoss(reduction="none")
    clone.load_state_dict(loss_fn.state_dict())
    assert torch.equal(
        clone(x, torch.zeros(2, 3, dtype=torch.long)),
        loss_fn(x, torch.zeros(2, 3, dtype=torch.long)),
    )


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        StableMaxCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        StableMaxCrossEntropyLoss(label_smoothing=-0.1)
