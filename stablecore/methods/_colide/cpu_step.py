"""CPU fast path of the CoLiDE step: numpy views of the torch state, preallocated buffers.

At d <= ~200 one Adam step is one LU inverse, one GEMM and ~15 passes over ``[B, d, d]`` arrays,
so per-call overhead matters: steps with no special event (domain violation, restart,
learning-rate halving) run here in numpy on zero-copy views of the torch tensors, writing into
preallocated buffers (``out=``), with Adam as torch's fused CPU kernel (one call instead of 13).
The arithmetic is the masked torch step's (``_Stage._masked``, the CUDA path) up to rounding
(tested to float64 tolerance).

Against the official numpy loop (``inv`` + 3 GEMMs: ``C(I-W)`` for the gradient and
``(I-W)^T C (I-W)`` for the noise level) this step does ``inv`` + 1 GEMM: the diagonal
``q_j = [(I-W)^T C (I-W)]_jj`` is a column sum of ``(I-W) o C(I-W)``, reusing the gradient's GEMM.

Why not Newton-Schulz on CPU: one warm-started step (2 GEMMs, ~0.6x an LU inverse at d=100) leaves
an inverse error of ~3e-7 along a real d=100 trajectory (step residual ``||I - M X||_F ~ 4e-3``,
error ``= residual^2``): far from float64 accuracy and close to the 1e-6 domain check; two steps
cost 4 GEMMs, as much as the inverse (~4 GEMMs at d=100 with OpenBLAS). So the CPU path keeps the
exact inverse (``numpy.linalg.inv``).

BLAS threads: numpy's OpenBLAS would use every core on 100x100 GEMMs, which made a d=100 step
~40x slower on a 2-core machine; :func:`blas_threads` limits it during the fit.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os

import numpy as np
import torch


@functools.lru_cache(maxsize=1)
def _openblas_setters():
    """(get, set) of numpy's bundled OpenBLAS thread count, or None (other BLAS / not found)."""
    libdir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in glob.glob(os.path.join(libdir, "*openblas*")):
        try:
            lib = ctypes.CDLL(path)  # already loaded by numpy: this returns the same handle
        except OSError:
            continue
        for suffix in ("64_", ""):
            for prefix in ("scipy_openblas", "openblas"):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    return get, put
    return None


