"""stablecore.methods.sharpness against the exact Hessian of small models (float64)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import stablecore.methods._hessian.operator as operator_mod
from stablecore.methods.sharpness import (
    HessianOperator,
    eigenvalue_density,
    hessian_frobenius_norm,
    hessian_trace,
    per_group_sharpness,
    plot_eigenvalue_density,
    softmax_ce_logit_hvp,
    stablemax_ce_logit_hvp,
    top_eigenvalues,
)
from stablecore.testing import assert_close, seed_all

F64 = torch.float64


def mlp(d_in: int, hidden: int, d_out: int, seed: int) -> nn.Module:
    seed_all(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(F64)


def regression(n: int, d_in: int, d_out: int, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(n, d_in, generator=gen, dtype=F64), torch.randn(
        n, d_out, generator=gen, dtype=F64
    )


def exact_hessian(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    """The dense Hessian in the flattened parameters, by torch.autograd.functional.hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(theta):
        parts = theta.split([math.prod(s) for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return loss_fn(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(f, flat)


def within_sigmas(estimate: float, stderr: float, exact: float, sigmas: float = 3.0) -> bool:
    return abs(estimate - exact) <= sigmas * stderr


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    d_in=st.integers(1, 4),
    hidden=st.integers(1, 5),
    d_out=st.integers(1, 3),
    n=st.integers(2, 10),
    seed=st.integers(0, 1000),
)
def test_estimators_match_exact_hessian(d_in, hidden, d_out, n, seed):
    model = mlp(d_in, hidden, d_out, seed)
    x, y = regression(n, d_in, d_out, seed)
    loss = nn.MSELoss()
    H = exact_hessian(model, loss, x, y)
    op = HessianOperator(model, loss, (x, y))
    assert_close(op.dense(), H)
    ev = torch.linalg.eigvalsh(H)
    k = min(3, op.dim)
    res = top_eigenvalues(op, k=k, tol=1e-10)
    assert res.converged
    assert_close(res.eigenvalues, ev.flip(0)[:k], dtype=torch.float32)  # rtol 2e-5 < 1e-4
    small = top_eigenvalues(op, k=1, which="SA", tol=1e-10).eigenvalues
    assert_close(small, ev[:1], dtype=torch.float32)
    est = hessian_trace(op, num_probes=64, seed=seed)
    assert within_sigmas(est.trace, est.stderr, float(H.trace())), (est, float(H.trace()))
    fro = hessian_frobenius_norm(op, num_probes=64, seed=seed)
    assert within_sigmas(fro.norm_sq, fro.stderr_sq, float((H * H).sum())), fro


def test_eigenvectors_and_power_iteration():
    model = mlp(3, 4, 2, 0)
    x, y = regression(12, 3, 2, 0)
    H = exact_hessian(model, nn.MSELoss(), x, y)
    ev, vecs = torch.linalg.eigh(H)
    res = top_eigenvalues(model, nn.MSELoss(), (x, y), k=2, return_eigenvectors=True, tol=1e-10)
    for i in range(2):  # eigenvectors up to sign
        cos = float((res.eigenvectors[i] @ vecs[:, -1 - i]).abs())
        assert_close(torch.tensor(cos), torch.tensor(1.0), dtype=torch.float32)
    top_mag = ev[ev.abs().argmax()]
    pw = top_eigenvalues(
        model, nn.MSELoss(), (x, y), k=1, which="LM", method="power", max_iters=2000, tol=1e-12
    )
    assert_close(pw.eigenvalues, top_mag.reshape(1), dtype=torch.float32)


def test_backends_agree_and_unused_parameters_are_zero():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 2).to(F64)
            self.unused = nn.Linear(2, 2).to(F64)

        def forward(self, x):
            return torch.tanh(self.used(x))

    def mse(out, target):  # by hand: F.mse_loss breaks forward-over-reverse in torch 2.13
        return ((out - target) ** 2).mean()

    seed_all(1)
    model = WithUnused()
    x, y = regression(6, 3, 2, 1)
    dense = {
        b: HessianOperator(model, mse, (x, y), backend=b).dense()
        for b in ("func", "func_rr", "func_loop", "double_backward")
    }
    assert_close(dense["func"], exact_hessian(model, mse, x, y))
    for b in ("func_rr", "func_loop", "double_backward"):
        assert_close(dense[b], dense["func"], msg=b)
    auto = HessianOperator(model, nn.MSELoss(), (x, y))
    assert_close(auto.dense(), exact_hessian(model, nn.MSELoss(), x, y))
    assert auto.backend_used in ("func", "func_rr")  # vmapped, never the per-probe loops
    assert float(dense["func"][8:, :].abs().max()) == 0.0  # rows of the unused layer
    assert float(dense["func"][:8, :8].abs().max()) > 0.0


def test_dataloader_accumulation_equals_full_batch():
    model = mlp(2, 3, 1, 3)
    x, y = regression(12, 2, 1, 3)
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    assert_close(
        HessianOperator(model, nn.MSELoss(), batches).dense(),
        exact_hessian(model, nn.MSELoss(), x, y),
    )


def jacobian_ggn(model, x, logit_hessian):
    """J^T H_out J with J from torch.func.jacrev over the flattened parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def out(theta):
        parts = theta.split([math.prod(s) for s in shapes])
        return functional_call(
            model, {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}, (x,)
        )

    J = torch.func.jacrev(out)(flat).reshape(-1, flat.numel())
    return J.T @ logit_hessian @ J


def test_ggn_softmax_and_stablemax_match_dense():
    seed_all(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    x = torch.randn(5, 3, dtype=F64)
    t = torch.tensor([0, 2, 1, 2, 0])
    z = model(x).detach()
    p = torch.softmax(z, -1)
    blocks = [(torch.diag(pi) - torch.outer(pi, pi)) / 5 for pi in p]
    G = jacobian_ggn(model, x, torch.block_diag(*blocks))
    assert_close(HessianOperator(model, nn.CrossEntropyLoss(), (x, t), kind="ggn").dense(), G)
    assert_close(
        HessianOperator(
            model, nn.CrossEntropyLoss(), (x, t), kind="fisher", loss_hessian="exact"
        ).dense(),
        G,
    )
    # StableMax: the exact logit Hessian minus its indefinite diag((p - e_y) g'') term
    zz = z * 3  # away from 0, where StableMax is smooth

    def smce(logits):
        g = torch.sign(logits) * torch.log1p(logits.abs())
        return nn.functional.cross_entropy(g, t)

    Hz = torch.autograd.functional.hessian(smce, zz).reshape(15, 15)
    ps = torch.softmax(torch.sign(zz) * torch.log1p(zz.abs()), -1)
    g2 = -torch.sign(zz) / (1 + zz.abs()) ** 2
    onehot = nn.functional.one_hot(t, 3).to(F64)
    gn = Hz - torch.diag(((ps - onehot) * g2).reshape(-1)) / 5
    u = torch.randn(5, 3, dtype=F64)
    assert_close(stablemax_ce_logit_hvp(zz, t, u), (gn @ u.reshape(-1)).reshape(5, 3))
    ignore = torch.tensor([0, -100, 1, 2, -100])
    hu = softmax_ce_logit_hvp(z, ignore, u)
    assert float(hu[1].abs().max()) == 0.0
    assert_close(hu[0], (blocks[0] * 5 / 3) @ u[0])


def test_linear_ce_ggn_equals_hessian():
    seed_all(5)
    model = nn.Linear(4, 3).to(F64)
    x, t = torch.randn(7, 4, dtype=F64), torch.randint(0, 3, (7,))
    H = exact_hessian(model, nn.CrossEntropyLoss(), x, t)
    assert_close(HessianOperator(model, nn.CrossEntropyLoss(), (x, t), kind="ggn").dense(), H)


def test_per_group_traces_and_blocks():
    model = mlp(3, 4, 2, 6)
    x, y = regression(10, 3, 2, 6)
    H = exact_hessian(model, nn.MSELoss(), x, y)
    est = hessian_trace(model, nn.MSELoss(), (x, y), num_probes=48, seed=1)
    assert set(est.groups) == {"0", "2"}
    total = sum(v[0] for v in est.groups.values())
    assert_close(torch.tensor(total), torch.tensor(est.trace))
    per = per_group_sharpness(model, nn.MSELoss(), (x, y), num_probes=48)
    blk = H[16:, 16:]  # layer 2: weight 2x4 + bias 2 follow the 16 parameters of layer 0
    assert per["2"]["dim"] == 10
    assert_close(
        torch.tensor(per["2"]["lambda_max"]), torch.linalg.eigvalsh(blk)[-1], dtype=torch.float32
    )
    assert within_sigmas(per["2"]["trace"], per["2"]["trace_stderr"], float(blk.trace()))


def test_adaptive_stopping_reaches_target():
    model = mlp(3, 4, 1, 7)
    x, y = regression(16, 3, 1, 7)
    est = hessian_trace(model, nn.MSELoss(), (x, y), rtol=0.1, probe_batch=8, max_probes=2000)
    assert est.num_probes >= 8 and est.stderr <= 0.1 * abs(est.trace)
    fixed = hessian_trace(model, nn.MSELoss(), (x, y), num_probes=5, probe_batch=4)
    assert fixed.num_probes == 5


def test_spectral_density():
    model = mlp(2, 3, 2, 8)
    x, y = regression(8, 2, 2, 8)
    H = exact_hessian(model, nn.MSELoss(), x, y)
    ev = torch.linalg.eigvalsh(H)
    dens = eigenvalue_density(model, nn.MSELoss(), (x, y), num_steps=H.shape[0], num_probes=3)
    assert_close(dens.weights.sum(-1), torch.ones(3, dtype=F64))
    big = dens.weights > 1e-8  # nodes that carry weight are exact eigenvalues at m = D
    dist = (dens.nodes[big].unsqueeze(-1) - ev).abs().min(-1).values
    assert float(dist.max()) <= 1e-6 * float(ev.abs().max())
    grid = torch.linspace(float(ev[0]) - 1, float(ev[-1]) + 1, 4001, dtype=F64)
    mass = float(dens.evaluate(grid).sum() * (grid[1] - grid[0]))
    assert abs(mass - 1) < 1e-2


def test_plot_density(tmp_path):
    model = mlp(2, 3, 1, 9)
    x, y = regression(6, 2, 1, 9)
    dens = eigenvalue_density(model, nn.MSELoss(), (x, y), num_steps=8, num_probes=2)
    path = plot_eigenvalue_density(dens, tmp_path / "d.png")
    assert path.stat().st_size > 1000


def test_train_mode_is_set_and_restored():
    seed_all(10)
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 1)).to(F64)
    x, y = regression(5, 3, 1, 10)
    model.train()
    op = HessianOperator(model, nn.MSELoss(), (x, y), train=False)
    H = op.dense()
    assert model.training
    model.eval()
    assert_close(H, exact_hessian(model, nn.MSELoss(), x, y))


# ----------------------------------------------------------------------------- bad input
def test_bad_input_errors():
    model = mlp(2, 2, 1, 0)
    x, y = regression(4, 2, 1, 0)
    frozen = mlp(2, 2, 1, 0).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad"):
        hessian_trace(frozen, nn.MSELoss(), (x, y))
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(model, nn.MSELoss(reduction="none"), (x, y))
    with pytest.raises(ValueError, match=r"k must be .*D=9"):
        top_eigenvalues(model, nn.MSELoss(), (x, y), k=10)
    with pytest.raises(ValueError, match="one-shot iterator"):
        HessianOperator(model, nn.MSELoss(), iter([(x, y)]))
    with pytest.raises(ValueError, match=r"D=9"):
        HessianOperator(model, nn.MSELoss(), (x, y)).matvec(torch.ones(3, dtype=F64))
    with pytest.raises(TypeError, match="nn.Module"):
        HessianOperator(lambda t: t, nn.MSELoss(), (x, y))
    with pytest.raises(ValueError, match="not a parameter"):
        HessianOperator(model, nn.MSELoss(), (x, y), params=["nope"])


# ----------------------------------------------------------------------------- fused-op fallback
_REFERENCE = {"on": False}


class SquareNoDoubleBackward(torch.autograd.Function):
    """x^2 with a backward that cannot be differentiated again (like a fused kernel)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


def fused_square(x):
    return x * x if _REFERENCE["on"] else SquareNoDoubleBackward.apply(x)


class FusedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).to(F64)

    def forward(self, x):
        return fused_square(self.lin(x))


