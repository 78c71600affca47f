"""Loss modules: :class:`StableMaxCrossEntropyLoss`, a drop-in for ``nn.CrossEntropyLoss``."""

from __future__ import annotations

from torch import Tensor, nn

from stablecore.ops.stablemax_cross_entropy import stablemax_cross_entropy

__all__ = ["StableMaxCrossEntropyLoss"]


class StableMaxCrossEntropyLoss(nn.Module):
    """StableMax cross-entropy (Prieto et al. 2025) through the fused op
    :func:`stablecore.ops.stablemax_cross_entropy`.

    Args:
        ignore_index: target value whose rows are skipped (default -100, as torch).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.
        label_smoothing: eps in [0, 1], torch's convention.
        inplace_grad: write the gradient over the logits in the forward (saves an [N, V]
            buffer; the logits must not be used afterwards).

    Shapes: ``logits [N, V]`` or ``[..., V]`` (classes LAST, unlike ``nn.CrossEntropyLoss``
    for >2-D inputs), ``target [N]`` or ``[...]``; output a scalar, or ``target``'s shape for
    ``"none"``. dtype: that of ``logits`` (float16/bfloat16/float32/float64).

    Example::

        >>> loss_fn = StableMaxCrossEntropyLoss()
        >>> logits = torch.randn(4, 10, requires_grad=True)
        >>> loss_fn(logits, torch.tensor([1, 2, 3, -100])).backward()
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        inplace_grad: bool = False,
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.inplace_grad = inplace_grad

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return stablemax_cross_entropy(
            logits,
            target,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            inplace_grad=self.inplace_grad,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, inplace_grad={self.inplace_grad}"
        )
