"""StableSPAM (eager backend): compat mode against a transcription of the official code, clean
mode against a float64 oracle, invariants, torch.optim contract, state_dict, non-finite grads."""

from __future__ import annotations

import io
import math

import pytest
import torch

from stablecore.optim import _multi_tensor as mt
from stablecore.optim.stable_spam import StableSPAM
from stablecore.testing import assert_close, seed_all


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: intra-op threads only add spin-wait contention on a shared 2-core runner
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class OfficialStableSPAM(torch.optim.Optimizer):
    """Transcription of the official update (TianjinYellow/StableSPAM galore_torch/stablespam.py
    @ 6a66da1, as in the paper notes), amsgrad dropped. It mutates p.grad like the original."""

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        gamma1=0.7,
        gamma2=0.9,
        theta=0.999,
        total_T=None,
        eta_min=0.5,
        update_proj_gap=1000,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.gamma1, self.gamma2, self.theta = gamma1, gamma2, theta
        self.total_T, self.eta_min = total_T, eta_min
        self.total_steps = 0
        if self.gamma1 == -1:
            self.gamma1 = betas[0]
        self.update_proj_gap = update_proj_gap

    def get_dr(self, k):  # CosineAnnealingLR(T_max=total_T + 1).step(k), closed form
        return (
            self.eta_min
            + (1.0 - self.eta_min) * (1 + math.cos(math.pi * k / (self.total_T + 1))) / 2
        )

    @torch.no_grad()
    def step(self):
        self.total_steps += 1
        scale = self.get_dr(self.total_steps) if self.total_T is not None else 1.0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data.mul_(1 - group["lr"] * group["weight_decay"])
                grad = p.grad
                state = self.state[p]
                if "exp_avg" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                    state["m_norm_t"] = 0
                    state["v_norm_t"] = 0
                    state["m_max_t"] = 0
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                max_gradient = torch.max(grad.abs())
                m_max_t = state["m_max_t"]
                state["step"] += 1
                m_max_t = self.theta * m_max_t + (1 - self.theta) * max_gradient
                m_max_hat = m_max_t / (1 - self.theta ** state["step"])
                mask = grad.abs() > m_max_hat
                if mask.sum() > 0:
                    grad[mask] = grad[mask] / max_gradient * m_max_hat
                state["m_max_t"] = m_max_t
                grad_norm = torch.norm(grad)
                m_norm_t, v_norm_t = state["m_norm_t"], state["v_norm_t"]
                m_norm_t = self.gamma1 * scale * m_norm_t + (1 - self.gamma1 * scale) * grad_norm
                v_norm_t = self.gamma2 * v_norm_t + (1 - self.gamma2) * grad_norm**2
                m_norm_hat = m_norm_t / (1 - (self.gamma1 * scale) ** state["step"])
                v_norm_hat = v_norm_t / (1 - self.gamma2 ** state["step"])
                c_norm_t = m_norm_hat / (torch.sqrt(v_norm_hat) + group["eps"])
                if grad_norm > 0:
                    grad = grad / grad_norm * c_norm_t
                state["m_norm_t"], state["v_norm_t"] = m_norm_t, v_norm_t
                if self.update_proj_gap != 0 and self.total_steps % self.update_proj_gap == 0:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                    state["step"] = 1
                beta1, beta2 = group["betas"]
                beta1 = beta1 * scale
                bias_correction1 = 1 - beta1 ** state["step"]
                bias_correction2 = 1 - beta2 ** state["step"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
                step_size = group["lr"] / bias_correction1
                norm_grad = exp_avg / denom
                p.add_(norm_grad, alpha=-step_size)


def clean_oracle(
    p0,
    grads,
    *,
    lr,
    betas,
    eps,
    wd,
    gamma1,
    gamma2,
    theta,
    total_T,
    eta_min,
    gap,
    scalar_clock="global",
):
    """Clean mode in float64, written from the paper notes independently of the optimizer."""
    p = p0.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    mmax = mnorm = vnorm = 0.0
    t = s = 0
    g3p = g1p = g2p = b1p = b2p = 1.0
    for k, g in enumerate(grads, start=1):
        g = g.double()
        d = 1.0
        if total_T is not None:
            d = eta_min + (1 - eta_min) * (1 + math.cos(math.pi * min(k, total_T) / total_T)) / 2
        reset = gap != 0 and k % gap == 0
        if reset:
            m.zero_()
            v.zero_()
            s, b1p, b2p = 0, 1.0, 1.0
            if scalar_clock == "reset":
                t, g3p, g1p, g2p = 0, 1.0, 1.0, 1.0
        t += 1
        s += 1
        M = g.abs().max().item()
        mmax = theta * mmax + (1 - theta) * M
        g3p *= theta
        T = mmax / (1 - g3p)
        g = torch.where(g.abs() > T, g / M * T, g)
        n = g.norm().item()
        g1 = gamma1 * d
        g1p *= g1
        g2p *= gamma2
        mnorm = g1 * mnorm + (1 - g1) * n
        vnorm = gamma2 * vnorm + (1 - gamma2) * n * n
        c = (mnorm / (1 - g1p)) / (math.sqrt(vnorm / (1 - g2p)) + eps)
        if n > 0:
            g = g * (c / n)
        b1 = betas[0] * d
        b1p *= b1
        b2p *= betas[1]
        m = b1 * m + (1 - b1) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p = p * (1 - lr * wd) - lr / (1 - b1p) * m / (torch.sqrt(v / (1 - b2p)) + eps)
    return p


def spiky_grads(shape, steps, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(steps):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        if k % 4 == 3:  # a spike far above the running max
            g.view(-1)[k % g.numel()] = 300.0
        out.append(g.to(dtype))
    return out


HYPER = dict(
    lr=1e-2,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.1,
    gamma1=0.7,
    gamma2=0.9,
    theta=0.999,
    total_T=12,
    eta_min=0.5,
    update_proj_gap=7,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compat_reference_is_bit_exact_with_official(dtype):
    seed_all(0)
    shapes = [(5, 7), (33,), (2, 3, 4)]
    params = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = StableSPAM(ours, compat="reference", **HYPER)
    ref = OfficialStableSPAM(theirs, **HYPER)
    grads = [spiky_grads(s, 20, i, dtype) for i, s in enumerate(shapes)]
    for k in range(20):  # past total_T (the cosine rises again) and two resets (Q1)
        for i in range(len(shapes)):
            ours[i].grad = grads[i][k].clone()
            theirs[i].grad = grads[i][k].clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b), f"step {k + 1}"
            assert torch.equal(a.grad, b.grad)  # Q5: p.grad clipped in place in both
    st = opt.state[ours[0]]
    assert st["m_max_t"].dtype == dtype  # Q3: scalars in the grad dtype


@pytest.mark.parametrize("scalar_clock", ["global", "reset"])
def test_clean_matches_float64_oracle(scalar_clock):
    seed_all(1)
    shapes = [(6, 5), (17,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    starts = [p.detach().clone() for p in params]
    hyper = dict(HYPER, total_T=15)
    opt = StableSPAM(params, scalar_clock=scalar_clock, backend="eager", **hyper)
    grads = [spiky_grads(s, 20, 10 + i) for i, s in enumerate(shapes)]
    for k in range(20):
        for i, p in enumerate(params):
            p.grad = grads[i][k].clone()
        opt.step()
    for i, p in enumerate(params):
        expect = clean_oracle(
            starts[i],
            grads[i],
            lr=hyper["lr"],
            betas=hyper["betas"],
            eps=hyper["eps"],
            wd=hyper["weight_decay"],
            gamma1=hyper["gamma1"],
            gamma2=hyper["gamma2"],
            theta=hyper["theta"],
            total_T=hyper["total_T"],
            eta_min=hyper["eta_min"],
            gap=hyper["update_proj_gap"],
            scalar_clock=scalar_clock,
        )
        assert_close(p, expect, dtype=torch.float32)


def test_compat_and_clean_differ_after_reset():
    """Q1/Q2 make a difference right after a reset; before the first reset they agree."""
    seed_all(2)
    p1 = torch.nn.Parameter(torch.randn(8, 8))
    p2 = torch.nn.Parameter(p1.detach().clone())
    a = StableSPAM([p1], update_proj_gap=3, backend="eager")
    b = StableSPAM([p2], update_proj_gap=3, compat="reference")
    grads = spiky_grads((8, 8), 4, 3)
    for k in range(4):
        p1.grad, p2.grad = grads[k].clone(), grads[k].clone()
        a.step()
        b.step()
        if k < 2:
            assert_close(p1, p2, dtype=torch.float32)
    assert not torch.allclose(p1, p2)
    # Q1: in the reference the moments are new zeros right after the reset step
    assert float(b.state[p2]["exp_avg"].norm()) > 0  # step 4 refilled them
    p3 = torch.nn.Parameter(torch.randn(4))
    c = StableSPAM([p3], update_proj_gap=2, compat="reference")
    for _ in range(2):
        p3.grad = torch.randn(4)
        before = p3.detach().clone()
        c.step()
    assert float(c.state[p3]["exp_avg"].norm()) == 0.0 and not torch.equal(before, p3)


def test_invariants_first_step_and_clip():
    seed_all(3)
    p = torch.nn.Parameter(torch.randn(50))
    g = torch.randn(50)
    g[7] = 1000.0
    opt = StableSPAM([p], lr=0.05, backend="eager")
    p.grad = g.clone()
    before = p.detach().clone()
    opt.step()
    # s = 1: every nonzero element moves by lr (up to eps), against the sign of its gradient
    big = g.abs() > 0.05  # where |g^| >> eps
    assert_close((before - p).abs()[big], torch.full((int(big.sum()),), 0.05), dtype=torch.float32)
    assert torch.equal(torch.sign(before - p), torch.sign(g))
    assert torch.equal(p.grad, g)  # clean mode never writes p.grad
    # AdaClip: with M > T the max entry lands exactly on T, others <= T are unchanged
    S = torch.stack([opt.state[p]["scalars"]])
    hp = mt.StepHyper(
        lr=torch.tensor(0.05),
        beta1=0.9,
        beta2=0.999,
        gamma1=0.7,
        gamma2=0.9,
        gamma3=0.999,
        eps=1e-8,
        weight_decay=0.0,
        reset=False,
        reset_scalars=False,
        maximize=False,
        state_bits=32,
    )
    M = torch.tensor([5000.0])
    _, T = mt.finalize_clip(S, M, hp)
    g2 = torch.randn(50)
    g2[3] = 5000.0
    clipped = torch.where(g2.abs() > T[0], g2 / M[0] * T[0], g2)
    assert clipped[3] == T[0] and T[0] < 5000
    keep = g2.abs() <= T[0]
    assert torch.equal(clipped[keep], g2[keep])


def test_param_groups_equal_separate_optimizers():
    seed_all(4)
    a, b = torch.randn(6, 4), torch.randn(9)
    pa, pb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    qa, qb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    opt = StableSPAM(
        [
            {"params": [pa], "lr": 0.1, "gamma1": 0.85, "weight_decay": 0.1},
            {"params": [pb], "theta": 0.99, "update_proj_gap": 3},
        ],
        lr=0.01,
        backend="eager",
    )
    oa = StableSPAM([qa], lr=0.1, gamma1=0.85, weight_decay=0.1, backend="eager")
    ob = StableSPAM([qb], lr=0.01, theta=0.99, update_proj_gap=3, backend="eager")
    for _ in range(5):
        ga, gb = torch.randn(6, 4), torch.randn(9)
        pa.grad, qa.grad, pb.grad, qb.grad = ga, ga.clone(), gb, gb.clone()
        opt.step()
        oa.step()
        ob.step()
    assert torch.equal(pa, qa) and torch.equal(pb, qb)


def test_closure_zero_grad_and_maximize():
    seed_all(5)
    lin = torch.nn.Linear(4, 2)
    opt = StableSPAM(lin.parameters(), lr=0.01, backend="eager")
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = lin(x).pow(2).mean()
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(5)]
    assert losses[-1] < losses[0]
    opt.zero_grad()
    assert all(p.grad is None for p in lin.parameters())
    p, q = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(5))
    om = StableSPAM([p], maximize=True, backend="eager")
    on = StableSPAM([q], backend="eager")
    g = torch.randn(5)
    p.grad, q.grad = g.clone(), -g
    om.step()
    on.step()
    assert torch.equal(p, q)


def test_tensor_lr_and_scheduler():
    seed_all(6)
    w0 = torch.randn(10)
    p, q = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    op = StableSPAM([p], lr=torch.tensor(0.02), backend="eager")
    oq = StableSPAM([q], lr=0.02, backend="eager")
    sp = torch.optim.lr_scheduler.StepLR(op, step_size=2, gamma=0.5)
    sq = torch.optim.lr_scheduler.StepLR(oq, step_size=2, gamma=0.5)
    for _ in range(6):
        g = torch.randn(10)
        p.grad, q.grad = g, g.clone()
        op.step()
        oq.step()
        sp.step()
        sq.step()
    assert isinstance(op.param_groups[0]["lr"], torch.Tensor)
    assert float(op.param_groups[0]["lr"]) == pytest.approx(0.02 * 0.125)
    assert_close(p, q, dtype=torch.float32)
    assert not torch.equal(p, w0)


def _run(opt, params, grads):
    for g in grads:
        for p, gi in zip(params, g, strict=True):
            p.grad = gi.clone()
        opt.step()


# compat="reference" keeps its states in the gradient's dtype (as the official code), so it has
# no low-bit variant to round-trip.
@pytest.mark.parametrize(
    "bits, compat",
    [(32, "clean"), (16, "clean"), (8, "clean"), (4, "clean"), (32, "reference")],
)
def test_state_dict_round_trip_and_resume(bits, compat):
    seed_all(7)
    shapes = [(20, 256), (7,)]  # one quantized tensor, one small fp32-state tensor
    w = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(8)]
    # clean mode on the default CPU backend ("auto": the foreach path)
    kw = dict(lr=0.01, state_bits=bits, update_proj_gap=5, compat=compat)
    a = [torch.nn.Parameter(x.clone()) for x in w]
    oa = StableSPAM(a, **kw)
    _run(oa, a, grads[:4])
    assert ("exp_avg_codes" in oa.state[a[0]]) == (bits in (8, 4))
    buf = io.BytesIO()
    torch.save({"p": [x.detach() for x in a], "o": oa.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, map_location="cpu", weights_only=False)
    b = [torch.nn.Parameter(x.clone()) for x in ck["p"]]
    ob = StableSPAM(b, **kw)
    ob.load_state_dict(ck["o"])
    for x, y in zip(a, b, strict=True):
        for key, val in oa.state[x].items():
            other = ob.state[y][key]
            if isinstance(val, torch.Tensor):
                assert val.dtype == other.dtype and torch.equal(val, other), key
            else:
                assert val == other
    _run(oa, a, grads[4:])
    _run(ob, b, grads[4:])
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert ob.total_steps == 8


def test_bf16_params_keep_fp32_state_through_load():
    p = torch.nn.Parameter(torch.randn(16, 256).bfloat16())
    opt = StableSPAM([p], state_bits=8, backend="eager")
    p.grad = torch.randn(16, 256).bfloat16()
    opt.step()
    sd = opt.state_dict()
    opt2 = StableSPAM([p], state_bits=8, backend="eager")
    opt2.load_state_dict(sd)
    assert opt2.state[p]["exp_avg_absmax"].dtype == torch.float32
    assert opt2.state[p]["scalars"].dtype == torch.float32


@pytest.mark.parametrize("bits", [32, 4])
def test_nonfinite_gradients_are_skipped(bits):
    seed_all(8)
    p, q = torch.nn.Parameter(torch.randn(20, 256)), torch.nn.Parameter(torch.randn(9))
    opt = StableSPAM([p, q], state_bits=bits, backend="eager")
    p.grad, q.grad = torch.randn(20, 256), torch.randn(9)
    opt.step()
    saved_p = p.detach().clone()
    saved_state = {k: v.clone() for k, v in opt.state[p].items()}
    saved_q = q.detach().clone()
    for bad in (float("nan"), float("inf")):
        g = torch.randn(20, 256)
        g[3, 4] = bad
        p.grad, q.grad = g, torch.randn(9)
        opt.step()
        assert torch.equal(p, saved_p)
        for k, v in saved_state.items():
            assert torch.equal(opt.state[p][k], v), k
        assert not torch.equal(q, saved_q)
        saved_q = q.detach().clone()
    assert opt.nonfinite_steps == 2
    raising = StableSPAM([p], on_nonfinite="raise", backend="eager")
    p.grad = torch.full((20, 256), float("nan"))
    with pytest.raises(FloatingPointError, match="20, 256"):
        raising.step()


def test_grad_scaler_skips_overflowing_steps():
    seed_all(9)
    lin = torch.nn.Linear(8, 4)
    opt = StableSPAM(lin.parameters(), lr=0.01, backend="eager")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    x = torch.randn(16, 8)
    w0 = lin.weight.detach().clone()
    loss = lin(x).pow(2).mean() * 1e36  # scaled loss overflows to inf
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(lin.weight, w0) and scaler.get_scale() < 2.0**14
    opt.zero_grad()
    scaler.scale(lin(x).pow(2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(lin.weight, w0)


# Stated bounds of the low-bit trajectories (relative parameter distance to the 32-bit run after
# 100 steps, measured 0.015 / 0.016 / 0.017 here): 16-bit 4%, 8-bit 5%, 4-bit 10%.
@pytest.mark.parametrize("bits,bound", [(16, 0.04), (8, 0.05), (4, 0.1)])
def test_lowbit_trajectories_track_32bit(bits, bound):
    """Least squares, 100 steps with two MoRet resets: the low-bit run's parameters stay within
    ``bound`` (distance to the 32-bit run over the 32-bit run's distance travelled) and its loss
    within 2% of the 32-bit loss. The weight's rows (256) are a multiple of both quantization
    blocks, so its states really are quantized at 8 and 4 bits."""
    seed_all(10)
    A, y = torch.randn(256, 96), torch.randn(256, 256)
    w0 = torch.randn(96, 256) * 0.1
    runs = {}
    for b in (32, bits):
        w = torch.nn.Parameter(w0.clone())
        opt = StableSPAM([w], lr=0.01, state_bits=b, update_proj_gap=40, backend="eager")
        for _ in range(100):
            opt.zero_grad()
            loss = (A @ w - y).pow(2).mean()
            loss.backward()
            opt.step()
        assert ("exp_avg_codes" in opt.state[w]) == (b in (8, 4))
        wd = w.detach().clone()
        runs[b] = (wd, float((A @ wd - y).pow(2).mean()))
    rel = float((runs[bits][0] - runs[32][0]).norm() / (runs[32][0] - w0).norm())
    print(
        f"state_bits={bits}: relative distance {rel:.4f}, loss {runs[bits][1]:.4f} vs {runs[32][1]:.4f}"
    )
    assert rel < bound, rel
    assert runs[bits][1] < 1.02 * runs[32][1]


def test_bad_arguments_raise():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="state_bits"):
        StableSPAM(p, state_bits=6)
    with pytest.raises(ValueError, match="compat"):
        StableSPAM(p, compat="official")
    with pytest.raises(ValueError, match="state_bits"):
        StableSPAM(p, compat="reference", state_bits=8)
    with pytest.raises(ValueError, match="on_nonfinite"):
        StableSPAM(p, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="betas"):
        StableSPAM(p, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="shape"):
        StableSPAM(p, lr=torch.ones(2))
