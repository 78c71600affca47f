"""Batched Lanczos with full reorthogonalisation, and deflated power iteration.

Both work on any symmetric ``matvec: [P, D] -> [P, D]``. Lanczos runs ``P`` independent
recurrences at once (one matvec call per step serves every probe, which is what makes SLQ cheap
with a vmapped HVP); its tridiagonal coefficients are kept in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

MatVec = Callable[[Tensor], Tensor]


@dataclass
class LanczosState:
    """``alpha: [P, m]``, ``beta: [P, m]`` float64 (``beta[:, j]`` couples steps j and j+1; the last
    one is the residual norm), ``basis: [m, P, D]`` (Lanczos vectors, orthonormal per probe)."""

    alpha: Tensor
    beta: Tensor
    basis: Tensor

    @property
    def steps(self) -> int:
        return self.alpha.shape[1]

    def tridiagonal(self) -> Tensor:
        """``T: [P, m, m]`` float64."""
        off = self.beta[:, :-1]
        return torch.diag_embed(self.alpha) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Ritz values ``[P, m]`` ascending and eigenvectors ``S: [P, m, m]`` of ``T``."""
        return torch.linalg.eigh(self.tridiagonal())


def _orthogonalise(w: Tensor, basis: Tensor) -> Tensor:
    # classical Gram-Schmidt twice ("twice is enough", Parlett): one pass leaves O(eps * cond)
    if basis.shape[1] == 1:  # one probe (eigenvalues): plain matrix products, no einsum overhead
        q = basis[:, 0]
        for _ in range(2):
            w = w - (q @ w[0]) @ q
        return w
    for _ in range(2):
        coef = torch.einsum("jpd,pd->jp", basis, w)
        w = w - torch.einsum("jp,jpd->pd", coef, basis)
    return w


def lanczos(
    matvec: MatVec,
    v0: Tensor,
    num_steps: int,
    *,
    stop: Callable[[LanczosState], bool] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    desc: str = "lanczos",
    check_every: int = 1,
) -> LanczosState:
    """Run ``num_steps`` (at most ``D``) Lanczos steps from the rows of ``v0: [P, D]``.

    On breakdown (the Krylov space of a probe is invariant) the probe restarts from a random
    vector orthogonal to its basis with a zero coupling, so ``T`` stays exact for the spectrum
    and SLQ weights of later blocks are zero. ``stop(state)`` is asked every ``check_every``
    steps (it costs an ``m x m`` eigh).
    """
    P, D = v0.shape
    num_steps = min(num_steps, D)
    if P == 1 and v0.device.type == "cpu":  # its Python-float coefficients would sync a GPU
        return _lanczos_one(matvec, v0, num_steps, stop, generator, progress, desc, check_every)
    # preallocated basis: stacking a growing list every step would copy O(m D) per step
    basis = v0.new_empty(num_steps, P, D)
    q = v0 / v0.norm(dim=-1, keepdim=True)
    basis[0] = q
    alphas = torch.zeros(P, num_steps, dtype=torch.float64, device=v0.device)
    betas = torch.zeros_like(alphas)
    scale = torch.zeros(P, dtype=torch.float64, device=v0.device)
    bar = tqdm(total=num_steps, desc=desc, disable=not progress, leave=False)
    steps = num_steps
    for j in range(num_steps):
        w = matvec(q).to(v0.dtype)
        a = (q * w).sum(-1)
        w = w - a.unsqueeze(-1) * q
        if j > 0:
            w = w - betas[:, j - 1].to(w.dtype).unsqueeze(-1) * basis[j - 1]
        w = _orthogonalise(w, basis[: j + 1])
        b = w.norm(dim=-1)
        alphas[:, j] = a.double()
        scale = torch.maximum(scale, a.double().abs() + b.double())
        # relative breakdown threshold: the residual is rounding noise of this size
        broken = b.double() <= 1e3 * torch.finfo(v0.dtype).eps * scale.clamp_min(1e-300)
        b = torch.where(broken, torch.zeros_like(b), b)
        betas[:, j] = b.double()
        bar.update(1)
        if j == num_steps - 1 or (
            stop is not None
            and (j + 1) % check_every == 0
            and stop(LanczosState(alphas[:, : j + 1], betas[:, : j + 1], basis[: j + 1]))
        ):
            steps = j + 1
            break
        q = w / b.clamp_min(torch.finfo(w.dtype).tiny).unsqueeze(-1)
        if bool(broken.any()):
            r = torch.randn(P, D, dtype=v0.dtype, device=v0.device, generator=generator)
            r = _orthogonalise(r, basis[: j + 1])
            r = r / r.norm(dim=-1, keepdim=True)
            q = torch.where(broken.unsqueeze(-1), r, q)
        basis[j + 1] = q
    bar.close()
    return LanczosState(alphas[:, :steps], betas[:, :steps], basis[:steps])