@contextlib.contextmanager
def fake_reference_mode():
    _REFERENCE["on"] = True
    try:
        yield
    finally:
        _REFERENCE["on"] = False


def test_fused_op_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(operator_mod, "_reference_mode_factory", lambda: fake_reference_mode)
    seed_all(11)
    model = FusedNet()
    x, y = regression(6, 3, 2, 11)
    op = HessianOperator(model, nn.MSELoss(), (x, y))
    H = op.dense()
    assert op.backend_used.endswith("+reference")
    with fake_reference_mode():
        assert_close(H, exact_hessian(model, nn.MSELoss(), x, y))


def test_fused_op_without_reference_mode_fails_clearly(monkeypatch):
    monkeypatch.setattr(operator_mod, "_reference_mode_factory", lambda: None)
    seed_all(12)
    x, y = regression(6, 3, 2, 12)
    op = HessianOperator(FusedNet(), nn.MSELoss(), (x, y))
    with pytest.raises(RuntimeError, match="no backend could compute.*reference_mode"):
        op.matvec(torch.ones(op.dim, dtype=F64))


def test_stablecore_stablemax_op_hvp():
    ops = pytest.importorskip("stablecore.ops.stablemax")

    class Head(nn.Module):
        def __init__(self, fused):
            super().__init__()
            self.lin, self.fused = nn.Linear(3, 4).to(F64), fused

        def forward(self, x):
            z = self.lin(x)
            if self.fused:
                return ops.log_stablemax(z, dim=-1)
            g = torch.sign(z) * torch.log1p(z.abs())
            return torch.log_softmax(g, -1)

    seed_all(13)
    fused, plain = Head(True), Head(False)
    plain.load_state_dict(fused.state_dict())
    x, t = torch.randn(6, 3, dtype=F64), torch.randint(0, 4, (6,))
    op = HessianOperator(fused, nn.NLLLoss(), (x, t))
    assert_close(op.dense(), exact_hessian(plain, nn.NLLLoss(), x, t))
    assert op.backend_used is not None


