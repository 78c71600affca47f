"""Internals of :mod:`stablecore.methods.colide`: closed forms and the per-stage batched state.

``_Stage.step`` advances ``B`` problems by one Adam step: a CPU fast path on numpy views of the
torch state (no special event in the batch), else a masked ``torch.where`` step with no host
sync (the CUDA path), which also handles domain restarts and learning-rate halving.
"""

from __future__ import annotations

import torch

from stablecore.methods._colide.cpu_step import NumpyStep

VARIANTS = ("ev", "nv", "dagma")


def _sigma_closed_form(q: torch.Tensor, variant: str, sigma_min: float) -> torch.Tensor:
    # q: [B, d]; sqrt(max(q, floor^2)): the tiny floor only guards 0/0 on noiseless data (the
    # reference never clips); same arithmetic as the CPU fast path (cpu_step.NumpyStep).
    floor2 = max(sigma_min**2, torch.finfo(q.dtype).tiny)
    if variant == "ev":
        return q.mean(-1).clamp_min(floor2).sqrt()
    if variant == "nv":
        return q.clamp_min(floor2).sqrt()
    return torch.ones_like(q[:, 0])


def _score(q: torch.Tensor, sigma: torch.Tensor, variant: str) -> torch.Tensor:
    if variant == "ev":
        return 0.5 * q.sum(-1) / sigma + 0.5 * q.shape[-1] * sigma
    if variant == "nv":
        return 0.5 * (q / sigma + sigma).sum(-1)
    return 0.5 * q.sum(-1)


def _inverse(M, Xinv, method: str, ns_steps: int):
    if method == "exact":
        Minv, info = torch.linalg.inv_ex(M)  # inv_ex: no host-side error check (no sync)
        return Minv, info != 0
    # Warm-started Newton-Schulz X <- X + X (I - M X): pure GEMMs, capturable, no pivoting.
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    for _ in range(ns_steps):
        Xinv = Xinv + Xinv @ (eye - M @ Xinv)
    return Xinv, torch.zeros(M.shape[0], dtype=torch.bool, device=M.device)


