"""Stable-SPAM (arXiv 2502.17055): AdaClip + AdaGN + MoRet in front of Adam, drop-in for the
official ``galore_torch/stablespam.py`` (TianjinYellow/StableSPAM @ 6a66da1).

Per tensor and step (k global step, t the tensor's scalar clock, s its Adam clock)::

    M = max|g|;  m_max <- g3*m_max + (1-g3)*M;  T = m_max / (1 - g3^t)          # AdaClip
    g~ = g / M * T where |g| > T                  # the max entry lands exactly on T
    n = ||g~||;  m_n <- g1*m_n + (1-g1)*n;  v_n <- g2*v_n + (1-g2)*n^2         # AdaGN
    c = [m_n / (1 - g1^t)] / (sqrt(v_n / (1 - g2^t)) + eps);  g^ = g~ * c / n
    every update_proj_gap steps: m, v <- 0, s <- 0                               # MoRet
    m <- b1*m + (1-b1)*g^;  v <- b2*v + (1-b2)*g^^2;  s <- s + 1
    p <- p*(1 - lr*wd) - lr / (1 - b1^s) * m / (sqrt(v / (1 - b2^s)) + eps)

with ``b1 = beta1 * d_k`` and ``g1 = gamma1 * d_k`` where ``d_k`` decays from 1 to ``eta_min`` by
a cosine over ``total_T`` steps (``d_k = 1`` when ``total_T`` is None).

``compat="reference"`` reproduces the official code bug for bug; the default ``compat="clean"``
differs as follows (notes Q1-Q5):

1. Q1, reset: clean zeroes m and v and restarts s so that the reset step already uses fresh
   moments; the reference binds the old tensors first, so the reset step updates with the *old*
   moments and s = 1 corrections and the fresh zeros only take effect one step later.
2. Q2, scalar clock: clean keeps the bias-correction clock t of m_max, m_n, v_n running through
   resets (``scalar_clock="global"``); the reference restarts it while the EMAs keep their values,
   which inflates T by 1/(1 - g3^t) after every reset (``scalar_clock="reset"`` restores that).
3. Q3, precision: clean keeps the per-tensor scalars in fp32 and computes in fp32 whatever the
   param dtype; the reference computes them (and the moments) in the gradient's dtype (bf16 in
   the paper's runs, where m_max stalls).
4. Q4, decay: clean corrects bias with the product of the actually used b1 (g1) values and clamps
   the cosine at ``total_T``; the reference uses the current b1 raised to s and its cosine rises
   again past ``total_T``.
5. Q5, side effects: clean never writes ``p.grad`` and never syncs with the host; the reference
   clips ``p.grad`` in place (compat mode does too) and syncs twice per tensor per step.
6. Clean adds: ``state_bits`` 32/16/8/4, ``maximize``, ``lr`` as a tensor, non-finite gradient
   skipping (``nonfinite_steps``), per-group gamma/theta/update_proj_gap, fused kernels.
7. FSDP2 (DTensor params): per-tensor max and norm over the whole logical tensor, one
   all-reduce per pass per bucket; states are DTensors (see :mod:`stablecore.optim._distributed`).

Example::

    opt = StableSPAM(model.parameters(), lr=1e-3, state_bits=4)
    loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from stablecore.optim import _distributed, _lowbit
from stablecore.optim import _multi_tensor as mt
from stablecore.optim._multi_tensor import CommonOptimizerMixin, bf16_stochastic_round

_COMPATS = ("clean", "reference")


def reference_cosine(k: int, total_T: int, eta_min: float) -> float:
    """The official ``CosineDecay(1.0, total_T, eta_min).get_dr(k)`` (closed-form cosine over
    ``total_T + 1`` steps, not clamped)."""
    return eta_min + (1.0 - eta_min) * (1 + math.cos(math.pi * k / (total_T + 1))) / 2


def clean_cosine(k: int, total_T: int, eta_min: float) -> float:
    """Cosine from 1 at k = 0 to ``eta_min`` at ``k >= total_T``."""
    k = min(k, total_T)
    return eta_min + (1.0 - eta_min) * (1 + math.cos(math.pi * k / total_T)) / 2


class StableSPAM(CommonOptimizerMixin, torch.optim.Optimizer):
    """Stable-SPAM with the official keyword names and defaults (see the module docstring).

    Args:
        params: iterable of tensors or param-group dicts; every keyword below except
            ``compat``, ``state_bits``, ``on_nonfinite`` and ``backend`` may be set per group.
        lr: float or 0-d tensor (a tensor is read on device: no host sync, schedulers work).
        state_bits: 32, 16 (bf16), 8 (block 256) or 4 (block 128). Low-bit moments only for
            tensors with >= 4096 elements and >= 2 dims, in row-padded blocks (each row
            ``numel / shape[0]`` long is cut into blocks from its start, the last one partial);
            1-D and small tensors keep fp32 moments, the same tensors at every FSDP2 world size
            (``stablecore.optim._lowbit.is_quantized``).
        scalar_clock: "global" (clean) or "reset" (restart scalar bias corrections at MoRet).
        on_nonfinite: "skip" (default: a tensor with NaN/Inf gradient keeps its param and state
            that step and is counted in ``nonfinite_steps``) or "raise" (one host sync a step).
        backend: "auto" (Triton on CUDA; on CPU the numba kernels for a bucket of at least
            2**20 elements when numba is installed, else the ``torch._foreach`` path; eager
            elsewhere), "eager" (per-tensor reference), "foreach", "triton" or "cpu" (numba).
        stochastic_rounding: round bf16 params stochastically (clean mode).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        gamma1: float = 0.7,
        gamma2: float = 0.9,
        theta: float = 0.999,
        total_T: int | None = None,
        eta_min: float = 0.5,
        update_proj_gap: int = 1000,
        *,
        compat: str = "clean",
        state_bits: int = 32,
        maximize: bool = False,
        scalar_clock: str = "global",
        on_nonfinite: str = "skip",
        stochastic_rounding: bool = False,
        backend: str = "auto",
    ) -> None:
        if compat not in _COMPATS:
            raise ValueError(f"compat must be one of {_COMPATS}, got {compat!r}")
        if state_bits not in _lowbit.STATE_BITS:
            raise ValueError(f"state_bits must be one of {_lowbit.STATE_BITS}, got {state_bits}")
        if compat == "reference" and state_bits != 32:
            raise ValueError("compat='reference' keeps states in the gradient dtype: state_bits=32")
        if scalar_clock not in ("global", "reset"):
            raise ValueError(f"scalar_clock must be 'global' or 'reset', got {scalar_clock!r}")
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"lr tensor must hold one element, got shape {tuple(lr.shape)}")
        if not isinstance(lr, torch.Tensor) and not 0.0 <= lr:
            raise ValueError(f"invalid lr {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not 0.0 < theta < 1.0 or not 0.0 < gamma2 < 1.0:
            raise ValueError(f"theta and gamma2 must be in (0, 1), got {theta}, {gamma2}")
        if total_T is not None and total_T <= 0:
            raise ValueError(f"total_T must be positive or None, got {total_T}")
        if gamma1 == -1:  # the official convention: reuse beta1
            gamma1 = betas[0]
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            gamma1=gamma1,
            gamma2=gamma2,
            theta=theta,
            total_T=total_T,
            eta_min=eta_min,
            update_proj_gap=update_proj_gap,
            maximize=maximize,
            scalar_clock=scalar_clock,
            stochastic_rounding=stochastic_rounding,
        )
        super().__init__(params, defaults)
        self._setup_common(compat, state_bits, on_nonfinite, backend)

    # ---- one step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.total_steps += 1
        k = self.total_steps
        if self.on_nonfinite == "raise":
            self._raise_if_nonfinite()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p.numel() > 0]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise TypeError("StableSPAM does not support sparse gradients")
            if self.compat == "reference":
                for p in params:
                    self._reference_param_step(p, group, k)
                continue
            dist_mesh = _distributed.check_group(params, "StableSPAM")
            scale = 1.0
            if group["total_T"] is not None:
                scale = clean_cosine(k, group["total_T"], group["eta_min"])
            gap = group["update_proj_gap"]
            grads = [p.grad for p in params]
            for (device, _, _), idx in mt.group_by_device_dtype(params, grads).items():
                ps = [params[i] for i in idx]
                for p in ps:
                    if "scalars" not in self.state[p]:
                        self._init_clean_state(p)
                # FSDP2: per-tensor partials of the bucket all-reduced once per pass
                d_max, d_sum = _distributed.reducers(ps) if dist_mesh is not None else (None, None)
                hp = mt.StepHyper(
                    lr=self._lr_tensor(group["lr"], device),
                    beta1=group["betas"][0] * scale,
                    beta2=group["betas"][1],
                    gamma1=group["gamma1"] * scale,
                    gamma2=group["gamma2"],
                    gamma3=group["theta"],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    reset=bool(gap) and k % gap == 0,
                    reset_scalars=group["scalar_clock"] == "reset",
                    maximize=group["maximize"],
                    state_bits=self.state_bits,
                    stochastic_rounding=group["stochastic_rounding"],
                    reduce_max=_distributed.compose(d_max, self.reduce_max),
                    reduce_sum=_distributed.compose(d_sum, self.reduce_sum),
                )
                finite = self._bucket_step(ps, [p.grad for p in ps], hp)
                self._count_nonfinite(finite)
        return loss

    def _init_clean_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        state["scalars"] = mt.initial_scalars(p.device)
        # DTensor params get DTensor states (shard-local blocks, see _distributed)
        _distributed.init_moment(state, "exp_avg", p, self.state_bits)
        _distributed.init_moment(state, "exp_avg_sq", p, self.state_bits)

    def _bucket_step(self, ps, gs, hp: mt.StepHyper) -> torch.Tensor:
        backend = self._resolve_backend(ps[0].device, sum(p.numel() for p in ps))
        # element-wise work on the local shards (identity for plain tensors)
        ps, gs, states = _distributed.local_views(ps, gs, [self.state[p] for p in ps])
        if any(p.numel() == 0 for p in ps) and backend != "eager":
            # an empty shard still joins the collectives; the foreach path handles it and keeps
            # the same float order as the other ranks' (low-bit codes would flip otherwise)
            backend = "eager" if hp.stochastic_rounding else "foreach"
        if backend == "triton":
            from stablecore import _backends
            from stablecore.kernels.stable_spam import SUPPORTED_DTYPES, fused_stable_spam_step

            ok = all(t.is_contiguous() and t.dtype in SUPPORTED_DTYPES for t in (*ps, *gs))
            if ok:
                return fused_stable_spam_step(ps, gs, states, hp)
            _backends.log_fallback_once(
                "StableSPAM", "fused kernels need contiguous fp32/bf16 params and grads"
            )
        if backend == "foreach" and not hp.stochastic_rounding:
            from stablecore.optim._foreach import foreach_stable_spam_step

            return foreach_stable_spam_step(ps, gs, states, hp)
        if backend == "cpu":
            from stablecore.optim._cpu_offload import cpu_stable_spam_step

            return cpu_stable_spam_step(ps, gs, states, hp)
        return eager_stable_spam_step(ps, gs, states, hp)

    # ---- the official code, bug for bug --------------------------------------------------

    def _reference_param_step(self, p: torch.Tensor, group: dict, k: int) -> None:
        grad = p.grad
        state = self.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
            state["m_norm_t"], state["v_norm_t"], state["m_max_t"] = 0, 0, 0
            state["step"] = 0
        max_gradient = torch.max(grad.abs())
        if not bool(torch.isfinite(max_gradient)):  # compat mode syncs anyway (as the official)
            self._count_nonfinite(torch.zeros((), dtype=torch.bool, device=p.device))
            return
        scale = 1.0
        if group["total_T"] is not None:
            scale = reference_cosine(k, group["total_T"], group["eta_min"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]  # Q1: bound before reset
        beta1, beta2 = group["betas"]
        beta1 = beta1 * scale
        theta, gamma2 = group["theta"], group["gamma2"]
        lr = group["lr"]
        state["step"] += 1
        step = state["step"]
        p.mul_(1 - lr * group["weight_decay"])
        m_max_t = theta * state["m_max_t"] + (1 - theta) * max_gradient
        m_max_hat = m_max_t / (1 - theta**step)
        mask = grad.abs() > m_max_hat
        grad.copy_(torch.where(mask, grad / max_gradient * m_max_hat, grad))  # Q5: in place
        state["m_max_t"] = m_max_t
        grad_norm = torch.norm(grad)
        gamma1 = group["gamma1"] * scale
        m_norm_t = gamma1 * state["m_norm_t"] + (1 - gamma1) * grad_norm
        v_norm_t = gamma2 * state["v_norm_t"] + (1 - gamma2) * grad_norm**2
        m_norm_hat = m_norm_t / (1 - gamma1**step)
        v_norm_hat = v_norm_t / (1 - gamma2**step)
        c_norm_t = m_norm_hat / (torch.sqrt(v_norm_hat) + group["eps"])
        g = torch.where(grad_norm > 0, grad / grad_norm * c_norm_t, grad)
        state["m_norm_t"], state["v_norm_t"] = m_norm_t, v_norm_t
        gap = group["update_proj_gap"]
        if gap != 0 and k % gap == 0:
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros_like(g)
            state["step"] = 1
        exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        bc1 = 1 - beta1 ** state["step"]
        bc2 = 1 - beta2 ** state["step"]
        denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(group["eps"])
        step_size = lr / bc1
        norm_grad = exp_avg / denom
        if isinstance(step_size, torch.Tensor):
            p.sub_(norm_grad * step_size)
        else:
            p.add_(norm_grad, alpha=-step_size)


def eager_stable_spam_step(ps, gs, states, hp: mt.StepHyper) -> torch.Tensor:
    """Clean-mode update of one bucket in plain PyTorch (the oracle of the fused kernels).

    ``ps``/``gs``: params and grads of one (device, dtype) bucket; ``states``: their state
    dicts. Returns ``finite: [n] bool`` (False: that tensor was skipped). No host sync.
    """
    g32 = [(-g if hp.maximize else g).to(torch.float32) for g in gs]
    # pass A (an empty shard's partial is 0: max|g| >= 0)
    M = torch.stack([g.abs().amax() if g.numel() else g.new_zeros(()) for g in g32])
    if hp.reduce_max is not None:
        M = hp.reduce_max(M)
    finite = torch.isfinite(M)
    S = torch.stack([st["scalars"] for st in states])
    clip_state, T = mt.finalize_clip(S, M, hp)
    clipped = [torch.where(g.abs() > T[i], g / M[i] * T[i], g) for i, g in enumerate(g32)]
    ss = torch.stack([(c * c).sum() for c in clipped])  # pass B
    if hp.reduce_sum is not None:
        ss = hp.reduce_sum(ss)
    S_new, coef = mt.finalize_norm(S, clip_state, ss, hp)
    S_new = torch.where(finite[:, None], S_new, S)
    decay = 1.0 - hp.lr * hp.weight_decay
    bits = hp.state_bits
    for i, (p, st) in enumerate(zip(ps, states, strict=True)):  # pass C
        keep = finite[i]
        u = clipped[i] * coef[i, 0]
        if hp.reset:
            m = torch.zeros_like(u)
            v = torch.zeros_like(u)
        else:
            m = _lowbit.load_moment(st, "exp_avg", p, bits)
            v = _lowbit.load_moment(st, "exp_avg_sq", p, bits)
        m1 = m * hp.beta1 + u * (1.0 - hp.beta1)
        v1 = v * hp.beta2 + (u * u) * (1.0 - hp.beta2)
        denom = torch.sqrt(v1) * coef[i, 2] + hp.eps
        p32 = p.to(torch.float32) * decay - (m1 / denom) * coef[i, 1]
        if p.dtype == torch.bfloat16 and hp.stochastic_rounding:
            new_p = bf16_stochastic_round(p32)
        else:
            new_p = p32.to(p.dtype)
        p.copy_(torch.where(keep, new_p, p))
        _lowbit.store_moment(st, "exp_avg", m1, keep)
        _lowbit.store_moment(st, "exp_avg_sq", v1, keep)
        st["scalars"].copy_(S_new[i])
    return finite