# ----------------------------------------------------------------------------- structured R-op backend
_ACTS = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "leaky": lambda: nn.LeakyReLU(0.2),
    "silu": nn.SiLU,
    "gelu": nn.GELU,
}


def _structured_case(act: str, loss_kind: str, hidden: int, n: int, seed: int):
    seed_all(seed)
    a = _ACTS[act]
    model = nn.Sequential(
        nn.Linear(3, hidden),
        a(),
        nn.Sequential(nn.Linear(hidden, 4), nn.Identity(), a()),
        nn.Linear(4, 3),
    ).to(F64)
    x = torch.randn(n, 3, dtype=F64)
    if loss_kind == "mse":
        return model, nn.MSELoss(), x, torch.randn(n, 3, dtype=F64)
    if loss_kind == "mse_sum":
        return model, nn.MSELoss(reduction="sum"), x, torch.randn(n, 3, dtype=F64)
    y = torch.randint(0, 3, (n,))
    if loss_kind == "ce_ignore":  # ignored rows drop out of the loss and of the mean
        y[0] = -100
        return model, nn.CrossEntropyLoss(), x, y
    return model, nn.CrossEntropyLoss(reduction="sum"), x, y


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    act=st.sampled_from(sorted(_ACTS)),
    loss_kind=st.sampled_from(["mse", "mse_sum", "ce_ignore", "ce_sum"]),
    hidden=st.integers(1, 5),
    n=st.integers(2, 9),
    subset=st.sampled_from([None, ("2.0.weight", "3.bias"), ("0.bias",), ("0.weight", "3.weight")]),
    seed=st.integers(0, 1000),
)
def test_structured_backend_matches_exact_hessian(act, loss_kind, hidden, n, subset, seed):
    model, loss, x, y = _structured_case(act, loss_kind, hidden, n, seed)
    op = HessianOperator(model, loss, (x, y), params=subset)
    ref = HessianOperator(model, loss, (x, y), params=subset, backend="double_backward")
    assert_close(op.dense(), ref.dense())  # the batched rules (all D probes at once)
    assert op.backend_used == "structured"
    v = torch.randn(op.dim, dtype=F64, generator=torch.Generator().manual_seed(seed))
    assert_close(op.matvec(v), ref.matvec(v))  # the single-probe rules (Lanczos)
    if subset is None:
        assert_close(op.dense(), exact_hessian(model, loss, x, y))
        assert_close(torch.tensor(op.loss_value, dtype=F64), loss(model(x), y).detach())


