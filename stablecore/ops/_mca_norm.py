"""SpeedUpNet's stream normalisation inside ``multi_cross_attention``: validation and the maths.

SpeedUpNet (arXiv 2312.08887, released ``SUNAttnProcessor``) rescales its negative-prompt
attention output ``Z-`` to the Frobenius norm of the positive one ``Z+``, then applies a learned
per-channel scale and shift::

    Z~_i = gamma_i * (||Z_0|| / max(||Z_i||, eps)) * Z_i + beta_i
    out  = sum_{j not normalised} w_j Z_j + sum_{i normalised} w_i Z~_i

Choices (documented on the public function):

* ``Z_s`` is stream ``s``'s attention output ``softmax(q k_s^T * scale) v_s`` *before* its weight.
* The norm is ``torch.norm(Z)`` of the released code: one Frobenius norm over the whole
  ``[B, L, H*D]`` tensor, batch included (``mode="batch"``; the same sum of squares as over
  ``[B, H, L, D]``). ``mode="sample"`` takes one norm per batch element (over ``H, L, D``), which
  does not couple the samples of a batch.
* ``eps`` (default ``1e-12``) clamps the denominator; the released code has none and gives NaN
  for an all-zero ``Z_i``.
* ``gamma_i``, ``beta_i`` are per channel ``[H*D]`` in the merged ``[B, L, H*D]`` layout that
  diffusers uses (channel ``h*D + d``), or ``[H, D]``.
* A stream whose keys are all masked for a batch element has ``Z_i = 0`` there and its shift is
  NOT added, so it contributes exactly zero (the op's contract for masked streams).

Gradients (``G = dL/dout``; ``n_s`` the norms, ``r_i = n_0 / max(n_i, eps)``; sums per norm group)::

    dbeta_i  = w_i sum_{b with keys, l} G          dgamma_i = w_i sum_{b, l} r_i G * Z_i
    dr_i     = w_i sum_{group} gamma_i * G * Z_i
    dZ_i     = w_i r_i gamma_i * G + c_i Z_i,   c_i = -dr_i r_i / n_i^2   (0 if n_i <= eps)
    dZ_0     = w_0 G + c_0 Z_0,                 c_0 = sum_i dr_i / (max(n_i, eps) n_0)

so every stream's upstream gradient is ``m_s[b] * a_s[h, d] * G + c_s[b] * Z_s``: the attention
backward (reference or kernel) only needs those three coefficient tensors. A weight given as a
tensor gets ``dw_i = sum G * (gamma_i r_i Z_i + beta_i)`` (normalised) or ``sum G * Z_j`` (plain).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from stablecore.ops import _dispatch

#: The Triton kernel encodes each stream's normalisation slot in 4 bits of one constexpr.
MAX_NORM_STREAMS = 14
NORM_MODES = ("batch", "sample")


def validate_norm(
    q: Tensor,
    n_streams: int,
    norm_streams: Sequence[int],
    scales: Sequence[Tensor],
    shifts: Sequence[Tensor],
    eps: float,
) -> None:
    """Raise ValueError/TypeError naming the offending stream, shape, dtype or device."""
    if not norm_streams:
        if scales or shifts:
            raise ValueError("norm_scales/norm_shifts given but norm_streams is empty")
        return
    if len(norm_streams) > MAX_NORM_STREAMS:
        raise ValueError(f"at most {MAX_NORM_STREAMS} normalised streams, got {len(norm_streams)}")
    if len(set(norm_streams)) != len(norm_streams):
        raise ValueError(f"norm_streams has duplicates: {list(norm_streams)}")
    for i in norm_streams:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"norm_streams must hold ints, got {type(i).__name__}")
        if not 1 <= i < n_streams:
            raise ValueError(
                f"norm_streams entry {i} is not a stream in 1..{n_streams - 1} (stream 0 is the "
                "reference whose norm the others are rescaled to)"
            )
    if len(scales) != len(norm_streams) or len(shifts) != len(norm_streams):
        raise ValueError(
            f"{len(norm_streams)} normalised streams need as many norm_scales and norm_shifts, "
            f"got {len(scales)} and {len(shifts)}"
        )
    heads, head_dim = q.shape[1], q.shape[3]
    for i, gamma, beta in zip(norm_streams, scales, shifts):
        for name, t in (
            (f"norm_scales for stream {i}", gamma),
            (f"norm_shifts for stream {i}", beta),
        ):
            _dispatch.check_floating(name, t)
            _dispatch.check_same_device(q=q, **{name.replace(" ", "_"): t})
            if tuple(t.shape) not in ((heads * head_dim,), (heads, head_dim)):
                raise ValueError(
                    f"{name} must be per channel, [heads*head_dim] = [{heads * head_dim}] or "
                    f"[heads, head_dim] = [{heads}, {head_dim}], got {tuple(t.shape)}"
                )
    if not eps > 0.0:
        raise ValueError(f"norm_eps must be > 0, got {eps}")


def public_norm_args(q, n_streams, norm_streams, norm_scales, norm_shifts, norm_mode, norm_eps):
    """Normalise the public norm_* arguments to the op's (streams, scales, shifts, per_sample,
    eps), filling absent scales with ones and shifts with zeros."""
    if norm_mode not in NORM_MODES:
        raise ValueError(f"norm_mode must be 'batch' (SpeedUpNet's) or 'sample', got {norm_mode!r}")
    if isinstance(norm_streams, int):
        norm_streams = [norm_streams]
    streams = list(norm_streams)
    n = len(streams)
    scales = [None] * n if norm_scales is None else list(norm_scales)
    shifts = [None] * n if norm_shifts is None else list(norm_shifts)
    if len(scales) != n or len(shifts) != n:
        raise ValueError(
            f"{n} normalised streams need as many norm_scales and norm_shifts, "
            f"got {len(scales)} and {len(shifts)}"
        )
    channels = (q.shape[1], q.shape[3]) if q.dim() == 4 else (1, 1)
    fill = lambda t, value: t if t is not None else q.new_full(channels, value)  # noqa: E731
    scales = [fill(t, 1.0) for t in scales]
    shifts = [fill(t, 0.0) for t in shifts]
    validate_norm(q, n_streams, streams, scales, shifts, float(norm_eps))
    return streams, scales, shifts, norm_mode == "sample", float(norm_eps)


def check_weight_tensor(q: Tensor, w: Tensor, n_streams: int) -> Tensor:
    _dispatch.check_floating("weights", w)
    _dispatch.check_same_device(q=q, weights=w)
    if tuple(w.shape) != (n_streams,):
        raise ValueError(
            f"a weights tensor must be 1-D with one weight per stream, [{n_streams}], "
            f"got {tuple(w.shape)}"
        )
    return w


@functools.lru_cache(maxsize=256)
def constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached read-only device tensor of ``values``: no host-to-device copy per call (a sync
    in eager mode, and not allowed while a CUDA graph is being captured)."""
    return torch.tensor(values, dtype=dtype, device=device)