def _lanczos_one(
    matvec: MatVec,
    v0: Tensor,
    num_steps: int,
    stop: Callable[[LanczosState], bool] | None,
    generator: torch.Generator | None,
    progress: bool,
    desc: str,
    check_every: int,
) -> LanczosState:
    """:func:`lanczos` for one start vector on a CPU (eigenvalues): the same recurrence on 1-D
    tensors with Python-float coefficients, about 10 small tensor ops per step instead of 30 (on a CPU a
    small op costs 5-10 us, as much as a 7k-parameter HVP's elementwise work).

    Reorthogonalisation is classical Gram-Schmidt with a second pass only when the first removed
    most of the vector (the Daniel-Gragg-Kaufman-Stewart test, ``||w_after|| < ||w_before|| /
    sqrt(2)``): enough for orthogonality to working precision."""
    D = v0.shape[1]
    basis = v0.new_empty(num_steps, 1, D)
    flat = basis[:, 0]  # [m, D] view
    torch.div(v0[0], v0[0].norm(), out=flat[0])
    alphas: list[float] = []
    betas: list[float] = []
    scale, tiny = 0.0, 1e3 * torch.finfo(v0.dtype).eps

    def state() -> LanczosState:
        f64 = dict(dtype=torch.float64, device=v0.device)
        m = len(alphas)
        return LanczosState(torch.tensor([alphas], **f64), torch.tensor([betas], **f64), basis[:m])

    bar = tqdm(total=num_steps, desc=desc, disable=not progress, leave=False)
    for j in range(num_steps):
        q = flat[j]
        w = matvec(q.unsqueeze(0))[0].to(v0.dtype)
        a = float(torch.dot(q, w))
        w = torch.sub(w, q, alpha=a)  # a fresh tensor: the matvec's result is not ours to edit
        if j > 0:
            w.sub_(flat[j - 1], alpha=betas[-1])
        known = flat[: j + 1]
        before = float(w.norm())
        w.addmv_(known.T, known @ w, alpha=-1)
        b = float(w.norm())
        if b < 0.7071 * before:
            w.addmv_(known.T, known @ w, alpha=-1)
            b = float(w.norm())
        scale = max(scale, abs(a) + b)
        broken = b <= tiny * scale  # the residual is rounding noise: the Krylov space is invariant
        alphas.append(a)
        betas.append(0.0 if broken else b)
        bar.update(1)
        if j == num_steps - 1 or (
            stop is not None and (j + 1) % check_every == 0 and stop(state())
        ):
            break
        if broken:  # restart from a random direction orthogonal to the basis (zero coupling)
            w = torch.randn(D, dtype=v0.dtype, device=v0.device, generator=generator)
            for _ in range(2):
                w.addmv_(known.T, known @ w, alpha=-1)
            b = float(w.norm())
        torch.div(w, b, out=flat[j + 1])
    bar.close()
    return state()


def power_iteration(
    matvec: MatVec,
    dim: int,
    k: int,
    *,
    num_iters: int = 100,
    tol: float = 1e-6,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor, int]:
    """Top-``k`` eigenpairs by **magnitude** via power iteration with deflation (Gram-Schmidt
    against the pairs found so far). Returns ``(values [k] float64, vectors [k, D], matvecs)``.

    The simple fallback to Lanczos: fewer moving parts, but it converges at rate
    ``|lambda_2/lambda_1|`` per step and returns a negative eigenvalue if it is the largest in
    magnitude (PyHessian's behaviour).
    """
    values, vectors, count = [], [], 0
    for _ in tqdm(range(k), desc="power iteration", disable=not progress, leave=False):
        v = torch.randn(dim, dtype=dtype, device=device, generator=generator)
        found = torch.stack(vectors) if vectors else None
        lam = None
        for _ in range(num_iters):
            if found is not None:
                v = v - found.T @ (found @ v)
            v = v / v.norm()
            hv = matvec(v.unsqueeze(0))[0].to(dtype)
            count += 1
            new = float((v * hv).sum())
            v = hv
            if lam is not None and abs(new - lam) <= tol * max(abs(new), 1e-30):
                lam = new
                break
            lam = new
        if found is not None:
            v = v - found.T @ (found @ v)
        values.append(lam)
        vectors.append(v / v.norm())
    return torch.tensor(values, dtype=torch.float64), torch.stack(vectors), count


