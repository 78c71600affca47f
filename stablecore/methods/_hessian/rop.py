"""The R-op rules of :class:`.structured.StructuredHVP`: ``H v`` for one probe and for a batch.

R-forward carries the tangent of every layer's input next to the cached activations; the loss's
logit Hessian maps the output tangent to ``R delta``; R-backward carries it down next to the
cached gradients, and each Linear layer's slice of ``H v`` is ``R delta^T a + delta^T R a`` (its
bias: ``sum R delta``). See the module docstring of :mod:`.structured`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from stablecore.methods._hessian.structured import StructuredHVP, _Cache

__all__ = ["hvp_batched", "hvp_single", "linear_tangent"]


def hvp_single(hvp: StructuredHVP, cache: _Cache, v: Tensor) -> Tensor:
    """``H v`` for one ``v: [D]`` -> ``[D]``: the rules of :func:`hvp_batched` on 2-D tensors,
    about half the tensor ops (the per-op overhead dominates one probe)."""
    # every selected parameter sits in a Linear, so the slices written below tile [0, D) exactly
    out = v.new_empty(hvp.dim)
    work, n = cache.work, cache.inputs[0].shape[0]
    with torch.no_grad():
        tangents: list[tuple[Tensor | None, Tensor | None]] = []
        for m, slot in zip(hvp.layers, hvp.slots):
            ws, bs = slot if slot is not None else (None, None)
            vw = None if ws is None else v[ws[0] : ws[0] + ws[1]].view(m.out_features, -1)
            tangents.append((vw, None if bs is None else v[bs[0] : bs[0] + bs[1]]))
        # results go to reused workspace tensors: fresh ones cost page faults and cold cache
        rz: list[Tensor | None] = [None] * len(hvp.layers)
        r = None
        for i in range(hvp.first, len(hvp.layers)):
            m, rz[i] = hvp.layers[i], r
            if type(m) is nn.Linear:
                vw, vb = tangents[i]
                if vw is None and r is None:
                    r = vb.expand(n, -1).clone()
                    continue
                new = work.get(("1z", i), (n, m.out_features), v)
                if vw is not None:
                    torch.mm(cache.inputs[i], vw.T, out=new)
                    if r is not None:
                        new.addmm_(r, m.weight.T)
                else:
                    torch.mm(r, m.weight.T, out=new)
                if vb is not None:
                    new.add_(vb)
                r = new
            elif r is not None:
                r = torch.mul(r, cache.d1_2d[i], out=work.get(("1a", i), r.shape, v))
        rd = cache.out_hvp(r.unsqueeze(1))[:, 0]
        for i in range(len(hvp.layers) - 1, hvp.first - 1, -1):
            m = hvp.layers[i]
            if type(m) is not nn.Linear:
                rd = torch.mul(rd, cache.d1_2d[i], out=work.get(("1rd", i), rd.shape, v))
                if cache.d2_2d[i] is not None and rz[i] is not None:
                    rd.addcmul_(cache.d2_2d[i], rz[i])
                continue
            (vw, _), slot = tangents[i], hvp.slots[i]
            if slot is not None and slot[1] is not None:
                torch.sum(rd, 0, out=out[slot[1][0] : slot[1][0] + slot[1][1]])
            if slot is not None and slot[0] is not None:
                off, num = slot[0]
                gw = torch.mm(rd.T, cache.inputs[i], out=out[off : off + num].view(rd.shape[1], -1))
                if rz[i] is not None:
                    gw.addmm_(cache.deltas_t[i], rz[i])
            if i > hvp.first:
                new = torch.mm(rd, m.weight, out=work.get(("1rdin", i), (n, m.in_features), v))
                rd = new if vw is None else new.addmm_(cache.deltas[i], vw)
    return out


def linear_tangent(
    hvp: StructuredHVP,
    cache: _Cache,
    V: Tensor,
    i: int,
    vw: Tensor | None,
    r: Tensor | None,
    key: object,
) -> Tensor:
    """The tangent of Linear layer ``i``'s output for every probe, ``V_i a + W r + c_i``:
    ``[n, P, out]`` in the workspace slot ``key``. ``vw: [P, out, in]`` (or None: weight not
    selected), ``r: [n, P, in]`` the input's tangent (or None: zero)."""
    m, bs = hvp.layers[i], hvp.slots[i][1]
    (P, n), o, k = (V.shape[0], cache.inputs[0].shape[0]), m.out_features, m.in_features
    if vw is None and r is None:  # only the bias moves
        return V[:, bs[0] : bs[0] + bs[1]].expand(n, P, o).contiguous()
    new = cache.work.get(key, (n, P, o), V)
    if vw is not None:  # a @ V^T for all probes: [n, in] @ [in, P*out]
        torch.mm(cache.inputs[i], vw.view(P * o, k).T, out=new.view(n, P * o))
        if r is not None:
            new.view(n * P, o).addmm_(r.view(n * P, k), m.weight.T)
    else:
        torch.mm(r.view(n * P, k), m.weight.T, out=new.view(n * P, o))
    if bs is not None:
        new.add_(V[:, bs[0] : bs[0] + bs[1]])
    return new


