"""DTensor (FSDP2) support for stablecore's optimizers: exact per-tensor statistics across shards,
shard-local (low-bit) states that carry their placement, resharding checkpoints.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter is a DTensor sharded along
dim 0. The optimizers work on the *local* shards (element-wise work stays shard-local) and
compute every per-tensor statistic over the whole logical tensor:

* :func:`reducers`: the shard-local partials of all tensors of a bucket are stacked into one
  ``[n]`` (or ``[n, k]``) vector and all-reduced once per pass (MAX for ``max|g|``, SUM for sums
  of squares and dot products): one collective per pass per mesh dimension that shards
  something (one for FSDP2's 1-D mesh), never one per tensor. Tensors replicated on a mesh
  dimension contribute their partial from coordinate 0 only, so nothing is counted twice.
  The result equals the unsharded optimizer's up to the order of the floating-point sum.
* :func:`check_group`: a group must be all plain tensors or all DTensors on one mesh (else
  ``ValueError``); ``Partial`` placements are rejected.
* :func:`init_moment`: states of a DTensor parameter are DTensors with the parameter's mesh and
  placements, so ``torch.distributed.checkpoint`` saves them and reshards them on load.

Low-bit blocks on shards (the rule). Whether a parameter gets quantized moments is
``_lowbit.is_quantized(shape, bits)`` of its *logical* shape ``[R, *rest]``, for plain tensors
and DTensors alike: ``numel >= 4096`` and ``ndim >= 2``. Blocks are row-padded (see
:mod:`stablecore.optim._lowbit`): each row of length ``L = numel / R`` is cut into blocks of
``B`` (256 at 8 bits, 128 at 4 bits) from the row start, the last one partial when
``L % B != 0``. No block crosses a row and dim-0 sharding only ever cuts between rows, so no
block straddles a shard boundary *for any world size* (uneven and empty shards included).
Codes are stored as ``[R, Lp / per_byte]`` uint8 (``Lp = ceil(L / B) * B``) and absmax as
``[R, Lp / B]`` fp32 DTensors sharded like the parameter (with ``L % B == 0``: ``[R, L /
per_byte]`` and ``[R, L / B]``, the earlier layout). A block's absmax is then computed from
exactly the elements of the unsharded run, with no collective, so quantization is
bit-identical across world sizes given the same inputs, and the state layout (which tensors
hold codes) is the same for every world size, DDP and a single process. 1-D tensors keep fp32
moments *everywhere* (they could be cut inside a block), so there is no shape whose math
depends on sharding (pytorch/ao#4912 was a 6144-element tensor that was 8-bit replicated but
fp32 sharded in two).

The trajectories are not bit-identical: the all-reduced sums of squares (AdaGN norm) differ
from the unsharded ones by reduction-order rounding (~1 ulp), which the quantizer can turn
into an occasional one-code difference.

``Shard(d > 0)`` placements (``fully_shard(shard_placement_fn=...)``, tensor parallelism) cut
rows at world-size dependent columns, i.e. inside blocks: a parameter that the shape rule
quantizes and that is sharded along ``d > 0`` raises ``ValueError`` at its first step (use
``Shard(0)`` for it, or ``state_bits`` 32/16) rather than silently running different math.
Shapes that keep fp32 moments may use any Shard/Replicate placement.

Memory, LLaMA-1B of the Stable-SPAM/GaLore configs (hidden 2048, intermediate 5461, 24 layers,
vocab 32000, 1.339 B params): every 2-D weight is quantized, the down projections
``[2048, 5461]`` included (row 5461 padded to 5504 at 4 bits, 5632 at 8 bits); only the norms
``[2048]`` keep fp32. Optimizer m+v: 1.426 GB (1.065 bytes/param) at 4 bits and 2.738 GB
(2.044 bytes/param) at 8 bits, against 3.286 GB / 4.323 GB when rows had to be whole blocks
(padding the down projections' rows costs them 0.8% more codes at 4 bits, 3.1% at 8 bits).

Checkpoints: ``torch.distributed.checkpoint.state_dict.get_state_dict`` keeps only ``state``
and ``param_groups``; :func:`get_optimizer_extra` / :func:`set_optimizer_extra` carry the
optimizer's global counters (``total_steps``, SPAM's ``current_step``) next to it.

Example::

    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    opt = StableSPAM(model.parameters(), lr=1e-3, state_bits=4)  # DTensor-aware, no flag
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "extra": get_optimizer_extra(opt)}, checkpoint_id=d)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from stablecore.optim import _lowbit

try:  # DTensor lives in torch.distributed.tensor since torch 2.5
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = Shard = None  # type: ignore[assignment,misc]

Reducer = Callable[[torch.Tensor], torch.Tensor]
_QUANT_SUFFIXES = ("_codes", "_absmax")


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The shard-local tensor (sharing storage) of a DTensor; a plain tensor unchanged."""
    return t.to_local() if is_dtensor(t) else t