def test_structured_cache_follows_parameter_updates():
    model, loss, x, y = _structured_case("tanh", "ce_ignore", 4, 6, 21)
    op = HessianOperator(model, loss, (x, y))
    v = torch.randn(op.dim, dtype=F64)
    before = op.matvec(v)
    with torch.no_grad():  # an optimizer step: in place, bumps the parameter version
        model[0].weight.mul_(1.5)
    after = op.matvec(v)
    assert float((after - before).abs().max()) > 1e-6
    assert_close(after, HessianOperator(model, loss, (x, y), backend="double_backward").matvec(v))


def test_structured_skips_what_it_cannot_serve():
    model, loss, x, y = _structured_case("relu", "mse", 3, 5, 22)
    custom = HessianOperator(model, lambda o, t: ((o - t) ** 2).mean(), (x, y))
    custom.matvec(torch.ones(custom.dim, dtype=F64))
    assert custom.backend_used != "structured"  # an arbitrary callable loss: autograd backends
    dropout = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1), nn.Linear(3, 3)).to(F64)
    op = HessianOperator(dropout, loss, (x, y), train=False)
    assert_close(op.dense(), exact_hessian(dropout.eval(), loss, x, y))
    assert op.backend_used != "structured"
    with pytest.raises(RuntimeError, match="Dropout.*no R-op rule"):
        HessianOperator(dropout, loss, (x, y), backend="structured").matvec(
            torch.ones(op.dim, dtype=F64)
        )


