"""CoLiDE: concomitant linear DAG estimation (Saboksayr, Mateos, Tepper; ICLR 2024), batched in torch.

Score for centred data ``X: [n, d]`` with ``C = X^T X / n`` and ``q_j = [(I-W)^T C (I-W)]_jj``:

* ``"ev"`` (equal variance):  ``S = sum_j q_j / (2 sigma) + d sigma / 2``,
  closed form ``sigma = sqrt(sum_j q_j / d)``;
* ``"nv"`` (non-equal variance): ``S = sum_j (q_j / sigma_j + sigma_j) / 2``, ``sigma_j = sqrt(q_j)``;
* ``"dagma"``: ``sigma = 1`` and no ``d sigma / 2`` term, i.e. DAGMA-linear with the l2 loss.

Stage ``k`` minimises ``mu_k (S + lambda ||W||_1) + h(W, s_k)`` with the log-det acyclicity
``h(W, s) = -log det(sI - W o W) + d log s`` by Adam on ``W`` followed by the closed-form ``sigma``,
with the schedule, domain safeguard and early stopping of the reference code (``SAMiatto/colide``).

Batching: ``B`` independent problems (datasets, seeds, lambda values) advance in lock step as
``[B, d, d]`` tensors; per-problem branches (domain restarts, learning-rate halving, early stop) are
``torch.where`` masks, and the host reads device state only once per ``checkpoint`` steps.

Example::

    model = CoLiDE(variant="nv", lambda1=0.05).fit(X)     # X: [n, d] float array or tensor
    model.adjacency_                                       # [d, d] weighted DAG (numpy)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from stablecore.methods._colide.cpu_step import blas_threads
from stablecore.methods._colide.stage import _score, _sigma_closed_form, _Stage  # noqa: F401
from stablecore.methods.dag_utils import to_dag

__all__ = ["CoLiDE", "ColideResult", "colide_fit", "h_ldet"]

VARIANTS = ("ev", "nv", "dagma")


def h_ldet(W: torch.Tensor, s: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-det acyclicity ``h`` and its gradient ``2 W o (sI - W o W)^{-T}``.

    ``W: [..., d, d]``; returns ``h: [...]`` and ``grad: [..., d, d]``. ``h = 0`` iff ``W`` is a DAG
    (inside the M-matrix domain ``s > spectral radius of W o W``).
    """
    if W.ndim < 2 or W.shape[-1] != W.shape[-2]:
        raise ValueError(f"W must be square [..., d, d], got shape {tuple(W.shape)}")
    d = W.shape[-1]
    s = torch.as_tensor(s, dtype=W.dtype, device=W.device)
    eye = torch.eye(d, dtype=W.dtype, device=W.device)
    M = s[..., None, None] * eye - W * W
    h = -torch.linalg.slogdet(M)[1] + d * torch.log(s)
    return h, 2 * W * torch.linalg.inv(M).transpose(-1, -2)


@dataclass
class ColideResult:
    """``W: [B, d, d]`` raw (unthresholded) weights, ``sigma: [B]`` (ev/dagma) or ``[B, d]`` (nv)
    noise std, ``h: [B]`` final acyclicity, ``objective: [B]`` last stage objective, ``steps``:
    Adam steps taken per problem, ``s``: final s per stage ``[B, T]`` (grows on domain restarts)."""

    W: torch.Tensor
    sigma: torch.Tensor
    h: torch.Tensor
    objective: torch.Tensor
    steps: torch.Tensor
    s: torch.Tensor


def _validate(X, dtype, device) -> torch.Tensor:
    X = torch.as_tensor(X)
    if X.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        X = X.to(torch.float64)
    if X.ndim not in (2, 3):
        raise ValueError(f"X must be [n, d] or [B, n, d], got shape {tuple(X.shape)}")
    if X.shape[-2] < 2:
        raise ValueError(f"X needs at least 2 samples (rows), got shape {tuple(X.shape)}")
    if X.shape[-1] < 1:
        raise ValueError(f"X needs at least 1 variable (column), got shape {tuple(X.shape)}")
    if not torch.isfinite(X).all():
        raise ValueError(f"X (shape {tuple(X.shape)}) contains NaN or inf")
    return X.to(device=device, dtype=dtype)


