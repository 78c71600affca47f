"""Quadratic forms ``v^T H v`` of an MLP's loss Hessian, forward only (second-order Taylor mode).

Hutchinson's trace estimator needs only ``v^T H v = d^2/dt^2 L(theta + t v)`` at ``t = 0``, not
``H v``. Pushing the second-order expansion ``z(t) = z + t z' + t^2/2 z''`` through the network
gives, per layer ``z_l = W_l a_{l-1} + b_l`` with tangent ``(V_l, c_l)`` and ``a_l = act(z_l)``::

    z'_l  = W_l a'_{l-1} + V_l a_{l-1} + c_l          a'_l = act'(z_l) z'_l
    z''_l = W_l a''_{l-1} + 2 V_l a'_{l-1}            a''_l = act'(z_l) z''_l + act''(z_l) z'_l^2

and ``v^T H v = z'_L^T H_out z'_L + g_L . z''_L``. The second term is linear in the sources
``2 V_l a'_{l-1}`` and ``act''(z_l) z'_l^2``, so by the adjoint identity it equals
``sum_l 2 <dL/dz_l, V_l a'_{l-1}> + sum_l <dL/da_l * act''(z_l), z'_l^2>`` with the gradients
already cached by :meth:`StructuredHVP.prepare`. No backward pass per probe: about half the matrix
products of an HVP (3 instead of 6 per hidden layer), each one GEMM over all probes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stablecore.methods._hessian.rop import linear_tangent
from stablecore.methods._hessian.structured import StructuredHVP, _Cache

__all__ = ["quadratic_forms"]


def quadratic_forms(hvp: StructuredHVP, cache: _Cache, V: Tensor) -> Tensor:
    """``v^T H v`` for every row of ``V: [P, D]`` (flat over ``hvp``'s parameters) -> ``[P]``
    float64; equal to ``(V * hvp.apply(cache, V)).sum(-1)`` up to rounding."""
    P, n = V.shape[0], cache.inputs[0].shape[0]
    work = cache.work
    # fp32 partial sums over one layer's [n, P, features] terms are exact to ~1e-6 relative;
    # only the running total is float64 (converting the big tensors would double the traffic)
    total = torch.zeros(P, dtype=torch.float64, device=V.device)
    with torch.no_grad():
        r = None  # z' or a' of the current layer's output: [n, P, features], None while zero
        for i in range(hvp.first, len(hvp.layers)):
            m = hvp.layers[i]
            if type(m) is not nn.Linear:
                if r is None:
                    continue
                if cache.d2[i] is not None:  # <dL/da * act'', z'^2>
                    sq = torch.mul(r, r, out=work.get(("q2", i), r.shape, V))
                    total += sq.mul_(cache.d2[i]).sum((0, 2))
                r = r.mul_(cache.d1[i])  # r is this function's own buffer
                continue
            o, k = m.out_features, m.in_features
            vw = hvp.probe_weights(cache, V, i)
            if vw is not None and r is not None:
                # 2 <dL/dz, V a'>, summed over samples: <V, dL/dz^T a'> per probe
                g = work.get(("qg", i), (o, P, k), V)
                torch.mm(cache.deltas_t[i], r.view(n, P * k), out=g.view(o, P * k))
                total += 2 * g.mul_(vw.transpose(0, 1)).sum((0, 2))
            r = linear_tangent(hvp, cache, V, i, vw, r, ("qz", i))
        # the loss term z'_L^T H_out z'_L (the gradient term was folded in layer by layer)
        total += (r * cache.out_hvp(r)).sum((0, 2))
    return total