@contextlib.contextmanager
def blas_threads(n: int):
    """numpy's BLAS thread count set to ``n`` inside the block (threadpoolctl when installed,
    else numpy's bundled OpenBLAS through ctypes; a no-op when neither applies)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
        return
    setters = _openblas_setters()
    if setters is None:
        yield
        return
    get, put = setters
    before = int(get())
    put(int(n))
    try:
        yield
    finally:
        put(before)


def _fused_adam_available() -> bool:
    return hasattr(torch, "_fused_adam_")


class NumpyStep:
    """Buffers and zero-copy views for the fast step of one :class:`_Stage` (rebuilt whenever
    a torch step replaces the stage's tensors). ``sI`` and ``I`` are full buffers so ``sI - W o W``
    and ``I - W`` take one pass each; Adam is torch's fused CPU kernel (one pass instead of 13
    numpy calls; numpy fallback when that private op is missing). Problems are grouped by learning
    rate (all equal unless a domain violation halved one) because the fused op takes one ``lr``."""

    def __init__(self, stage, cov, lam):
        self.stage = stage
        B, d, _ = stage.W.shape
        self.W, self.Wp = stage.W.numpy(), stage.W_prev.numpy()
        dt = self.W.dtype
        self.d, self.C, self.lam = d, cov.numpy(), lam.numpy()
        self.lr, self.it = stage.lr.numpy(), stage.it.numpy()
        self.m, self.v = stage.m.numpy(), stage.v.numpy()
        self.steps, self.sigma = stage.steps.numpy(), stage.sigma.numpy()
        self.eye = np.broadcast_to(np.eye(d, dtype=dt), (B, d, d))
        self.sI = np.ascontiguousarray(self.eye * stage.st.numpy()[:, None, None])
        self.M, self.dif, self.rhs, self.G, self.T = (np.empty((B, d, d), dt) for _ in range(5))
        # sqrt(max(q, floor^2)): one call fewer than max(sqrt(max(q, 0)), floor)
        self.floor2 = max(stage.sigma_min**2, float(np.finfo(dt).tiny))
        self.sig_shape = (B, 1, d) if self.sigma.ndim == 2 else (B, 1, 1)
        self.groups = None
        if _fused_adam_available():
            G = torch.from_numpy(self.G)
            self.groups = [
                (
                    float(lr),
                    [stage.W[i] for i in idx],
                    [G[i] for i in idx],
                    [stage.m[i] for i in idx],
                    [stage.v[i] for i in idx],
                    [stage.it[i] for i in idx],
                )
                for lr in np.unique(self.lr)
                for idx in [np.flatnonzero(self.lr == lr).tolist()]
            ]

    def step(self, mu, b1, b2, domain_tol) -> bool:
        """One Adam step of every problem; False (nothing changed) on any special event."""
        S, W, M, T, G = self.stage, self.W, self.M, self.T, self.G
        np.multiply(W, W, out=M)
        np.subtract(self.sI, M, out=M)
        try:
            Minv = np.linalg.inv(M)
        except np.linalg.LinAlgError:
            return False
        if Minv.min() < -domain_tol:  # left the M-matrix domain: the masked step handles it
            return False
        np.subtract(self.eye, W, out=self.dif)
        np.matmul(self.C, self.dif, out=self.rhs)
        # diag((I-W)^T C (I-W)) from the gradient's GEMM instead of a second one
        q = np.einsum("bij,bij->bj", self.dif, self.rhs)
        variant = S.variant
        if variant == "ev":
            sig = np.sqrt(np.maximum(np.add.reduce(q, -1) / self.d, self.floor2))
        elif variant == "nv":
            sig = np.sqrt(np.maximum(q, self.floor2))
        else:
            sig = None
        if S.maybe_stored and sig is not None:  # a stage's first step: the stored sigma
            keep = S.use_stored.numpy()
            sig = np.where(keep[:, None] if sig.ndim == 2 else keep, self.sigma, sig)
        # G = 2 W o Minv^T + mu lam sign(W) - mu C (I - W) / sigma
        np.multiply(W, Minv.transpose(0, 2, 1), out=G)
        G *= 2.0
        np.sign(W, out=T)
        T *= (mu * self.lam)[:, None, None]
        G += T
        scale = -mu if sig is None else (-mu / sig).reshape(self.sig_shape)
        np.multiply(self.rhs, scale, out=T)
        G += T
        np.copyto(self.Wp, W)  # W_prev keeps W for an undo after a domain violation
        if self.groups is not None:
            for lr, Ws, Gs, ms, vs, its in self.groups:
                torch._fused_adam_(
                    Ws, Gs, ms, vs, [], its, lr=lr, beta1=b1, beta2=b2, weight_decay=0.0,
                    eps=1e-8, amsgrad=False, maximize=False,
                )  # fmt: skip
        else:
            self._adam_numpy(b1, b2)
        if sig is not None:
            self.sigma[...] = sig
        if S.maybe_stored:
            S.use_stored.zero_()
            S.maybe_stored = False
        self.it += 1
        self.steps += 1
        return True

    def _adam_numpy(self, b1, b2):
        m, v, it, G, T = self.m, self.v, self.it, self.G, self.T
        m *= b1
        np.multiply(G, 1 - b1, out=T)
        m += T
        v *= b2
        np.multiply(G, G, out=T)
        T *= 1 - b2
        v += T
        np.divide(v, (1 - b2**it)[:, None, None], out=T)
        np.sqrt(T, out=T)
        T += 1e-8
        np.divide(m, T, out=T)
        T *= (self.lr / (1 - b1**it))[:, None, None]
        self.W -= T
