"""⊥Grad: the op (reference and Triton under the interpreter), the optimizer wrapper, the metric."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stablecore import _backends
from stablecore.ops import orthogonalize as ops
from stablecore.ops import reference_mode
from stablecore.optim.orthograd import OrthoGrad, nlm_alignment, orthogonalize_
from stablecore.testing import assert_close, seed_all
from stablecore.testing.strategies import float_dtypes, shapes, tensors

TRITON_INTERPRET = _backends.environment().triton_interpret


def oracle(w: torch.Tensor, g: torch.Tensor, renorm: bool = True) -> torch.Tensor:
    """The authors' per-tensor formula in float64, with the two documented edge cases."""
    w64, g64 = w.double().reshape(-1), g.double().reshape(-1)
    ww = w64 @ w64
    if ww == 0:
        return g.double()
    perp = g64 - (w64 @ g64) / ww * w64
    if perp.norm() <= ops.PARALLEL_RTOL * g64.norm():
        return torch.zeros_like(g, dtype=torch.float64)
    if renorm:
        perp = perp * g64.norm() / perp.norm()
    return perp.reshape(g.shape)


@st.composite
def tensor_lists(draw, dtype, sides=(1, 9)):
    n = draw(st.integers(1, 4))
    pairs = []
    for _ in range(n):
        shape = draw(shapes(1, 3, *sides))
        pairs.append((draw(tensors(shape, dtype)), draw(tensors(shape, dtype))))
    return [w for w, _ in pairs], [g for _, g in pairs]


# ----------------------------------------------------------------------------- reference tier
@settings(max_examples=15, deadline=None)
@given(data=st.data(), dtype=float_dtypes(), renorm=st.booleans())
def test_reference_matches_float64_oracle(data, dtype, renorm):
    ws, gs = data.draw(tensor_lists(dtype))
    expected = [oracle(w, g, renorm) for w, g in zip(ws, gs)]
    with reference_mode():
        ops.orthogonalize_(ws, gs, renorm=renorm)
    for g, e in zip(gs, expected):
        assert_close(g, e, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projection_properties(dtype):
    seed_all(0)
    w, g = torch.randn(37, 11, dtype=dtype), torch.randn(37, 11, dtype=dtype)
    g_orig = g.clone()
    ops.orthogonalize_([w], [g])
    # orthogonal to w, same norm as before, and not the unchanged gradient
    assert abs(float((w * g).sum())) <= 1e-6 * float(w.norm() * g_orig.norm())
    assert_close(g.norm(), g_orig.norm())
    assert not torch.allclose(g, g_orig)


def test_zero_weight_returns_gradient_unchanged_and_parallel_gives_zero():
    seed_all(1)
    w0, g0 = torch.zeros(5), torch.randn(5)
    w1 = torch.randn(7)
    g1 = -3.0 * w1
    g0_copy = g0.clone()
    ops.orthogonalize_([w0, w1], [g0, g1])
    assert torch.equal(g0, g0_copy)  # bit for bit, no NaN
    assert torch.equal(g1, torch.zeros_like(g1))  # nothing orthogonal is left


def test_non_contiguous_gradient():
    seed_all(6)
    w, g = torch.randn(8, 6), torch.randn(6, 8).t()
    expected = oracle(w, g)
    ops.orthogonalize_([w], [g])
    assert_close(g, expected)


def test_fp16_zero_weight_has_no_nan():
    # The authors' eps=1e-30 underflows in float16 (0/0 for a zero-initialised tensor).
    w, g = torch.zeros(8, dtype=torch.float16), torch.randn(8).half()
    keep = g.clone()
    ops.orthogonalize_([w], [g])
    assert torch.equal(g, keep)


def test_stats_and_nlm_alignment():
    seed_all(2)
    w1, w2 = torch.randn(6, 4), torch.randn(9)
    g1, g2 = -2.0 * w1, torch.randn(9)
    g2 = g2 - (g2 @ w2) / (w2 @ w2) * w2  # orthogonal to w2
    stats = ops.orthogonalize_stats([w1, w2], [g1, g2])
    assert stats.dtype == torch.float64 and stats.shape == (2, 3)
    assert_close(stats[0], torch.stack([-2 * w1.double().pow(2).sum(), w1.double().pow(2).sum(),
                                        4 * w1.double().pow(2).sum()]), dtype=torch.float32)  # fmt: skip
    p1, p2 = torch.nn.Parameter(w1), torch.nn.Parameter(w2)
    p1.grad, p2.grad = g1, g2
    align = nlm_alignment([p1, p2])
    assert_close(
        align.per_tensor, torch.tensor([1.0, 0.0], dtype=torch.float64), dtype=torch.float32
    )
    flat_w, flat_g = torch.cat([w1.reshape(-1), w2]), torch.cat([g1.reshape(-1), g2])
    expected = -(flat_w @ flat_g) / (flat_w.norm() * flat_g.norm())
    assert_close(align.total, expected.double(), dtype=torch.float32)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        ops.orthogonalize_([torch.randn(3)], [torch.randn(4)])
    with pytest.raises(ValueError, match="2 weights but 1"):
        ops.orthogonalize_([torch.randn(3), torch.randn(3)], [torch.randn(3)])
    with pytest.raises(TypeError, match="torch.int64"):
        ops.orthogonalize_([torch.arange(3)], [torch.randn(3)])
    with pytest.raises(TypeError, match="Optimizer subclass or instance"):
        OrthoGrad([torch.nn.Parameter(torch.randn(2))], base_optimizer="adamw")
    p = torch.nn.Parameter(torch.randn(2))
    with pytest.raises(TypeError, match="instance"):
        OrthoGrad(None, torch.optim.AdamW([p]), lr=1.0)
    with pytest.raises(ValueError, match="differ"):
        OrthoGrad([torch.nn.Parameter(torch.randn(2))], torch.optim.AdamW([p]))


def test_opcheck():
    seed_all(3)
    ws = [torch.randn(5, 3), torch.randn(4)]
    gs = [torch.randn(5, 3), torch.randn(4)]
    torch.library.opcheck(torch.ops.stablecore.orthogonalize_.default, (ws, gs, True))
    torch.library.opcheck(torch.ops.stablecore.orthogonalize_stats.default, (ws, gs))


# ----------------------------------------------------------------------------- optimizer
def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3, bias=False)
    )


