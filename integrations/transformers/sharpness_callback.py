"""``SharpnessCallback``: log Hessian trace, lambda_max, ||H||_F and 2/lr - lambda_max from a Trainer.

Every ``every`` optimizer steps the callback measures the sharpness of the loss on a fixed batch
with :mod:`stablecore.methods.sharpness` and

* appends ``{"sharpness/trace": ..., "sharpness/lambda_max": ..., "step": ...}`` to
  ``state.log_history`` (so it lands in ``trainer_state.json``), and
* adds the same keys to the next ``logs`` dict that passes through ``on_log``, so reporting
  callbacks registered after it (wandb, tensorboard) see them.

Example::

    >>> from stablecore.integrations.transformers.sharpness_callback import SharpnessCallback
    >>> batch = next(iter(trainer.get_train_dataloader()))          # a dict with "labels"
    >>> trainer.add_callback(SharpnessCallback(batch, every=200))    # doctest: +SKIP

The model is measured in eval mode (no dropout) unless ``train=True`` is passed; models whose
fused kernels lack a double backward fall back as described in :class:`HessianOperator`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from transformers import TrainerCallback

from stablecore.methods.sharpness import HessianOperator
from stablecore.methods.stability import measure_sharpness

__all__ = ["SharpnessCallback"]


class SharpnessCallback(TrainerCallback):
    """Args:
    batch: the measurement batch: model inputs (a dict with ``labels``, as the Trainer feeds
        the model) when ``loss_fn`` is None, else an ``(inputs, targets)`` pair.
    every: measure when ``state.global_step % every == 0`` (step 0 is never measured: the
        callback runs after optimizer steps).
    loss_fn: ``loss_fn(outputs, targets)``; None uses the model output's ``loss``.
    measures: any of ``"trace"``, ``"lambda_max"``, ``"frobenius"``.
    num_probes, lanczos_iters: Hutchinson probes and Lanczos steps per measurement.
    batch_size: for the SGD margin ``2B/lr - Tr(H)``; default: the Trainer's effective batch.
    prefix: metric name prefix.
    op_kwargs: passed to :class:`HessianOperator` (``params``, ``kind``, ``train`` ...).
    """

    def __init__(
        self,
        batch: Any,
        *,
        every: int = 100,
        loss_fn: Callable | None = None,
        measures: Sequence[str] = ("trace", "lambda_max", "frobenius"),
        num_probes: int = 16,
        lanczos_iters: int = 30,
        batch_size: int | None = None,
        prefix: str = "sharpness/",
        **op_kwargs: Any,
    ) -> None:
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a positive int; got {every!r}")
        self.batch, self.every, self.loss_fn = batch, every, loss_fn
        self.measures, self.num_probes, self.lanczos_iters = (
            tuple(measures),
            num_probes,
            lanczos_iters,
        )
        self.batch_size, self.prefix = batch_size, prefix
        self.op_kwargs = {"train": False, **op_kwargs}
        self.history: list[dict[str, float]] = []
        self._pending: dict[str, float] | None = None

    @staticmethod
    def _lr(optimizer: Any, lr_scheduler: Any) -> float | None:
        if lr_scheduler is not None and hasattr(lr_scheduler, "get_last_lr"):
            return float(lr_scheduler.get_last_lr()[0])
        if optimizer is not None:
            return float(optimizer.param_groups[0]["lr"])
        return None

    def on_step_end(
        self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs
    ):
        if model is None or state.global_step % self.every != 0:
            return control
        batch_size = self.batch_size or (
            args.per_device_train_batch_size
            * args.gradient_accumulation_steps
            * max(getattr(args, "world_size", 1), 1)
        )
        op = HessianOperator(model, self.loss_fn, self.batch, **self.op_kwargs)
        rec = measure_sharpness(
            op,
            measures=self.measures,
            num_probes=self.num_probes,
            lanczos_iters=self.lanczos_iters,
            lr=self._lr(optimizer, lr_scheduler),
            batch_size=batch_size,
            seed=state.global_step,
        )
        metrics = {f"{self.prefix}{k}": v for k, v in rec.items()}
        self.history.append({**rec, "step": state.global_step})
        state.log_history.append({**metrics, "step": state.global_step})
        self._pending = metrics
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            logs.update(self._pending)
            self._pending = None
        return control