def check_group(params: Sequence[torch.Tensor], who: str = "optimizer"):
    """The DeviceMesh of a param group (None for plain tensors); ValueError on a mix.

    A group must hold only plain tensors or only DTensors on one mesh, with Shard/Replicate
    placements: mixed groups would need per-tensor collectives on different process groups.
    """
    kinds = [is_dtensor(p) for p in params]
    if not any(kinds):
        return None
    if not all(kinds):
        plain = next(p for p, k in zip(params, kinds, strict=True) if not k)
        raise ValueError(
            f"{who}: a param group mixes DTensor and plain tensors (plain tensor of shape "
            f"{tuple(plain.shape)} on {plain.device}); put them in separate param groups"
        )
    mesh = params[0].device_mesh
    for p in params:
        if p.device_mesh != mesh:
            raise ValueError(
                f"{who}: DTensor parameters of one group live on different device meshes "
                f"({mesh} vs {p.device_mesh}, shape {tuple(p.shape)}); use one group per mesh"
            )
        for pl in p.placements:
            if not isinstance(pl, (Shard, Replicate)):
                raise ValueError(
                    f"{who}: unsupported placement {pl} for a parameter of shape "
                    f"{tuple(p.shape)} (only Shard and Replicate)"
                )
    return mesh


def _sharded_dims(params: Sequence[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """Per mesh dim that shards any tensor: (dim, bool [n] 'replicated on this dim')."""
    mesh = params[0].device_mesh
    out = []
    for d in range(mesh.ndim):
        repl = [isinstance(p.placements[d], Replicate) for p in params]
        if not all(repl):
            out.append((d, torch.tensor(repl, dtype=torch.bool)))
    return out


def reducers(params: Sequence[torch.Tensor]) -> tuple[Reducer | None, Reducer | None]:
    """``(reduce_max, reduce_sum)`` turning shard-local per-tensor partials ``[n]``/``[n, k]``
    (row i = tensor i of ``params``) into whole-tensor values; ``(None, None)`` for plain
    tensors. One all-reduce per call per sharding mesh dim; no host sync.
    """
    if check_group(params) is None:
        return None, None
    mesh = params[0].device_mesh
    dims = _sharded_dims(params)
    if not dims:
        return None, None

    def reduce_max(x: torch.Tensor) -> torch.Tensor:
        # gloo/NCCL MAX may drop NaN: make non-finite partials +inf so every rank skips the tensor
        x = torch.where(torch.isnan(x), torch.full_like(x, float("inf")), x).contiguous()
        for d, _ in dims:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=mesh.get_group(d))
        return x

    def reduce_sum(x: torch.Tensor) -> torch.Tensor:
        x = x.clone().contiguous()
        for d, repl in dims:
            if mesh.get_local_rank(d) != 0 and bool(repl.any()):
                mask = repl.to(x.device).view(-1, *([1] * (x.ndim - 1)))
                x = torch.where(mask, torch.zeros_like(x), x).contiguous()
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
        return x

    return reduce_max, reduce_sum


def compose(first: Reducer | None, then: Reducer | None) -> Reducer | None:
    if first is None:
        return then
    if then is None:
        return first
    return lambda x: then(first(x))


# ---- states -------------------------------------------------------------------------------


def sharded_quantized(p: torch.Tensor, bits: int) -> bool:
    """Whether DTensor ``p`` gets quantized moments at ``bits``: ``_lowbit.is_quantized`` of its
    logical shape, exactly as a plain tensor (see the module docstring).

    Raises ``ValueError`` if the shape rule quantizes ``p`` but a placement shards it along a
    dim other than 0 (its blocks would straddle shards at some world sizes).
    """
    if not _lowbit.is_quantized(tuple(p.shape), bits):
        return False
    for pl in p.placements:
        if isinstance(pl, Shard) and pl.dim != 0:
            raise ValueError(
                f"{bits}-bit optimizer states for a parameter of shape {tuple(p.shape)} with "
                f"placements {tuple(p.placements)}: sharding along dim {pl.dim} would cut its "
                f"quantization blocks (rows of {p.numel() // p.shape[0]} elements) at world-size "
                "dependent columns; shard it along dim 0 or use state_bits=32/16"
            )
    return True


def _like(p, local_t: torch.Tensor, shape: tuple[int, ...]):
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local_t,
        p.device_mesh,
        p.placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=stride,
    )


def init_moment(state: dict, name: str, p: torch.Tensor, bits: int) -> None:
    """Zero moment ``name`` for ``p``: :func:`_lowbit.init_moment` for a plain tensor, DTensor
    states sharded like ``p`` (quantized per the block rule) for a DTensor."""
    if not is_dtensor(p):
        _lowbit.init_moment(state, name, p, bits)
        return
    lp = p.to_local()
    if sharded_quantized(p, bits):
        ckey, akey = _lowbit.moment_keys(name)
        block = _lowbit.BLOCK_SIZES[bits]
        _, _, padded_row = _lowbit.row_layout(p.shape, bits)  # row-padded: L -> ceil(L/B)*B
        per_byte = 2 if bits == 4 else 1
        rows = lp.shape[0]
        kind = "m" if name == "exp_avg" else "v"
        # the code of zero, as _lowbit.init_moment fills a plain tensor's codes
        fill = int(_lowbit.quantize_blockwise(torch.zeros(1), kind, bits)[0][0])
        cshape, ashape = padded_row // per_byte, padded_row // block
        codes = torch.full((rows, cshape), fill, dtype=torch.uint8, device=lp.device)
        absmax = torch.zeros(rows, ashape, dtype=torch.float32, device=lp.device)
        state[ckey] = _like(p, codes, (p.shape[0], cshape))
        state[akey] = _like(p, absmax, (p.shape[0], ashape))
    else:
        dtype = torch.bfloat16 if bits == 16 else torch.float32
        state[name] = _like(p, torch.zeros(lp.shape, dtype=dtype, device=lp.device), p.shape)