@pytest.mark.parametrize("block", [2, 3])
def test_block_lanczos_matches_exact(block):
    model, loss, x, y = _structured_case("tanh", "ce_sum", 3, 8, 23)
    H = exact_hessian(model, loss, x, y)
    ev, vecs = torch.linalg.eigh(H)
    res = top_eigenvalues(
        model, loss, (x, y), k=2, block_size=block, tol=1e-10, return_eigenvectors=True
    )
    assert res.method == "block_lanczos" and res.converged
    assert res.num_matvecs % block == 0 and res.num_matvecs <= H.shape[0] + block
    assert_close(res.eigenvalues, ev.flip(0)[:2], dtype=torch.float32)
    cos = (res.eigenvectors[0] @ vecs[:, -1]).abs()
    assert_close(cos, torch.tensor(1.0, dtype=F64), dtype=torch.float32)
    low = top_eigenvalues(model, loss, (x, y), k=1, which="SA", block_size=block, tol=1e-10)
    assert_close(low.eigenvalues, ev[:1], dtype=torch.float32)
    capped = top_eigenvalues(model, loss, (x, y), k=1, block_size=block, max_iters=4 * block, tol=0)
    assert capped.num_matvecs == 4 * block  # max_iters counts matvecs, not block steps
    with pytest.raises(ValueError, match="block_size"):
        top_eigenvalues(model, loss, (x, y), block_size=0)


def test_forward_over_reverse_through_nn_mse_loss():
    # torch 2.13's forward-mode AD of mse_loss's backward fails ("ZeroTensors are immutable");
    # the operator writes MSE out for torch.func, so every backend works with nn.MSELoss
    seed_all(24)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    x, y = regression(6, 3, 2, 24)
    exact = exact_hessian(model, nn.MSELoss(), x, y)
    for backend in ("func", "func_loop", "func_rr", "double_backward"):
        op = HessianOperator(model, nn.MSELoss(reduction="sum"), (x, y), backend=backend)
        assert_close(op.dense(), exact * x.shape[0] * 2, msg=backend)
        assert op.backend_used == backend
    ggn = HessianOperator(model, nn.MSELoss(), (x, y), kind="ggn", loss_hessian="exact")
    assert_close(ggn.dense(), jacobian_ggn(model, x, torch.eye(12, dtype=F64) / 6))


def test_module_used_twice_is_measured_and_left_intact():
    # the same Linear at two places: no structured rule (shared parameters), and torch.func's
    # functional_call would leave it without storage, so the operator uses double backward
    seed_all(25)
    lin = nn.Linear(3, 3).to(F64)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(3, 2).to(F64))
    x, y = torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,))
    op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    H = op.dense()
    assert op.backend_used == "double_backward"
    assert all(p.data_ptr() for p in model.parameters())  # still real tensors
    assert_close(H, exact_hessian(model, nn.CrossEntropyLoss(), x, y))
