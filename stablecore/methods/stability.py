"""Linear (dynamical) stability of a minimum for GD and SGD, and a sharpness monitor for training.

Wu & Su (ICML 2023): a minimum that is linearly stable for SGD has ``Tr(H) <= 2/lr``; for GD
only ``lambda_max(H) <= 2/lr`` follows. In the tight model of orthogonal per-sample gradients
(``shared/papers/sgd_stability.md`` §3) SGD with batch ``B`` (without replacement) is stable iff
``lr <= 2B/Tr(H)``, and GD iff ``lr <= 2/lambda_max``. The Frobenius form
``||H||_F <= 2 sqrt(B)/lr`` is the necessary condition of Wu, Wang & Su (2022) with the constant of
that tight model (the paper's constant depends on an alignment factor; UNVERIFIED).

Example::

    >>> rep = linear_stability(model, nn.MSELoss(), (x, y), lr=0.1, batch_size=4)
    >>> rep.gd_stable, rep.sgd_stable, rep.gd_margin                # doctest: +SKIP
    >>> print(rep)                                                  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from stablecore.methods.sharpness import HessianOperator, hessian_trace, top_eigenvalues

__all__ = ["SharpnessMonitor", "StabilityReport", "linear_stability", "measure_sharpness"]


@dataclass
class StabilityReport:
    """The numbers, margins (positive = inside the stable region) and verdicts.

    * GD: ``gd_threshold_lr = 2/lambda_max``, ``gd_margin = 2/lr - lambda_max``.
    * SGD, batch 1 form of the paper: ``sgd_trace_margin = 2/lr - Tr(H)``.
    * SGD, batch form: ``sgd_threshold_lr = 2B/Tr(H)``, ``sgd_margin = 2B/lr - Tr(H)``.
    * Frobenius form: ``frobenius_margin = 2 sqrt(B)/lr - ||H||_F``.
    * ``trace_margin_sigmas``: ``sgd_margin / trace_stderr`` (|.| < 3: the verdict is uncertain).
    """

    lr: float
    batch_size: int
    trace: float
    trace_stderr: float
    lambda_max: float
    frobenius: float
    gd_threshold_lr: float
    gd_margin: float
    gd_stable: bool
    sgd_trace_margin: float
    sgd_threshold_lr: float
    sgd_margin: float
    sgd_stable: bool
    frobenius_margin: float
    frobenius_ok: bool
    trace_margin_sigmas: float

    def as_dict(self) -> dict[str, float | bool]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"linear stability at lr={self.lr:.4g}, batch={self.batch_size}:"]
        lines.append(
            f"  lambda_max = {self.lambda_max:.5g}; GD needs lr <= {self.gd_threshold_lr:.5g}"
            f" -> {'stable' if self.gd_stable else 'UNSTABLE'}"
        )
        lines.append(
            f"  Tr(H) = {self.trace:.5g} +- {self.trace_stderr:.2g}; SGD needs lr <= "
            f"{self.sgd_threshold_lr:.5g} -> {'stable' if self.sgd_stable else 'UNSTABLE'}"
            f" ({self.trace_margin_sigmas:+.1f} sigma)"
        )
        lines.append(
            f"  ||H||_F = {self.frobenius:.5g}; bound 2 sqrt(B)/lr = "
            f"{2 * math.sqrt(self.batch_size) / self.lr:.5g}"
        )
        return "\n".join(lines)


def _safe_div(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def linear_stability(
    model: nn.Module | HessianOperator,
    loss_fn: Any = None,
    data: Any = None,
    *,
    lr: float,
    batch_size: int = 1,
    num_probes: int | None = None,
    rtol: float = 0.02,
    probe_batch: int = 64,
    seed: int = 0,
    progress: bool = False,
    **op_kwargs: Any,
) -> StabilityReport:
    """Evaluate the GD and SGD linear-stability conditions at the current parameters.

    ``data`` should be the full training set (a batch or a loader): the conditions concern the
    Hessian of the full loss at a minimum. ``lambda_max`` is computed by Lanczos, ``Tr(H)`` and
    ``||H||_F`` by Hutchinson (``num_probes`` fixed, else adaptive to ``rtol``).
    """
    if not lr > 0:
        raise ValueError(f"lr must be positive; got {lr}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    op = (
        model
        if isinstance(model, HessianOperator)
        else HessianOperator(model, loss_fn, data, **op_kwargs)
    )
    est = hessian_trace(
        op, num_probes=num_probes, rtol=rtol, probe_batch=probe_batch, seed=seed, progress=progress
    )
    lam = float(top_eigenvalues(op, k=1, seed=seed, progress=progress).eigenvalues[0])
    tr, fro, b = est.trace, est.frobenius, batch_size
    sgd_margin = 2 * b / lr - tr
    return StabilityReport(
        lr=lr,
        batch_size=b,
        trace=tr,
        trace_stderr=est.stderr,
        lambda_max=lam,
        frobenius=fro,
        gd_threshold_lr=_safe_div(2.0, lam),
        gd_margin=2 / lr - lam,
        gd_stable=lam <= 2 / lr,
        sgd_trace_margin=2 / lr - tr,
        sgd_threshold_lr=_safe_div(2.0 * b, tr),
        sgd_margin=sgd_margin,
        sgd_stable=tr <= 2 * b / lr,
        frobenius_margin=2 * math.sqrt(b) / lr - fro,
        frobenius_ok=fro <= 2 * math.sqrt(b) / lr,
        trace_margin_sigmas=sgd_margin / est.stderr
        if est.stderr > 0
        else math.copysign(math.inf, sgd_margin),
    )


def measure_sharpness(
    op: HessianOperator,
    *,
    measures: Sequence[str] = ("trace", "lambda_max", "frobenius"),
    num_probes: int = 16,
    lanczos_iters: int = 30,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """One record: ``trace``, ``trace_stderr``, ``frobenius``, ``lambda_max``, and with ``lr`` the
    margins ``gd_margin = 2/lr - lambda_max`` and (with ``batch_size``) ``sgd_margin = 2B/lr - Tr``."""
    rec: dict[str, float] = {}
    if "trace" in measures or "frobenius" in measures:
        est = hessian_trace(
            op,
            num_probes=num_probes,
            seed=seed,
            progress=progress,
            quadratic_only="frobenius" not in measures,  # forward-only v^T H v suffices
        )
        if "trace" in measures:
            rec.update(trace=est.trace, trace_stderr=est.stderr)
        if "frobenius" in measures:
            rec["frobenius"] = est.frobenius
    if "lambda_max" in measures:
        res = top_eigenvalues(op, k=1, max_iters=lanczos_iters, seed=seed, progress=progress)
        rec["lambda_max"] = float(res.eigenvalues[0])
    if lr is not None:
        rec["lr"] = float(lr)
        if "lambda_max" in rec:
            rec["gd_margin"] = 2.0 / lr - rec["lambda_max"]
        if batch_size is not None and "trace" in rec:
            rec["sgd_margin"] = 2.0 * batch_size / lr - rec["trace"]
    return rec


class SharpnessMonitor:
    """Measure sharpness every ``every`` calls of :meth:`step` in a plain training loop.

    Args:
        model, loss_fn, data: as :class:`HessianOperator` (``data``: a fixed measurement batch).
        every: measure on steps 0, every, 2*every, ...
        optimizer: read ``lr`` from its first param group when :meth:`step` gets none.
        batch_size: the training batch size, for the SGD margin ``2B/lr - Tr(H)``.
        measures, num_probes, lanczos_iters: what to measure and how hard.
        log_fn: called with each record (e.g. a logger or ``wandb.log``).

    ``history`` holds the records (each with ``step``); ``state_dict`` round-trips it. Example::

        >>> mon = SharpnessMonitor(model, nn.MSELoss(), (x, y), every=50, optimizer=opt)
        >>> for step in range(1000):
        ...     train_step(); mon.step()                                 # doctest: +SKIP
        >>> mon.history[-1]["lambda_max"]                                # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        *,
        every: int = 100,
        optimizer: torch.optim.Optimizer | None = None,
        batch_size: int | None = None,
        measures: Sequence[str] = ("trace", "lambda_max", "frobenius"),
        num_probes: int = 16,
        lanczos_iters: int = 30,
        log_fn: Callable[[dict[str, float]], Any] | None = None,
        progress: bool = False,
        **op_kwargs: Any,
    ) -> None:
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a positive int; got {every!r}")
        unknown = set(measures) - {"trace", "lambda_max", "frobenius"}
        if unknown:
            raise ValueError(f"unknown measures {sorted(unknown)}")
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.every, self.optimizer, self.batch_size = every, optimizer, batch_size
        self.measures, self.num_probes, self.lanczos_iters = (
            tuple(measures),
            num_probes,
            lanczos_iters,
        )
        self.log_fn, self.progress, self.op_kwargs = log_fn, progress, op_kwargs
        self.num_steps = 0
        self.history: list[dict[str, float]] = []

    def measure(self, lr: float | None = None, step: int | None = None) -> dict[str, float]:
        """Measure now and record (the operator is rebuilt: parameters may have been replaced)."""
        if lr is None and self.optimizer is not None:
            lr = float(self.optimizer.param_groups[0]["lr"])
        op = HessianOperator(self.model, self.loss_fn, self.data, **self.op_kwargs)
        rec = measure_sharpness(
            op,
            measures=self.measures,
            num_probes=self.num_probes,
            lanczos_iters=self.lanczos_iters,
            lr=lr,
            batch_size=self.batch_size,
            seed=len(self.history),
            progress=self.progress,
        )
        rec["step"] = self.num_steps if step is None else step
        self.history.append(rec)
        if self.log_fn is not None:
            self.log_fn(rec)
        return rec

    def step(self, lr: float | None = None) -> dict[str, float] | None:
        """Count one training step; measure (and return the record) on every ``every``-th."""
        rec = self.measure(lr) if self.num_steps % self.every == 0 else None
        self.num_steps += 1
        return rec

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        self.history = [dict(r) for r in state["history"]]