def has_keys(masks: Sequence[Tensor | None], stream: int, batch: int, like: Tensor) -> Tensor:
    """[B] 1.0 where the stream has at least one unmasked key, else 0.0 (``like``'s dtype)."""
    m = masks[stream]
    if m is None:
        return torch.ones(batch, dtype=like.dtype, device=like.device)
    return m.any(-1).to(like.dtype)


def per_group(x: Tensor, per_sample: bool) -> Tensor:
    """[..., B] per-sample sums to [..., G] group sums (G = B per sample, 1 for the batch)."""
    return x if per_sample else x.sum(-1, keepdim=True)


def norms_and_ratios(sumsq: Tensor, per_sample: bool, eps: float) -> tuple[Tensor, Tensor]:
    """sumsq [N+1, B] per-sample sums of squares -> (norms [N+1, G], ratios r_i [N, G])."""
    n = per_group(sumsq, per_sample).sqrt()
    return n, n[:1] / n[1:].clamp_min(eps)


def reference_combine(outs, weights, masks, norm_streams, scales, shifts, per_sample, eps):
    """Differentiable combination of per-stream outputs ``outs[s]`` [B, H, L, D] (compute dtype).

    Returns (out, z_norm [N, B, H, L, D], sumsq [N+1, B]); the last two are detached."""
    batch, heads, _, head_dim = outs[0].shape
    normed = dict(zip(norm_streams, range(len(norm_streams))))
    dims = (1, 2, 3) if per_sample else (0, 1, 2, 3)
    # linalg.vector_norm's gradient is 0 (not NaN) at a zero tensor: a fully masked stream 0.
    n0 = torch.linalg.vector_norm(outs[0], dim=dims)
    out = torch.zeros_like(outs[0])
    for s, (o, w) in enumerate(zip(outs, weights)):
        if s not in normed:
            out = out + w * o
            continue
        slot = normed[s]
        ratio = n0 / torch.linalg.vector_norm(o, dim=dims).clamp_min(eps)
        ratio = ratio.reshape(-1, 1, 1, 1)
        gamma = scales[slot].to(o.dtype).reshape(1, heads, 1, head_dim)
        beta = shifts[slot].to(o.dtype).reshape(1, heads, 1, head_dim)
        keys_left = has_keys(masks, s, batch, o).reshape(batch, 1, 1, 1)
        out = out + w * (gamma * ratio * o + beta * keys_left)
    z_norm = torch.stack([outs[s].detach() for s in norm_streams]) if norm_streams else None
    if z_norm is None:
        z_norm = outs[0].new_empty((0, *outs[0].shape))
    sumsq = torch.stack([outs[s].detach().square().sum((1, 2, 3)) for s in (0, *norm_streams)])
    return out, z_norm, sumsq