def hvp_batched(hvp: StructuredHVP, cache: _Cache, V: Tensor) -> Tensor:
    """``H V`` for ``V: [P, D]`` (flat over ``names``) -> ``[P, D]``."""
    P, n = V.shape[0], cache.inputs[0].shape[0]
    out = V.new_zeros(P, hvp.dim)
    work = cache.work
    with torch.no_grad():
        vws = [hvp.probe_weights(cache, V, i) for i in range(len(hvp.layers))]
        # R-forward: rz[i] is the tangent of layer i's input, [n, P, features] or None (0)
        rz: list[Tensor | None] = [None] * len(hvp.layers)
        r = None
        for i in range(hvp.first, len(hvp.layers)):
            m, rz[i] = hvp.layers[i], r
            if type(m) is not nn.Linear:
                if r is not None:
                    r = torch.mul(r, cache.d1[i], out=work.get(("a", i), r.shape, V))
                continue
            r = linear_tangent(hvp, cache, V, i, vws[i], r, ("z", i))
        # R-backward: rd is the tangent of dL/d(layer output)
        rd = cache.out_hvp(r)
        for i in range(len(hvp.layers) - 1, hvp.first - 1, -1):
            m = hvp.layers[i]
            if type(m) is not nn.Linear:
                rd = torch.mul(rd, cache.d1[i], out=work.get(("rd", i), rd.shape, V))
                if cache.d2[i] is not None and rz[i] is not None:
                    rd.addcmul_(cache.d2[i], rz[i])
                continue
            vw, slot = vws[i], hvp.slots[i]
            o, k = m.out_features, m.in_features
            if slot is not None and slot[0] is not None:
                off, num = slot[0]
                gw = work.get(("gw", i), (P * o, k), V)
                torch.mm(rd.view(n, P * o).T, cache.inputs[i], out=gw)
                dst = out[:, off : off + num].view(P, o, k)
                dst.copy_(gw.view(P, o, k))
                if rz[i] is not None:  # delta^T R a for all probes: [out, n] @ [n, P*in]
                    g2 = work.get(("gw2", i), (o, P * k), V)
                    torch.mm(cache.deltas_t[i], rz[i].view(n, P * k), out=g2)
                    dst.add_(g2.view(o, P, k).transpose(0, 1))
            if slot is not None and slot[1] is not None:
                off, num = slot[1]
                torch.sum(rd, 0, out=out[:, off : off + num])
            if i > hvp.first:
                new = work.get(("rdin", i), (n, P, k), V)
                torch.mm(rd.view(n * P, o), m.weight, out=new.view(n * P, k))
                if vw is not None:  # delta @ V for all probes: [n, out] @ [out, P*in],
                    # accumulated by the GEMM ([n*P, in] and [n, P*in] share the memory)
                    vt = work.get(("vt", i), (o, P, k), V)
                    vt.copy_(vw.transpose(0, 1))
                    new.view(n, P * k).addmm_(cache.deltas[i], vt.view(o, P * k))
                rd = new
    return out