@dataclass
class RitzState:
    """Rayleigh-Ritz on an orthonormal basis ``Q: [m, D]`` with its images ``HQ: [m, D]``:
    ``theta: [m]`` ascending and ``S: [m, m]`` (float64)."""

    theta: Tensor
    S: Tensor
    basis: Tensor
    images: Tensor

    @property
    def size(self) -> int:
        return self.theta.shape[0]

    def vectors(self, idx: Tensor) -> Tensor:
        """Unit Ritz vectors ``[len(idx), D]`` in float64."""
        return self.S[:, idx].T.to(self.basis.dtype) @ self.basis

    def residuals(self, idx: Tensor) -> Tensor:
        """Exact ``||H y - theta y||`` of the Ritz pairs ``idx`` from the stored images."""
        s = self.S[:, idx].T.to(self.basis.dtype)
        r = (s @ self.images).double() - self.theta[idx, None] * (s @ self.basis).double()
        return r.norm(dim=-1)


def block_lanczos(
    matvec: MatVec,
    v0: Tensor,
    max_matvecs: int,
    *,
    stop: Callable[[RitzState], bool] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    desc: str = "block lanczos",
) -> RitzState:
    """Block Lanczos from the ``b`` rows of ``v0: [b, D]``: each step is ONE batched matvec of ``b``
    vectors (a batched HVP costs far less than ``b`` single ones), full reorthogonalisation,
    Rayleigh-Ritz on every vector multiplied so far. Stops after ``max_matvecs`` matvecs (a
    multiple of ``b``; at most ``D``) or when ``stop(state)`` (asked after every step) holds.

    The Krylov degree is ``max_matvecs / b``: at equal matvecs a larger block converges more slowly
    for a well-separated top eigenvalue but is more robust to clusters and finds ``k <= b``
    eigenvalues together.
    """
    b, D = v0.shape
    steps = max(1, min(max_matvecs, D) // b)
    basis = v0.new_empty(steps * b, D)
    images = v0.new_empty(steps * b, D)
    # T = Q H Q^T grows by b rows per step (float64 for the eigensolver)
    T = torch.zeros(steps * b, steps * b, dtype=torch.float64, device=v0.device)
    q = torch.linalg.qr(v0.T).Q.T  # [b, D] orthonormal rows
    bar = tqdm(total=steps * b, desc=desc, disable=not progress, leave=False)
    state = None
    for j in range(steps):
        lo, hi = j * b, (j + 1) * b
        basis[lo:hi] = q
        images[lo:hi] = matvec(q).to(v0.dtype)
        bar.update(b)
        rows = (images[lo:hi] @ basis[:hi].T).double()  # [b, hi]: (H q_new) . q_all
        T[lo:hi, :hi] = rows
        T[:hi, lo:hi] = rows.T
        T[lo:hi, lo:hi] = (rows[:, lo:hi] + rows[:, lo:hi].T) / 2
        theta, S = torch.linalg.eigh(T[:hi, :hi])
        state = RitzState(theta, S, basis[:hi], images[:hi])
        if j == steps - 1 or (stop is not None and stop(state)):
            break
        w = images[lo:hi]
        scale = float(w.norm(dim=-1).max())
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            w = w - (w @ basis[:hi].T) @ basis[:hi]
        q, r = torch.linalg.qr(w.T)
        q = q.T
        # rank-deficient block (an invariant subspace): continue from random directions
        weak = r.diagonal().abs() <= 1e3 * torch.finfo(v0.dtype).eps * max(scale, 1e-300)
        if bool(weak.any()):
            fresh = torch.randn(b, D, dtype=v0.dtype, device=v0.device, generator=generator)
            q = torch.where(weak[:, None], fresh, q)
            for _ in range(2):
                q = q - (q @ basis[:hi].T) @ basis[:hi]
            q = torch.linalg.qr(q.T).Q.T
    bar.close()
    assert state is not None
    return state
