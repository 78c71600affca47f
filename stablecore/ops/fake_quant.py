"""Group-wise 4-bit fake quantization (quantize, then dequantize) with outlier retention.

This is the quantizer of "4-bit training" in Stable-SPAM (arXiv 2502.17055; code
``TianjinYellow/StableSPAM`` ``utils/act_weight_quantization.py`` and ``act_weight_fp4.py``):
weights and activations of the linear layers are rounded to a 4-bit grid in the forward pass,
nothing is stored in 4 bits, and the gradient passes straight through (STE).

Grouping: ``x`` is read as one flat row-major sequence cut into groups of ``group_size``
contiguous elements, as the paper's code does (``x.view(-1, 256)``), so groups may straddle rows
when a row is not a multiple of ``group_size``; the last group may be shorter (the paper's code
would fail there). In each group the ``keep_outliers`` largest ``|x|`` (lowest index first on a
tie) are kept exact and left out of the group statistics. Formats, with s the group's step:

* ``"int4_asym"`` (the paper's INT4 **weights**): s = (max - min) / 15 (max - min at least 1e-5),
  z = clamp(-round(min / s), 0, 15), q = clamp(round(x / s) + z, 0, 15), out = (q - z) * s:
  16 levels. As in the paper, z is clamped, so a group whose values are all positive (or all
  negative) is clipped at 15 s above (below) zero.
* ``"int4_sym"`` (the paper's INT4 **activations**): s = absmax / 7 (absmax at least 1e-6),
  out = clamp(round(x / s), -8, 7) * s: 15 levels, plus the exact outliers.
* ``"fp4_paper"`` (the paper's "FP4", e=1 m=2 b=1, weights and activations): the code's exponent
  term never gets above its floor, so it is the uniform grid s = absmax / 4, 9 levels
  {0, +-1/4, +-1/2, +-3/4, +-1} x absmax (checked by running the original).
* ``"e2m1"`` (a true FP4 E2M1 option): s = absmax / 6 (absmax at least 1e-30), out = s times the
  E2M1 value nearest to x / s among {0, 0.5, 1, 1.5, 2, 3, 4, 6} (signed): 15 levels.

``round`` is round-half-to-even (``torch.round``). Everything is computed in
``promote_types(dtype, float32)`` with divisions (the paper multiplies by a reciprocal in bf16,
so it may differ from this in the last bit of a scale or on an exact tie).
Non-finite inputs make their group's output unspecified.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stablecore.ops import _dispatch

__all__ = ["FORMATS", "fake_quant"]

FORMATS = ("int4_asym", "int4_sym", "fp4_paper", "e2m1")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_E2M1_POSITIVE = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _validate(x: Tensor, fmt: str, group_size: int, keep_outliers: int) -> None:
    _dispatch.check_floating("x", x)
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not isinstance(keep_outliers, int) or not 0 <= keep_outliers < group_size:
        raise ValueError(
            f"keep_outliers must be an int in [0, group_size={group_size}), got {keep_outliers!r}"
        )


# ----------------------------------------------------------------------------- 1. reference
def _rest_scores(v: Tensor, n_valid: int, k: int) -> tuple[Tensor, Tensor]:
    """(score, idx): ``score`` [G, S] is |v| with the k outliers of each row set to -inf and
    padding to -1, so ``score >= 0`` marks the rest and ``score.amax(-1)`` is their absmax;
    ``idx`` [G, k] holds the outliers' columns (the k largest |v|, lowest index on a tie)."""
    score = v.abs()
    if n_valid < v.numel():
        pad = torch.arange(v.numel(), device=v.device).view(v.shape) >= n_valid
        score = score.masked_fill(pad, -1.0)
    picks = []
    for _ in range(k):
        idx = score.argmax(-1, keepdim=True)  # argmax returns the first maximum
        score.scatter_(1, idx, float("-inf"))
        picks.append(idx)
    idx = torch.cat(picks, 1) if picks else v.new_empty((v.shape[0], 0), dtype=torch.long)
    return score, idx


def _quantize_groups(v: Tensor, score: Tensor, fmt: str) -> Tensor:
    """Dequantized grid values of ``v: [G, S]``; statistics over ``score >= 0`` only."""
    if fmt == "int4_asym":
        rest = score >= 0
        any_rest = rest.any(-1, keepdim=True)
        hi = torch.where(rest, v, float("-inf")).amax(-1, keepdim=True)
        lo = torch.where(rest, v, float("inf")).amin(-1, keepdim=True)
        hi, lo = torch.where(any_rest, hi, 0.0), torch.where(any_rest, lo, 0.0)
        scale = (hi - lo).clamp_min(1e-5) / 15.0
        zero = (-torch.round(lo / scale)).clamp(0.0, 15.0)
        q = (torch.round(v / scale) + zero).clamp(0.0, 15.0)
        return (q - zero) * scale
    absmax = score.amax(-1, keepdim=True).clamp_min(0.0)
    if fmt == "int4_sym":
        step = absmax.clamp_min(1e-6) / 7.0
        return torch.round(v / step).clamp_(-8.0, 7.0).mul_(step)
    if fmt == "fp4_paper":
        step = absmax.clamp_min(1e-6) * 0.25
        return torch.round(v / step).clamp_(-4.0, 4.0).mul_(step)
    scale = absmax.clamp_min(1e-30) / 6.0
    y = (v.abs() / scale).clamp_max(6.0)
    mag = torch.where(
        y < 2.0,
        torch.round(y * 2.0) * 0.5,
        torch.where(y < 4.0, torch.round(y), torch.round(y * 0.5) * 2.0),
    )
    return torch.where(v < 0, -mag, mag) * scale