class _Stage:
    """State of one central-path stage for ``B`` problems (all tensors, leading dim ``B``)."""

    def __init__(self, W, sigma, s, lr, variant, inverse, sigma_min=0.0):
        B, d, _ = W.shape
        self.sigma_min = sigma_min
        opts = {"dtype": W.dtype, "device": W.device}
        self.variant, self.inverse = variant, inverse
        self.W, self.W_stage, self.W_prev = W.clone(), W.clone(), W.clone()
        self.sigma, self.sigma_stage = sigma.clone(), sigma.clone()
        self.st = s.clone()
        self.lr_stage = torch.full((B,), lr, **opts)
        self.lr = self.lr_stage.clone()
        self.m, self.v = torch.zeros_like(W), torch.zeros_like(W)
        self.it = torch.ones(B, **opts)  # number of the Adam step about to run (1-based)
        self.steps = torch.zeros(B, dtype=torch.long, device=W.device)
        # First step of a stage uses the stored sigma (the reference's initial value).
        self.use_stored = torch.ones(B, dtype=torch.bool, device=W.device)
        self.maybe_stored = True
        self.active = torch.ones(B, dtype=torch.bool, device=W.device)
        self.obj_prev = torch.full((B,), 1e16, **opts)
        self.Xinv = None
        self._np = None  # numpy views + buffers of the CPU fast path, built lazily
        if inverse != "exact":
            eye = torch.eye(d, **opts)
            self.Xinv = torch.linalg.inv(self.st[:, None, None] * eye - W * W)
            self.X_stage, self.X_prev = self.Xinv.clone(), self.Xinv.clone()

    def _bc(self, x):  # [B] or [B, d] -> broadcastable against [B, d, d] column scaling
        return x[:, None, :] if x.ndim == 2 else x[:, None, None]

    def _sigma_now(self, q, sigma_min):
        cf = _sigma_closed_form(q, self.variant, sigma_min)
        if not self.maybe_stored:  # host-side flag: skips a where on the CPU fast path
            return cf
        keep = self.use_stored[:, None] if self.sigma.ndim == 2 else self.use_stored
        return torch.where(keep, self.sigma, cf)

    def step(self, cov, lam, mu, eye, budget, b1, b2, domain_tol, sigma_min, ns_steps, fast_ok):
        if (
            fast_ok
            and self.inverse == "exact"
            and self._fast_numpy(cov, lam, mu, b1, b2, domain_tol)
        ):
            return True
        W, col = self.W, (slice(None), None, None)
        M = torch.addcmul(self.st[col] * eye, W, W, value=-1.0)
        Minv, singular = _inverse(M, self.Xinv, self.inverse, ns_steps)
        bad = self.active & (singular | (Minv < -domain_tol).flatten(1).any(1))
        if fast_ok and not bool(bad.any()):
            self._fast(cov, lam, mu, eye, Minv, b1, b2, sigma_min)
            return True
        self._masked(cov, lam, mu, eye, Minv, bad, budget, b1, b2, sigma_min)
        return False

    def _fast_numpy(self, cov, lam, mu, b1, b2, domain_tol) -> bool:
        """The CPU fast path (:class:`NumpyStep`); False (nothing changed) on any special event."""
        if self.W.dtype not in (torch.float32, torch.float64):
            return False
        if self._np is None:
            self._np = NumpyStep(self, cov, lam)
        return self._np.step(mu, b1, b2, domain_tol)

    def _direction(self, cov, lam, mu, eye, Minv, sigma_min):
        W, col = self.W, (slice(None), None, None)
        dif = eye - W
        rhs = cov @ dif
        q = (dif * rhs).sum(-2)  # diag((I-W)^T C (I-W)) without a second GEMM
        sig = self._sigma_now(q, sigma_min)
        G = rhs / self._bc(sig) if self.variant != "dagma" else rhs.clone()
        G.mul_(-mu).add_(torch.sign(W) * (mu * lam)[col])
        G.addcmul_(W, Minv.transpose(-1, -2), value=2.0)
        return G, sig

    def _fast(self, cov, lam, mu, eye, Minv, b1, b2, sigma_min):
        self._np = None  # replaces sigma: rebuild the numpy views next time
        G, sig = self._direction(cov, lam, mu, eye, Minv, sigma_min)
        col = (slice(None), None, None)
        self.m.mul_(b1).add_(G, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(G, G, value=1 - b2)
        denom = (self.v / (1 - b2**self.it)[col]).sqrt_().add_(1e-8)
        self.W_prev.copy_(self.W)
        self.W.addcdiv_(self.m * (self.lr / (1 - b1**self.it))[col], denom, value=-1.0)
        self.sigma, self.use_stored = sig, torch.zeros_like(self.use_stored)
        self.maybe_stored = False
        self.it += 1
        self.steps += 1
        if self.Xinv is not None:
            self.X_prev, self.Xinv = self.Xinv, Minv

    def _masked(self, cov, lam, mu, eye, Minv, bad, budget, b1, b2, sigma_min):
        self._np = None  # this step replaces the state tensors: the numpy views go stale
        col = (slice(None), None, None)
        keep = (slice(None), None) if self.sigma.ndim == 2 else (slice(None),)
        restart = bad & ((self.it == 1) | (self.st <= 0.9 + 1e-12))
        undo = bad & ~restart
        good = self.active & ~bad
        G, sig = self._direction(cov, lam, mu, eye, Minv, sigma_min)
        m_new = b1 * self.m + (1 - b1) * G
        v_new = b2 * self.v + (1 - b2) * G * G
        denom = (v_new / (1 - b2**self.it)[col]).sqrt() + 1e-8
        W_step = self.W - (self.lr / (1 - b1**self.it))[col] * m_new / denom
        # Undo + halve lr: W_prev - (lr/2) dir is the midpoint of W_prev and the rejected W.
        lr_half = self.lr * 0.5
        give_up = undo & (lr_half <= 1e-16)
        g3, u3, r3 = good[col], undo[col], restart[col]
        W_next = torch.where(g3, W_step, self.W)
        W_next = torch.where(u3, 0.5 * (self.W_prev + self.W), W_next)
        W_next = torch.where(give_up[col], self.W_prev, W_next)
        W_next = torch.where(r3, self.W_stage, W_next)
        self.W_prev = torch.where(g3, self.W, self.W_prev)
        self.m = torch.where(g3, m_new, torch.where(r3, 0.0, self.m))
        self.v = torch.where(g3, v_new, torch.where(r3, 0.0, self.v))
        self.lr_stage = torch.where(restart, self.lr_stage * 0.5, self.lr_stage)
        self.lr = torch.where(undo, lr_half, torch.where(restart, self.lr_stage, self.lr))
        self.st = torch.where(restart, self.st + 0.1, self.st)
        self.sigma = torch.where(
            restart[keep], self.sigma_stage, torch.where(good[keep], sig, self.sigma)
        )
        self.use_stored = torch.where(
            restart, True, torch.where(good | undo, False, self.use_stored)
        )
        self.it = torch.where(restart, 1.0, self.it + good.to(self.it.dtype))
        self.steps += good.long()
        if self.Xinv is not None:
            X_next = torch.where(g3, Minv, torch.where(u3, self.X_prev, self.Xinv))
            self.X_prev = torch.where(g3, self.Xinv, self.X_prev)
            self.Xinv = torch.where(r3, self.X_stage, X_next)
        self.obj_prev = torch.where(restart, 1e16, self.obj_prev)
        self.active = self.active & ~give_up & (self.it <= budget)
        self.W = W_next

    def objective(self, cov, lam, mu, eye, sigma_min):
        """``mu (S + lam |W|_1) + h`` at the current W with the closed-form sigma (as the reference)."""
        W, d = self.W, self.W.shape[-1]
        Mk = self.st[:, None, None] * eye - W * W
        if self.Xinv is not None:  # periodic exact refresh keeps Newton-Schulz from drifting
            self.Xinv = torch.linalg.inv_ex(Mk)[0]
        dif = eye - W
        q = (dif * (cov @ dif)).sum(-2)
        sig = _sigma_closed_form(q, self.variant, sigma_min)
        h = -torch.linalg.slogdet(Mk)[1] + d * torch.log(self.st)
        return mu * (_score(q, sig, self.variant) + lam * W.abs().sum((-1, -2))) + h

    def final_sigma(self, cov, eye, sigma_min):
        dif = eye - self.W
        return self._sigma_now((dif * (cov @ dif)).sum(-2), sigma_min)