@torch.no_grad()
@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's CPU thread count set to ``n`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def colide_fit(
    X,
    lambda1: float | list[float] | torch.Tensor = 0.05,
    *,
    variant: str = "ev",
    T: int = 5,
    s: float | list[float] = (1.0, 0.9, 0.8, 0.7, 0.6),
    mu_init: float = 1.0,
    mu_factor: float = 0.1,
    warm_iter: int = 30000,
    max_iter: int = 60000,
    lr: float = 3e-4,
    checkpoint: int = 1000,
    tol: float = 1e-6,
    beta_1: float = 0.99,
    beta_2: float = 0.999,
    domain_tol: float = 1e-6,
    sigma_min: float = 0.0,
    inverse: str = "auto",
    ns_steps: int = 2,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    progress: bool = True,
    sync_free: bool | None = None,
    num_threads: int | None = None,
) -> ColideResult:
    """Fit ``B`` CoLiDE problems at once.

    ``X: [n, d]`` or ``[B, n, d]`` (centred here, per problem); ``lambda1``: scalar or ``[B]``
    (with ``X: [n, d]`` a ``[B]`` grid fits one dataset for every lambda). Defaults are the
    reference ``fit()`` ones; ``domain_tol=1e-6`` is CoLiDE's check (DAGMA's is ``1e-16``).
    ``sigma_min`` floors sigma (the paper's sigma_0; the reference code uses none, so 0 here).
    ``inverse``: ``"exact"`` (``inv_ex`` each step), ``"newton_schulz"`` (``ns_steps`` warm-started
    steps, exact refresh every ``checkpoint`` steps and at stage starts) or ``"auto"`` (exact on CPU,
    Newton-Schulz on CUDA).

    ``sync_free``: ``None`` picks the masked, sync-free step on CUDA and an in-place fast path on
    CPU (numpy views of the torch state: torch's per-op overhead dominates at d <= 100; reading a
    flag costs nothing on CPU) that falls back to the masked step on any special event;
    ``True`` forces the masked step everywhere (same results; used to test the CUDA logic on CPU).

    ``num_threads``: torch and numpy-BLAS CPU threads during the fit; ``None`` uses 1 for
    ``d <= 256`` (tiny GEMMs: extra threads only add contention, up to 40x slower on a loaded
    2-core machine), restored after.

    Differences from the reference loop, all confined to rare events: a learning-rate halving
    after leaving the M-matrix domain consumes one step of the (lock-step) loop instead of
    happening inside the same iteration, and early-stopping checks of a problem that restarted a
    stage happen every ``checkpoint`` loop steps rather than at its own iteration multiples.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    d_in = torch.as_tensor(X).shape[-1] if torch.as_tensor(X).ndim else 0
    want = (
        num_threads if num_threads is not None else (1 if d_in <= 256 else torch.get_num_threads())
    )
    with _torch_threads(want), blas_threads(want):
        if T < 1 or checkpoint < 1 or warm_iter < 1 or max_iter < 1:
            raise ValueError("T, checkpoint, warm_iter and max_iter must be >= 1")
        device = torch.device(device) if device is not None else torch.as_tensor(X).device
        X = _validate(X, dtype, device)
        lam = torch.as_tensor(lambda1, dtype=dtype, device=device).reshape(-1)
        if X.ndim == 2:
            X = X.unsqueeze(0)
        if lam.numel() not in (1, X.shape[0]) and X.shape[0] != 1:
            raise ValueError(f"lambda1 has {lam.numel()} values for {X.shape[0]} datasets")
        B = max(X.shape[0], lam.numel())
        lam = lam.expand(B).clone()
        n, d = X.shape[-2:]
        Xc = X - X.mean(-2, keepdim=True)
        cov = (Xc.transpose(-1, -2) @ Xc / n).expand(B, d, d).contiguous()
        if inverse == "auto":
            inverse = "newton_schulz" if device.type == "cuda" else "exact"
        if inverse not in ("exact", "newton_schulz"):
            raise ValueError(f"inverse must be 'auto', 'exact' or 'newton_schulz', got {inverse!r}")
        s_list = [float(s)] * T if isinstance(s, (int, float)) else list(s)
        s_list = (s_list + [s_list[-1]] * T)[:T]

        eye = torch.eye(d, dtype=dtype, device=device)
        col_norm = Xc.square().mean(-2).sqrt().expand(B, d)  # ||X_j|| / sqrt(n), reference init
        if variant == "ev":
            sigma = col_norm.min(-1).values.clone()
        elif variant == "nv":
            sigma = col_norm.clone()
        else:
            sigma = torch.ones(B, dtype=dtype, device=device)
        W = torch.zeros(B, d, d, dtype=dtype, device=device)
        s_hist = torch.tensor(s_list, dtype=dtype, device=device).expand(B, T).clone()
        steps = torch.zeros(B, dtype=torch.long, device=device)
        obj = torch.zeros(B, dtype=dtype, device=device)
        # On CPU reading a flag costs nothing, so steps with no special event take an in-place fast
        # path; on CUDA every step is the masked (sync-free) one.
        cpu_fast = device.type == "cpu" if sync_free is None else not sync_free
        total = (T - 1) * int(warm_iter) + int(max_iter)
        bar = tqdm(total=total, disable=not progress, desc=f"CoLiDE-{variant} B={B} d={d}")
        mu = mu_init
        for k in range(T):
            budget = int(max_iter) if k == T - 1 else int(warm_iter)
            S = _Stage(W, sigma, s_hist[:, k], lr, variant, inverse, sigma_min)
            loop_steps = shown = 0
            # A problem may restart its stage (s += 0.1) several times; cap the lock-step loop.
            while bool(S.active.any()) and loop_steps < 8 * budget:
                chunk = min(checkpoint, budget)
                fast_ok = (
                    cpu_fast and bool(S.active.all()) and bool((S.it + chunk <= budget + 1).all())
                )
                for _ in range(chunk):
                    fast_ok = S.step(
                        cov,
                        lam,
                        mu,
                        eye,
                        budget,
                        beta_1,
                        beta_2,
                        domain_tol,
                        sigma_min,
                        ns_steps,
                        fast_ok,
                    )
                loop_steps += chunk
                obj_new = S.objective(cov, lam, mu, eye, sigma_min)
                conv = S.active & ((S.obj_prev - obj_new).abs() / S.obj_prev.abs() <= tol)
                obj = torch.where(S.active | conv, obj_new, obj)
                S.obj_prev = torch.where(S.active, obj_new, S.obj_prev)
                S.active = S.active & ~conv & (S.it <= budget)
                shown_now = min(loop_steps, budget)
                bar.update(shown_now - shown)
                shown = shown_now
            bar.update(budget - shown)
            W, sigma = S.W, S.final_sigma(cov, eye, sigma_min)
            steps += S.steps
            s_hist[:, k] = S.st
            mu *= mu_factor
        bar.close()
        h_final, _ = h_ldet(W, 1.0)
        return ColideResult(W=W, sigma=sigma, h=h_final, objective=obj, steps=steps, s=s_hist)


class CoLiDE:
    """Scikit-learn-like CoLiDE estimator.

    ``fit(X)`` with ``X: [n, d]`` sets ``W_`` (raw ``[d, d]`` weights, numpy), ``adjacency_``
    (thresholded at ``w_threshold`` then made acyclic by dropping the weakest edges), ``sigma_``
    (noise std: scalar for ev/dagma, ``[d]`` for nv) and ``n_steps_``; ``X: [B, n, d]`` or a
    list of ``lambda1`` values gives leading ``B`` dims instead. Other keywords go to
    :func:`colide_fit`.

    Example::

        est = CoLiDE(variant="ev", lambda1=0.05, T=4, warm_iter=20000, max_iter=70000).fit(X)
        B_est = est.adjacency_ != 0
    """

    def __init__(self, variant: str = "ev", lambda1=0.05, w_threshold: float = 0.3, **fit_kwargs):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.lambda1 = lambda1
        self.w_threshold = w_threshold
        self.fit_kwargs = dict(fit_kwargs)

    def get_params(self, deep: bool = True) -> dict:
        return {
            "variant": self.variant,
            "lambda1": self.lambda1,
            "w_threshold": self.w_threshold,
            **self.fit_kwargs,
        }

    def set_params(self, **params) -> CoLiDE:
        for key, value in params.items():
            if key in ("variant", "lambda1", "w_threshold"):
                setattr(self, key, value)
            else:
                self.fit_kwargs[key] = value
        return self

    def fit(self, X, y=None) -> CoLiDE:
        single = torch.as_tensor(X).ndim == 2 and np.ndim(self.lambda1) == 0
        res = colide_fit(X, self.lambda1, variant=self.variant, **self.fit_kwargs)
        W = res.W.cpu().numpy()
        adj = np.stack([to_dag(w, self.w_threshold) for w in W])
        sig = res.sigma.cpu().numpy()
        self.W_, self.adjacency_, self.sigma_ = (W[0], adj[0], sig[0]) if single else (W, adj, sig)
        self.n_steps_ = res.steps.cpu().numpy()
        self.h_ = res.h.cpu().numpy()
        return self

    def state_dict(self) -> dict:
        state = {"params": self.get_params()}
        for key in ("W_", "adjacency_", "sigma_", "n_steps_", "h_"):
            if hasattr(self, key):
                state[key] = np.array(getattr(self, key), copy=True)
        return state

    def load_state_dict(self, state: dict) -> CoLiDE:
        params = dict(state["params"])
        self.__init__(
            params.pop("variant"), params.pop("lambda1"), params.pop("w_threshold"), **params
        )
        for key, value in state.items():
            if key != "params":
                setattr(self, key, np.array(value, copy=True))
        return self