def backward_coefficients(grad, z_norm, sumsq, weights, masks, norm_streams, scales, shifts, *args):
    """The upstream-gradient coefficients of every stream and the scale/shift/weight gradients.

    grad: [B, H, L, D] in the compute dtype (float32/float64); z_norm: [N, B, H, L, D];
    weights: floats or a [S] tensor; ``args = (per_sample, eps)``.
    Returns (a [S, H, D], m [S, B], c [S, B], dscales list [H, D], dshifts list [H, D],
    dw [S]) with ``dZ_s = m_s[b] * a_s[h, d] * G + c_s[b] * Z_s`` and ``dw`` the weight gradient
    of the normalised streams (``sum G * (gamma r Z + beta)``; 0 for the plain ones)."""
    per_sample, eps = args
    batch, heads, _, head_dim = grad.shape
    n_streams, dt, dev = len(weights), grad.dtype, grad.device
    if isinstance(weights, Tensor):
        w = weights.detach().to(dt)
    else:
        w = constant(tuple(weights), dt, dev)
    a = w[:, None, None].expand(n_streams, heads, head_dim).clone()
    m = torch.ones(n_streams, batch, dtype=dt, device=dev)
    c = torch.zeros(n_streams, batch, dtype=dt, device=dev)
    dw = torch.zeros(n_streams, dtype=dt, device=dev)
    n, r = norms_and_ratios(sumsq.to(dt), per_sample, eps)
    r_b = r.expand(len(norm_streams), batch)
    grad_rows = grad.sum(2)  # [B, H, D], for the shifts
    c0 = torch.zeros_like(n[0])
    dscales, dshifts = [], []
    for slot, s in enumerate(norm_streams):
        gz = (grad * z_norm[slot].to(dt)).sum(2)  # [B, H, D]
        gamma = scales[slot].detach().to(dt).reshape(heads, head_dim)
        beta = shifts[slot].detach().to(dt).reshape(heads, head_dim)
        keys_left = has_keys(masks, s, batch, grad)
        dscales.append(w[s] * (r_b[slot][:, None, None] * gz).sum(0))
        shift_grad = (keys_left[:, None, None] * grad_rows).sum(0)
        dshifts.append(w[s] * shift_grad)
        gamma_gz = (gamma * gz).sum((1, 2))  # [B]
        dw[s] = (r_b[slot] * gamma_gz).sum() + (beta * shift_grad).sum()
        d_ratio = per_group(w[s] * gamma_gz, per_sample)  # [G]
        n_i = n[slot + 1]
        c_i = torch.where(n_i > eps, -d_ratio * r[slot] / n_i.square().clamp_min(eps * eps), 0.0)
        c0 = c0 + d_ratio / n_i.clamp_min(eps)
        a[s] = w[s] * gamma
        m[s] = r_b[slot]
        c[s] = c_i.expand(batch)
    n0 = n[0]
    c[0] = torch.where(n0 > 0, c0 / torch.where(n0 > 0, n0, 1.0), 0.0).expand(batch)
    return a, m, c, dscales, dshifts, dw
