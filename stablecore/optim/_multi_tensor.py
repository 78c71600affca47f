"""Multi-tensor plumbing shared by the Stable-SPAM backends (eager, Triton, CPU).

* :func:`group_by_device_dtype`: one bucket per (device, param dtype, grad dtype); every backend
  works bucket by bucket so that a fused kernel needs one launch per pass per bucket.
* Per-tensor scalar state: each parameter's ``state["scalars"]`` is an fp32 ``[N_SCALARS]``
  tensor (layout below). The backends stack them into ``[n, N_SCALARS]`` and update all tensors'
  scalars with a handful of vector ops (:func:`finalize_clip`, :func:`finalize_norm`), on device,
  with no host sync.
* Per-tensor reductions are two vectors per pass: ``max|g|`` (pass A) and the clipped
  ``sum g^2`` (pass B). A distributed wrapper (FSDP2, issue 10) only has to all-reduce these
  ``[n]`` vectors (MAX, then SUM) once per pass: :class:`StepHyper.reduce_max` /
  ``reduce_sum`` are the hooks (identity by default).
* :func:`chunk_table`: the (tensor index, start offset) of every ``CHUNK``-element chunk of a
  bucket, which the multi-tensor kernels use as their launch grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# layout of state["scalars"] (fp32); products replace pow(beta, step) so that time-varying betas
# (the cosine decay of beta1/gamma1) get the exact bias correction prod(1 - beta_j)
SC_STEP, SC_T, SC_MMAX, SC_MNORM, SC_VNORM, SC_G3P, SC_G1P, SC_G2P, SC_B1P, SC_B2P = range(10)
N_SCALARS = 10
CHUNK = 2048  # a multiple of both quantization blocks (256, 128)
CPU_FAST_PATH_MIN_NUMEL = 1 << 20


def initial_scalars(device: torch.device | str) -> torch.Tensor:
    s = torch.zeros(N_SCALARS, dtype=torch.float32, device=device)
    s[SC_G3P:] = 1.0
    return s


@dataclass
class StepHyper:
    """Everything one bucket's update needs; python floats are fp32-rounded by the backends.

    ``lr``: 0-d fp32 tensor on the bucket's device (no host sync when the user's lr is a
    tensor). ``one_m_*`` are ``1 - x`` computed in float64 on the host, so that every backend
    rounds them identically.
    """

    lr: torch.Tensor
    beta1: float
    beta2: float
    gamma1: float
    gamma2: float
    gamma3: float
    eps: float
    weight_decay: float
    reset: bool  # MoRet on this step: moments restart from zero
    reset_scalars: bool  # scalar_clock="reset": the scalar EMAs' corrections restart too
    maximize: bool
    state_bits: int
    stochastic_rounding: bool = False
    reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None

    def one_m(self, x: float) -> float:
        return 1.0 - x


def group_by_device_dtype(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
) -> dict[tuple, list[int]]:
    """Indices of ``params`` bucketed by (device, param dtype, grad dtype), in first-seen order."""
    buckets: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        buckets.setdefault((p.device, p.dtype, g.dtype), []).append(i)
    return buckets


def chunk_table(numels: Sequence[int], device: torch.device | str, chunk: int = CHUNK):
    """``(tensor_idx int32 [C], chunk_start int64 [C], first_chunk int64 [n + 1])``.

    Chunks never straddle tensors, so a quantization block never straddles a chunk.
    """
    counts = torch.tensor([-(-n // chunk) for n in numels], dtype=torch.int64)
    first = torch.zeros(len(numels) + 1, dtype=torch.int64)
    first[1:] = torch.cumsum(counts, 0)
    tensor_idx = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
    start = torch.arange(int(first[-1]), dtype=torch.int64) - first[:-1].repeat_interleave(counts)
    return (
        tensor_idx.to(device),
        (start * chunk).to(device),
        first.to(device),
    )


_TABLE_CACHE: dict[tuple, torch.Tensor] = {}


def int_table(values: Sequence[int], device, dtype=torch.int32) -> torch.Tensor:
    """A small integer table on ``device``, cached by content: steady-state steps copy nothing
    (parameters, states and, through the caching allocator, usually grads keep their address)."""
    key = (tuple(values), torch.device(device), dtype)
    table = _TABLE_CACHE.get(key)
    if table is None:
        if len(_TABLE_CACHE) > 256:
            _TABLE_CACHE.clear()
        host = torch.tensor(list(values), dtype=dtype)
        if torch.device(device).type == "cuda":
            host = host.pin_memory()
        table = host.to(device, non_blocking=True)
        _TABLE_CACHE[key] = table
    return table


def pointer_table(tensors: Sequence[torch.Tensor | None], device) -> torch.Tensor:
    """int64 ``[n]`` data pointers (0 for ``None``) on ``device`` (no host sync)."""
    return int_table([0 if t is None else t.data_ptr() for t in tensors], device, torch.int64)


def finalize_clip(S: torch.Tensor, M: torch.Tensor, hp: StepHyper):
    """AdaClip on stacked scalars ``S: [n, N_SCALARS]`` and ``M = max|g|: [n]``.

    Returns ``(t_state, T)`` where ``t_state = (t, g3p, mmax)`` are the new clock, gamma3
    product and max EMA, and ``T: [n]`` is the bias-corrected clip threshold.
    """
    t, g3p, mmax = S[:, SC_T], S[:, SC_G3P], S[:, SC_MMAX]
    if hp.reset_scalars and hp.reset:
        t, g3p = torch.zeros_like(t), torch.ones_like(g3p)
    t1 = t + 1.0
    g3p1 = g3p * hp.gamma3
    mmax1 = mmax * hp.gamma3 + M * hp.one_m(hp.gamma3)
    T = mmax1 / (1.0 - g3p1)
    return (t1, g3p1, mmax1), T


def finalize_norm(S: torch.Tensor, clip_state, ss: torch.Tensor, hp: StepHyper):
    """AdaGN + Adam scalars. ``ss``: clipped sum of squares ``[n]``.

    Returns ``(S_new [n, N_SCALARS], coef [n, 3])`` with ``coef = (f, step_size, rbc2)``:
    the gradient is scaled by ``f = c / ||g~||`` (1 when the norm is 0), the update is
    ``step_size * m / (sqrt(v) * rbc2 + eps)``.
    """
    t1, g3p1, mmax1 = clip_state
    n = torch.sqrt(ss)
    g1p, g2p = S[:, SC_G1P], S[:, SC_G2P]
    s, b1p, b2p = S[:, SC_STEP], S[:, SC_B1P], S[:, SC_B2P]
    if hp.reset_scalars and hp.reset:
        g1p, g2p = torch.ones_like(g1p), torch.ones_like(g2p)
    if hp.reset:
        s, b1p, b2p = torch.zeros_like(s), torch.ones_like(b1p), torch.ones_like(b2p)
    g1p1 = g1p * hp.gamma1
    g2p1 = g2p * hp.gamma2
    mnorm1 = S[:, SC_MNORM] * hp.gamma1 + n * hp.one_m(hp.gamma1)
    vnorm1 = S[:, SC_VNORM] * hp.gamma2 + (n * n) * hp.one_m(hp.gamma2)
    c = (mnorm1 / (1.0 - g1p1)) / (torch.sqrt(vnorm1 / (1.0 - g2p1)) + hp.eps)
    f = torch.where(n > 0, c / torch.where(n > 0, n, torch.ones_like(n)), torch.ones_like(n))
    s1 = s + 1.0
    b1p1 = b1p * hp.beta1
    b2p1 = b2p * hp.beta2
    step_size = hp.lr / (1.0 - b1p1)
    rbc2 = 1.0 / torch.sqrt(1.0 - b2p1)
    S_new = torch.stack([s1, t1, mmax1, mnorm1, vnorm1, g3p1, g1p1, g2p1, b1p1, b2p1], dim=1)
    return S_new, torch.stack([f, step_size, rbc2], dim=1)


def bf16_stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None):
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (unbiased)."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator
    )
    rounded = (bits + noise) & -65536  # clear the 16 bits bf16 drops
    return rounded.view(torch.float32).to(torch.bfloat16)


class CommonOptimizerMixin:
    """What StableSPAM and SPAM share: the global step, lr tensors, non-finite accounting,
    backend choice and a state_dict that round-trips bit-exactly (dtypes kept, any device)."""

    def _setup_common(self, compat: str, state_bits: int, on_nonfinite: str, backend: str):
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        if backend not in ("auto", "eager", "foreach", "triton", "cpu"):
            raise ValueError(f"backend must be auto/eager/foreach/triton/cpu, got {backend!r}")
        self.compat, self.state_bits = compat, state_bits
        self.on_nonfinite, self.backend = on_nonfinite, backend
        self.total_steps = 0
        self._nonfinite: dict[torch.device, torch.Tensor] = {}
        self._lr_cache: dict[tuple, torch.Tensor] = {}
        # issue 10 hooks: all-reduce the per-tensor partials ([n] vectors) of a bucket
        self.reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def nonfinite_steps(self) -> int:
        """How many (tensor, step) updates were skipped for a NaN/Inf gradient (syncs once)."""
        return int(sum(int(v) for v in self._nonfinite.values()))

    def _count_nonfinite(self, finite: torch.Tensor) -> None:
        dev = finite.device
        bad = (~finite).sum()
        self._nonfinite[dev] = self._nonfinite[dev] + bad if dev in self._nonfinite else bad

    def _raise_if_nonfinite(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    raise FloatingPointError(
                        f"non-finite gradient for a parameter of shape {tuple(p.shape)}, "
                        f"dtype {p.dtype} on {p.device} (on_nonfinite='raise')"
                    )

    def _lr_tensor(self, lr, device) -> torch.Tensor:
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(f"lr tensor must hold one element, got shape {tuple(lr.shape)}")
            return lr.detach().reshape(()).to(device=device, dtype=torch.float32)
        key = (float(lr), device)
        if key not in self._lr_cache:  # a float lr costs one tiny host->device copy, once
            if len(self._lr_cache) > 64:
                self._lr_cache.clear()
            # a fill kernel takes the value as an argument: no host-to-device copy, no sync
            self._lr_cache[key] = torch.full((), float(lr), dtype=torch.float32, device=device)
        return self._lr_cache[key]

    def _resolve_backend(self, device: torch.device, numel: int = 0) -> str:
        from stablecore import _backends

        if self.backend != "auto":
            if self.backend == "triton" and _backends.triton_unavailable_reason(device.type):
                raise ValueError(
                    f"backend='triton' cannot run on {device}: "
                    f"{_backends.triton_unavailable_reason(device.type)}"
                )
            return self.backend
        if device.type == "cuda" and _backends.triton_unavailable_reason("cuda") is None:
            return "triton"
        if device.type == "cpu":
            # measured (1 thread): 166 K params in 21 tensors, foreach 4.3 ms vs numba 13.7 ms
            # (its per-call overhead); 16.8 M params in 39 tensors, numba 125 ms vs foreach 257
            # ms (32-bit) and 0.87 s vs 1.21 s (4-bit). Numba is imported only for big buckets.
            if numel >= CPU_FAST_PATH_MIN_NUMEL:
                from stablecore.optim._cpu_offload import numba_available

                if numba_available():
                    return "cpu"
            return "foreach"
        return "eager"

    def state_dict(self):
        sd = super().state_dict()
        sd["stablecore"] = {
            "total_steps": self.total_steps,
            "nonfinite_steps": self.nonfinite_steps,
        }
        return sd

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("stablecore", {})
        super().load_state_dict(state_dict)
        # torch casts floating state to the param dtype (absmax, fp32 moments of bf16 params):
        # reload every tensor with its saved dtype, on the param's device
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params, strict=True):
            if pid not in state_dict["state"]:
                continue
            for key, value in state_dict["state"][pid].items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.detach().to(device=p.device, copy=True)
        self.total_steps = int(extra.get("total_steps", 0))
        self._nonfinite = {}
        if extra.get("nonfinite_steps"):
            self._nonfinite[torch.device("cpu")] = torch.tensor(int(extra["nonfinite_steps"]))