def local_state(state: dict) -> dict:
    """A view of one parameter's state with local tensors (quantized entries flattened, as the
    unsharded layout): writes into it land in the DTensor states."""
    out = {}
    for k, v in state.items():
        if is_dtensor(v):
            v = v.to_local()
            if k.endswith(_QUANT_SUFFIXES):
                v = v.view(-1)
        out[k] = v
    return out


def local_views(ps, gs, states):
    """Local params, grads and state views of a bucket (identity for plain tensors)."""
    if not any(is_dtensor(p) for p in ps):
        return ps, gs, states
    return [local(p) for p in ps], [local(g) for g in gs], [local_state(s) for s in states]


# ---- checkpoints --------------------------------------------------------------------------


def get_optimizer_extra(opt) -> dict:
    """Global counters of a stablecore optimizer that DCP's ``get_state_dict`` drops."""
    base = getattr(opt, "base_optimizer", opt)
    return dict(base.state_dict().get("stablecore", {})) if hasattr(base, "total_steps") else {}


def set_optimizer_extra(opt, extra: dict) -> None:
    """Restore what :func:`get_optimizer_extra` returned (after ``set_state_dict``)."""
    base = getattr(opt, "base_optimizer", opt)
    if "total_steps" in extra:
        base.total_steps = int(extra["total_steps"])
    if "current_step" in extra:
        base.current_step = int(extra["current_step"])
    base._nonfinite = {}
    if extra.get("nonfinite_steps"):
        base._nonfinite[torch.device("cpu")] = torch.tensor(int(extra["nonfinite_steps"]))


# ---- OrthoGrad ----------------------------------------------------------------------------


@torch.no_grad()
def orthogonalize_dtensor_(params: Sequence[torch.Tensor], renorm: bool = True) -> None:
    """⊥Grad for DTensor parameters (same math as ``stablecore::orthogonalize_``'s reference):
    per tensor ``g <- g - (w.g / w.w) w`` (renormalized to ``|g|``) with ``w.g``, ``w.w``,
    ``g.g`` all-reduced in one ``[n, 3]`` collective and ``|g_perp|^2`` in one ``[n]``."""
    from stablecore.ops.orthogonalize import PARALLEL_RTOL

    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:  # one (mesh, weight dtype, grad dtype) group per pass, as the fused op
        if p.grad is not None:
            mesh = p.device_mesh if is_dtensor(p) else None
            groups.setdefault((mesh, p.dtype, p.grad.dtype), []).append(p)
    for (mesh, _, _), group in groups.items():
        if mesh is None:  # plain tensors: the fused op itself
            from stablecore.ops import orthogonalize as _ops

            _ops.orthogonalize_([p.detach() for p in group], [p.grad for p in group], renorm)
        else:
            _orthogonalize_group(group, renorm, PARALLEL_RTOL)


def _orthogonalize_group(ps: list[torch.Tensor], renorm: bool, rtol: float) -> None:
    _, reduce_sum = reducers(ps)
    ws = [local(p.detach()).reshape(-1) for p in ps]
    gs = [local(p.grad) for p in ps]
    acc = torch.promote_types(torch.promote_types(ws[0].dtype, gs[0].dtype), torch.float32)
    wf = [w.to(acc) for w in ws]
    gf = [g.reshape(-1).to(acc) for g in gs]
    stats = torch.stack(
        [torch.stack([torch.dot(w, g), torch.dot(w, w), torch.dot(g, g)]) for w, g in zip(wf, gf)]
    )
    if reduce_sum is not None:
        stats = reduce_sum(stats)
    dots, ww, gg = stats.unbind(1)
    has_w = ww > 0
    coef = torch.where(has_w, dots / torch.where(has_w, ww, 1), 0)
    g_perp = [g - w * coef[i] for i, (w, g) in enumerate(zip(wf, gf))]
    pp = torch.stack([torch.dot(g, g) for g in g_perp])
    if reduce_sum is not None:
        pp = reduce_sum(pp)
    perp_norm, g_norm = pp.sqrt(), gg.sqrt()
    nonzero = perp_norm > 0
    scale = torch.where(nonzero, g_norm / torch.where(nonzero, perp_norm, 1), 1)
    if not renorm:
        scale = torch.ones_like(scale)
    scale = torch.where((perp_norm <= rtol * g_norm) & (g_norm > 0), 0, scale)
    scale = torch.where(has_w, scale, 1)
    for i, (g, gp) in enumerate(zip(gs, g_perp, strict=True)):
        g.copy_((gp * scale[i]).view(g.shape))