def _reference(x: Tensor, fmt: str, group_size: int, keep_outliers: int) -> Tensor:
    _validate(x, fmt, group_size, keep_outliers)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    flat = x.reshape(-1).to(compute_dtype)
    n = flat.numel()
    n_groups = -(-n // group_size)
    pad = n_groups * group_size - n
    v = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(n_groups, group_size)
    score, idx = _rest_scores(v, n, keep_outliers)
    out = _quantize_groups(v, score, fmt)
    if keep_outliers:
        out.scatter_(1, idx, v.gather(1, idx))
    return out.reshape(-1)[:n].to(x.dtype).view(x.shape)


# ----------------------------------------------------------------------------- 2-4. custom op
@torch.library.custom_op("stablecore::fake_quant", mutates_args=())
def _fake_quant_op(x: Tensor, fmt: str, group_size: int, keep_outliers: int) -> Tensor:
    return _reference(x, fmt, group_size, keep_outliers)


@_fake_quant_op.register_fake
def _(x, fmt, group_size, keep_outliers):
    _validate(x, fmt, group_size, keep_outliers)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad_out):
    # Straight-through estimator, as the paper: d out / d x is taken to be the identity. It needs
    # no kernel of its own (nothing to compute), so there is no separate backward op.
    return grad_out, None, None, None


_fake_quant_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- 5. Triton backend
def _unsupported(x: Tensor, fmt: str, group_size: int, keep_outliers: int) -> str | None:
    from stablecore.kernels import fake_quant as kernels

    if x.dtype not in _TRITON_DTYPES:
        return f"dtype {x.dtype} has no Triton kernel (float16/bfloat16/float32 do)"
    if group_size > kernels.MAX_GROUP:
        return f"group_size {group_size} > {kernels.MAX_GROUP} does not fit in registers"
    if keep_outliers > kernels.MAX_OUTLIERS:
        return f"keep_outliers {keep_outliers} > {kernels.MAX_OUTLIERS}"
    return None


def _triton_launch(x: Tensor, fmt: str, group_size: int, keep_outliers: int) -> Tensor:
    from stablecore.kernels import fake_quant as kernels

    _validate(x, fmt, group_size, keep_outliers)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return out
    kernels.fake_quant(x.contiguous().view(-1), out.view(-1), fmt, group_size, keep_outliers)
    return out


_dispatch.register_triton_kernel(_fake_quant_op, _triton_launch, _reference, _unsupported)
_dispatch.describe_op(
    "fake_quant",
    triton_dtypes=_TRITON_DTYPES,
    note="group-wise 4-bit quantize-dequantize with outliers; STE backward",
)


# ----------------------------------------------------------------------------- 6. public API
def fake_quant(
    x: Tensor, fmt: str = "int4_sym", group_size: int = 256, keep_outliers: int = 2
) -> Tensor:
    """Quantize ``x`` to a 4-bit grid group by group and dequantize it, with an STE gradient.

    Args:
        x: any shape, float16/bfloat16/float32/float64, any strides. Groups are
            ``group_size`` consecutive elements of ``x`` flattened in row-major order.
        fmt: ``"int4_asym"`` (paper weights), ``"int4_sym"`` (paper activations),
            ``"fp4_paper"`` (the paper's 9-level "FP4") or ``"e2m1"`` (true FP4); see the module
            docstring for each grid.
        group_size: elements per group (the paper uses 256).
        keep_outliers: the largest-|x| elements of each group kept exact (paper: 2 for
            activations and FP4 weights, 0 for INT4 weights); ``0 <= keep_outliers < group_size``.

    Returns:
        A contiguous tensor of ``x``'s shape and dtype. Its gradient is the incoming gradient
        unchanged (straight-through).

    Raises:
        TypeError: ``x`` is not floating point. ValueError: unknown ``fmt`` or bad sizes.

    Example::

        >>> x = torch.randn(4, 256)
        >>> y = fake_quant(x, "int4_sym", 256, keep_outliers=2)
        >>> [len(torch.unique(r)) <= 15 + 2 for r in y]
        [True, True, True, True]
    """
    _validate(x, fmt, group_size, keep_outliers)
    if _dispatch.plain_reference_requested():
        # Plain torch ops with the same STE gradient, for torch.func / higher-order autograd.
        # x - x.detach() is exactly zero, so the forward value is the quantized one bit for bit.
        return _reference(x.detach(), fmt, group_size, keep_outliers) + (x - x.detach())
    return _fake_quant_op(x, fmt, group_size, keep_outliers)