def _loss(model, seed):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    return torch.nn.functional.cross_entropy(model(x), y)


def _train(model, opt, steps, start=0, manual=None):
    for s in range(start, start + steps):
        opt.zero_grad()
        _loss(model, s).backward()
        if manual is not None:
            orthogonalize_(model.parameters(), renorm=manual)
        opt.step()


HYPER = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-25, weight_decay=0.0, amsgrad=True)


def test_hyperparameters_pass_through_regression_g11():
    # The authors' script rebuilt AdamW from lr and weight_decay only (issue #11).
    a, b, c = _model(), _model(), _model()
    opt = OrthoGrad(a.parameters(), torch.optim.AdamW, **HYPER)
    group = opt.base_optimizer.param_groups[0]
    assert all(group[k] == v for k, v in HYPER.items())
    _train(a, opt, 5)
    _train(b, torch.optim.AdamW(b.parameters(), **HYPER), 5, manual=True)
    _train(c, torch.optim.AdamW(c.parameters(), lr=3e-2, weight_decay=0.0), 5, manual=True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not all(torch.allclose(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_wraps_instance_and_sgd_without_renorm():
    a, b = _model(), _model()
    opt = OrthoGrad(None, torch.optim.SGD(a.parameters(), lr=0.5, momentum=0.8), renorm=False)
    _train(a, opt, 4)
    _train(b, torch.optim.SGD(b.parameters(), lr=0.5, momentum=0.8), 4, manual=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_state_dict_round_trip_and_scheduler():
    a = _model()
    opt = OrthoGrad(a.parameters(), torch.optim.AdamW, renorm=False, **HYPER)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for s in range(3):
        _train(a, opt, 1, start=s)
        sched.step()
    b = copy.deepcopy(a)
    opt_b = OrthoGrad(b.parameters(), torch.optim.AdamW, lr=1.0)  # wrong lr, fixed by the load
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt_b.param_groups[0]["renorm"] is False
    assert opt_b.param_groups is opt_b.base_optimizer.param_groups
    assert opt_b.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 3e-2 * 0.5
    _train(a, opt, 3, start=3)
    _train(b, opt_b, 3, start=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_param_groups_per_group_options_and_add_param_group():
    a, b = _model(), _model()
    la, lb = list(a.parameters()), list(b.parameters())
    opt = OrthoGrad(
        [{"params": la[:2], "lr": 1e-2}, {"params": la[2:3], "orthogonalize": False}],
        torch.optim.Adam, lr=5e-2,
    )  # fmt: skip
    opt.add_param_group({"params": la[3:], "renorm": False})
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 5e-2, 5e-2]
    assert len(opt.base_optimizer.param_groups) == 3
    ref = torch.optim.Adam(
        [{"params": lb[:2], "lr": 1e-2}, {"params": lb[2:3]}, {"params": lb[3:]}], lr=5e-2
    )
    for s in range(3):
        opt.zero_grad()
        ref.zero_grad()
        _loss(a, s).backward()
        _loss(b, s).backward()
        orthogonalize_(lb[:2], renorm=True)
        orthogonalize_(lb[3:], renorm=False)
        opt.step()
        ref.step()
    for pa, pb in zip(la, lb):
        assert torch.equal(pa, pb)


def test_wraps_stablecore_stable_spam():
    stable_spam = pytest.importorskip("stablecore.optim.stable_spam")
    a, b = _model(), _model()
    kw = dict(lr=1e-2, gamma1=0.8, theta=0.99, update_proj_gap=3)
    opt = OrthoGrad(a.parameters(), stable_spam.StableSPAM, **kw)
    assert opt.base_optimizer.param_groups[0]["gamma1"] == 0.8  # passed through
    _train(a, opt, 4)
    _train(b, stable_spam.StableSPAM(b.parameters(), **kw), 4, manual=True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    c = copy.deepcopy(a)
    opt_c = OrthoGrad(None, stable_spam.StableSPAM(c.parameters(), **kw))
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(a, opt, 2, start=4)
    _train(c, opt_c, 2, start=4)
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.equal(pa, pc)


def test_closure_is_evaluated_with_grad():
    a = _model()
    opt = OrthoGrad(a.parameters(), lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = _loss(a, 0)
        loss.backward()
        return loss

    assert torch.isfinite(opt.step(closure))


# ----------------------------------------------------------------------------- interpret tier
@settings(max_examples=8, deadline=None)
@given(data=st.data(), dtype=float_dtypes(), renorm=st.booleans())
@pytest.mark.interpret
@pytest.mark.skipif(not TRITON_INTERPRET, reason="needs TRITON_INTERPRET=1")
def test_triton_matches_reference(data, dtype, renorm):
    ws, gs = data.draw(tensor_lists(dtype, sides=(1, 70)))
    # one tensor across chunk boundaries (BLOCK = 4096 elements)
    n = data.draw(st.sampled_from([4095, 4096, 4097, 9000]))
    ws.append(data.draw(tensors((n,), dtype)))
    gs.append(data.draw(tensors((n,), dtype)))
    gs_ref = [g.clone() for g in gs]
    stats = ops.orthogonalize_stats(ws, gs)
    # The kernel sums exact float64 products: it matches a float64 oracle to float64 accuracy.
    oracle_stats = torch.tensor(
        [[float(w.double().flatten() @ g.double().flatten()), float(w.double().norm() ** 2),
          float(g.double().norm() ** 2)] for w, g in zip(ws, gs)], dtype=torch.float64,
    )  # fmt: skip
    assert_close(stats, oracle_stats, dtype=torch.float64)
    with reference_mode():
        ops.orthogonalize_(ws, gs_ref, renorm=renorm)
    ops.orthogonalize_(ws, gs, renorm=renorm)
    for g, r in zip(gs, gs_ref):
        assert_close(g, r, dtype=dtype)


@pytest.mark.interpret
@pytest.mark.skipif(not TRITON_INTERPRET, reason="needs TRITON_INTERPRET=1")
def test_triton_edge_cases_and_groups(monkeypatch):
    from stablecore.kernels import orthogonalize as kernels

    calls = []
    real = kernels.partial_stats
    monkeypatch.setattr(kernels, "partial_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    seed_all(4)
    ws = [torch.zeros(10), torch.randn(5000), torch.randn(3, 3).half(), torch.randn(0)]
    gs = [torch.randn(10), 2.0 * ws[1], torch.randn(3, 3).half(), torch.randn(0)]
    expected = [oracle(w, g) for w, g in zip(ws, gs)]
    ops.orthogonalize_(ws, gs)  # two dtype groups: one launch pair each
    assert len(calls) == 2  # the Triton path ran, once per dtype group
    assert torch.equal(gs[0], expected[0].float())
    assert torch.equal(gs[1], torch.zeros(5000))
    assert_close(gs[2], expected[2], dtype=torch.float16)
    # a non-contiguous gradient falls back to the reference, with the same answer
    w, g = torch.randn(8, 6), torch.randn(6, 8).t()
    expected = oracle(w, g)
    ops.orthogonalize_([w], [g])
    assert_close(g, expected)


# ----------------------------------------------------------------------------- gpu tier
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_reference_bf16_and_never_syncs():
    seed_all(5)
    ws = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in (7, 4096 * 3 + 5, 1 << 20)]
    gs = [torch.randn_like(w) for w in ws]
    ref = [g.clone() for g in gs]
    with reference_mode():
        ops.orthogonalize_(ws, ref)
    ops.orthogonalize_(ws, [g.clone() for g in gs])  # warm-up: compile and cache the tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.orthogonalize_(ws, gs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for g, r in zip(gs, ref):
        assert_close(g, r, dtype=torch.bfloat16)
