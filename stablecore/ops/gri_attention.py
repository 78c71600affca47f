"""GRI-style attention: windowed local self-attention plus pooled global tokens, one softmax.

A-SDM's "global-regional interactive" attention is only known from an abstract (its construction
and complexity are UNVERIFIED, see the paper notes), so this is the most defensible version of
the usual scheme rather than the paper's layer:

* the latent grid ``[grid_h, grid_w]`` (tokens in raster order) is cut into non-overlapping
  ``window x window`` windows (edge windows may be smaller);
* global tokens are the keys and values average-pooled over ``pool x pool`` cells of the grid
  (``ceil_mode``: an edge cell averages the tokens it has). Pooling keys equals pooling the
  hidden states before the (affine) key projection, so this is "global tokens by average-pooling
  the latent grid";
* every query attends to the keys of its own window AND to all global tokens, under ONE softmax.

Cost per query: ``window^2 + ceil(gh/pool) * ceil(gw/pool)`` keys instead of ``gh * gw``.

Layers as in :mod:`stablecore.ops.multi_cross_attention`: reference (eager window reshape and
explicit attention, in ``promote_types(dtype, float32)``), custom op ``stablecore::gri_attention``
(taking the global keys/values as inputs, so the pooling stays differentiable by autograd)
returning ``(out, lse)``, backward as its own op, and a fused Triton forward/backward
(``kernels/gri_attention.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from stablecore.ops import _dispatch

__all__ = ["gri_attention", "pool_global_tokens"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _validate(q, k, v, kg, vg, grid_h: int, grid_w: int, window: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("k_global", kg), ("v_global", vg)):
        _dispatch.check_floating(name, t)
    _dispatch.check_same_device(q=q, k=k, v=v, k_global=kg, v_global=vg)
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, heads, tokens, head_dim], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must have q's shape {tuple(q.shape)}"
        )
    if (
        kg.dim() != 4
        or kg.shape != vg.shape
        or kg.shape[:2] != q.shape[:2]
        or (kg.shape[3] != q.shape[3])
    ):
        raise ValueError(
            f"k_global {tuple(kg.shape)} and v_global {tuple(vg.shape)} must be "
            f"[batch, heads, globals, head_dim] matching q {tuple(q.shape)}"
        )
    if len({q.dtype, k.dtype, v.dtype, kg.dtype, vg.dtype}) != 1:
        raise TypeError(
            f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}, k_global {kg.dtype}, "
            f"v_global {vg.dtype}"
        )
    if grid_h < 1 or grid_w < 1 or grid_h * grid_w != q.shape[2]:
        raise ValueError(
            f"grid {grid_h} x {grid_w} does not hold the {q.shape[2]} tokens of q {tuple(q.shape)}"
        )
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


# ----------------------------------------------------------------------------- reference
def _to_windows(x: Tensor, gh: int, gw: int, w: int) -> Tensor:
    """[B, H, gh*gw, D] -> [B, H, nW, w*w, D] (zero-padded to whole windows)."""
    b, h, _, d = x.shape
    ph, pw = -gh % w, -gw % w
    x = F.pad(x.reshape(b, h, gh, gw, d), (0, 0, 0, pw, 0, ph))
    nh, nw = (gh + ph) // w, (gw + pw) // w
    x = x.reshape(b, h, nh, w, nw, w, d).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, h, nh * nw, w * w, d)


def _from_windows(x: Tensor, gh: int, gw: int, w: int) -> Tensor:
    b, h, _, _, d = x.shape
    nh, nw = -(-gh // w), -(-gw // w)
    x = x.reshape(b, h, nh, nw, w, w, d).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, h, nh * w, nw * w, d)[:, :, :gh, :gw].reshape(b, h, gh * gw, d)


def _window_valid(gh: int, gw: int, w: int, device) -> Tensor:
    ones = torch.ones(1, 1, gh * gw, 1, device=device)
    return _to_windows(ones, gh, gw, w)[0, 0, :, :, 0] > 0  # [nW, w*w]


def _scores(qc, kc, kgc, gh, gw, w, scale):
    """Window-local and global scores concatenated: [B, H, nW, w*w, w*w + G]."""
    qw, kw = _to_windows(qc, gh, gw, w), _to_windows(kc, gh, gw, w)
    local = torch.matmul(qw, kw.transpose(-1, -2)) * scale
    valid = _window_valid(gh, gw, w, qc.device)
    local = local.masked_fill(~valid[:, None, :], float("-inf"))
    glob = torch.matmul(qw, kgc[:, :, None].transpose(-1, -2)) * scale
    return torch.cat([local, glob], dim=-1)


def _reference_outputs(q, k, v, kg, vg, gh, gw, w, scale):
    compute = torch.promote_types(q.dtype, torch.float32)
    qc, kc, vc, kgc, vgc = (t.to(compute) for t in (q, k, v, kg, vg))
    scores = _scores(qc, kc, kgc, gh, gw, w, scale)
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None])
    vw = torch.cat(
        [_to_windows(vc, gh, gw, w), vgc[:, :, None].expand(-1, -1, p.shape[2], -1, -1)], dim=3
    )
    out = torch.matmul(p, vw)
    lse = _from_windows(lse[..., None], gh, gw, w)[..., 0]
    return _from_windows(out, gh, gw, w), lse


def _reference_forward(q, k, v, kg, vg, grid_h, grid_w, window, scale):
    _validate(q, k, v, kg, vg, grid_h, grid_w, window)
    out, lse = _reference_outputs(q, k, v, kg, vg, grid_h, grid_w, window, scale)
    return out.to(q.dtype), lse


def _reference_backward(grad, q, k, v, kg, vg, out, lse, grid_h, grid_w, window, scale):
    """Explicit gradients of one softmax over [window keys, global keys]:
    dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)) * scale, dQ = dS K, dK = dS^T Q."""
    compute = torch.promote_types(q.dtype, torch.float32)
    gh, gw, w = grid_h, grid_w, window
    qc, kc, vc, kgc, vgc, gc, oc = (t.to(compute) for t in (q, k, v, kg, vg, grad, out))
    scores = _scores(qc, kc, kgc, gh, gw, w, scale)
    p = torch.exp(scores - _to_windows(lse.to(compute)[..., None], gh, gw, w))
    n_local = w * w
    qw, gw_ = _to_windows(qc, gh, gw, w), _to_windows(gc, gh, gw, w)
    delta = (gw_ * _to_windows(oc, gh, gw, w)).sum(-1, keepdim=True)
    vw = torch.cat(
        [_to_windows(vc, gh, gw, w), vgc[:, :, None].expand(-1, -1, p.shape[2], -1, -1)], dim=3
    )
    kw = torch.cat(
        [_to_windows(kc, gh, gw, w), kgc[:, :, None].expand(-1, -1, p.shape[2], -1, -1)], dim=3
    )
    ds = p * (torch.matmul(gw_, vw.transpose(-1, -2)) - delta) * scale
    dq = _from_windows(torch.matmul(ds, kw), gh, gw, w)
    dk_all = torch.matmul(ds.transpose(-1, -2), qw)  # [B, H, nW, w*w + G, D]
    dv_all = torch.matmul(p.transpose(-1, -2), gw_)
    dk = _from_windows(dk_all[:, :, :, :n_local], gh, gw, w)
    dv = _from_windows(dv_all[:, :, :, :n_local], gh, gw, w)
    dkg = dk_all[:, :, :, n_local:].sum(2)
    dvg = dv_all[:, :, :, n_local:].sum(2)
    return tuple(t.to(q.dtype) for t in (dq, dk, dv, dkg, dvg))


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("stablecore::gri_attention", mutates_args=())
def _gri_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_global: Tensor,
    v_global: Tensor,
    grid_h: int,
    grid_w: int,
    window: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    return _reference_forward(q, k, v, k_global, v_global, grid_h, grid_w, window, scale)


@_gri_op.register_fake
def _(q, k, v, k_global, v_global, grid_h, grid_w, window, scale):
    _validate(q, k, v, k_global, v_global, grid_h, grid_w, window)
    lse = q.new_empty(q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32))
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@torch.library.custom_op("stablecore::gri_attention_backward", mutates_args=())
def _gri_backward_op(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_global: Tensor,
    v_global: Tensor,
    out: Tensor,
    lse: Tensor,
    grid_h: int,
    grid_w: int,
    window: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _reference_backward(
        grad, q, k, v, k_global, v_global, out, lse, grid_h, grid_w, window, scale
    )


@_gri_backward_op.register_fake
def _(grad, q, k, v, k_global, v_global, out, lse, grid_h, grid_w, window, scale):
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format)
        for t in (q, k, v, k_global, v_global)
    )


def _setup_context(ctx, inputs, output):
    q, k, v, kg, vg, grid_h, grid_w, window, scale = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(q, k, v, kg, vg, output[0], output[1])
    ctx.args = (grid_h, grid_w, window, scale)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, kg, vg, out, lse = ctx.saved_tensors
    grads = _gri_backward_op(grad_out.contiguous(), q, k, v, kg, vg, out, lse, *ctx.args)
    return (*grads, None, None, None, None)


_gri_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- Triton backend
def _triton_forward(q, k, v, kg, vg, grid_h, grid_w, window, scale):
    from stablecore.kernels import gri_attention as kernels

    _validate(q, k, v, kg, vg, grid_h, grid_w, window)
    qc, kc, vc, kgc, vgc = (t.contiguous() for t in (q, k, v, kg, vg))
    out = torch.empty_like(qc)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if q.numel() > 0:
        kernels.gri_fwd(qc, kc, vc, kgc, vgc, out, lse, grid_h, grid_w, window, scale)
    return out, lse


def _triton_backward(grad, q, k, v, kg, vg, out, lse, grid_h, grid_w, window, scale):
    from stablecore.kernels import gri_attention as kernels

    qc, kc, vc, kgc, vgc, gc = (t.contiguous() for t in (q, k, v, kg, vg, grad))
    # Delta = rowsum(dO * O) once, in float32 (the standard flash-attention backward trick).
    delta = (gc.float() * out.float()).sum(-1).contiguous()
    dq = torch.empty_like(qc)
    dk, dv = (torch.zeros(k.shape, dtype=torch.float32, device=q.device) for _ in range(2))
    dkg, dvg = (torch.zeros(kg.shape, dtype=torch.float32, device=q.device) for _ in range(2))
    if q.numel() > 0:
        kernels.gri_bwd(
            qc,
            kc,
            vc,
            kgc,
            vgc,
            gc,
            lse.float().contiguous(),
            delta,
            dq,
            dk,
            dv,
            dkg,
            dvg,
            grid_h,
            grid_w,
            window,
            scale,
        )
    return (dq, dk.to(q.dtype), dv.to(q.dtype), dkg.to(q.dtype), dvg.to(q.dtype))


def _unsupported(q, k, v, kg, *args) -> str | None:
    if q.dtype not in _TRITON_DTYPES:
        return f"dtype {q.dtype} has no Triton kernel"
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} > 256 does not fit the kernel's registers"
    if kg.shape[2] == 0:
        return "no global tokens"
    return None


def _unsupported_backward(grad, q, k, v, kg, *args) -> str | None:
    return _unsupported(q, k, v, kg)


_dispatch.register_triton_kernel(_gri_op, _triton_forward, _reference_forward, _unsupported)
_dispatch.register_triton_kernel(
    _gri_backward_op, _triton_backward, _reference_backward, _unsupported_backward
)
_dispatch.describe_op(
    "gri_attention",
    triton_dtypes=_TRITON_DTYPES,
    note="window + pooled-global attention; A-SDM's exact GRI is unverified",
)
_dispatch.describe_op("gri_attention_backward", triton_dtypes=_TRITON_DTYPES)


# ----------------------------------------------------------------------------- public API
def pool_global_tokens(x: Tensor, grid_size: tuple[int, int], pool_size: int) -> Tensor:
    """Average-pool ``x: [B, H, gh*gw, D]`` over ``pool x pool`` grid cells (an edge cell
    averages the tokens it holds) -> ``[B, H, ceil(gh/p) * ceil(gw/p), D]``. Differentiable."""
    b, h, n, d = x.shape
    gh, gw = grid_size
    grid = x.reshape(b * h, gh, gw, d).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, pool_size, stride=pool_size, ceil_mode=True)
    return pooled.flatten(2).transpose(1, 2).reshape(b, h, -1, d)


def gri_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid_size: tuple[int, int],
    window_size: int = 8,
    pool_size: int | None = None,
    scale: float | None = None,
) -> Tensor:
    """Window-local attention plus attention to pooled global tokens, under one softmax.

    Args:
        q, k, v: ``[B, H, N, D]`` self-attention inputs, tokens in raster order of a
            ``grid_size = (grid_h, grid_w)`` latent grid (``N = grid_h * grid_w``);
            float16/bfloat16/float32/float64.
        window_size: side of the local windows (edge windows may be smaller).
        pool_size: side of the average-pooling cells that make the global tokens
            (default ``window_size``: one global token per window).
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``[B, H, N, D]`` in q's dtype.

    Example::

        >>> q = k = v = torch.randn(1, 8, 64 * 64, 40)
        >>> out = gri_attention(q, k, v, (64, 64), window_size=8, pool_size=4)  # 64 + 256 keys
    """
    if not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2:
        raise TypeError(f"grid_size must be (grid_h, grid_w), got {grid_size!r}")
    grid_h, grid_w = int(grid_size[0]), int(grid_size[1])
    window = int(window_size)
    if window < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    pool = window if pool_size is None else int(pool_size)
    if pool < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    _validate(q, k, v, q, q, grid_h, grid_w, window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kg = pool_global_tokens(k, (grid_h, grid_w), pool)
    vg = pool_global_tokens(v, (grid_h, grid_w), pool)
    if _dispatch.plain_reference_requested():
        out, _ = _reference_outputs(q, k, v, kg, vg, grid_h, grid_w, window, scale)
        return out.to(q.dtype)
    return _gri_op(q, k, v, kg, vg, grid_h, grid_w, window, scale)[0]
