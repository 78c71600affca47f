"""SPAM (arXiv 2501.06842): Adam with momentum reset, spike-aware clipping and a cosine warmup
after every reset; drop-in for ``TianjinYellow/SPAM-Optimizer:galore_torch/SPAM.py`` (class
``AdamW`` exported as ``SPAM``), same keyword names and defaults.

Per tensor and step (k = number of completed steps, N = ``warmup_epoch``, dT = ``update_proj_gap``)::

    d = 1 - cosine(0.99 -> 0 over N)(steps since the last reset)    # 1.0 before the first reset
    if (k + 1) % dT == 0:  m, v <- 0                                 # the step count is NOT reset
    s <- s + 1
    if k + 1 >= grad_accu_steps and (k + 1) % dT >= grad_accu_steps:
        where g^2 > threshold * v:  g <- sign(g) * sqrt(threshold * v)   # v before this update
    m <- b1*m + (1-b1)*g;  v <- b2*v + (1-b2)*g^2
    p <- p - lr*d*sqrt(1-b2^s)/(1-b1^s) * m / (sqrt(v) + eps);  p <- p - lr*wd*p

``compat="reference"`` reproduces the official code (moments in the gradient's dtype, ``p.grad``
clipped in place, python-int counters). The default ``compat="clean"`` computes in fp32 whatever
the param dtype, never writes ``p.grad``, keeps per-tensor step counts as device tensors (no host
sync), and adds ``state_bits`` 32/16/8/4, ``maximize``, tensor ``lr`` and non-finite skipping.
``density < 1`` (random sparse masks) is not implemented and raises.

Example::

    opt = SPAM(model.parameters(), lr=1e-3, state_bits=8)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from stablecore.optim import _distributed, _lowbit
from stablecore.optim._multi_tensor import CommonOptimizerMixin, bf16_stochastic_round


def warmup_scale(current_step: int, warmup_epoch: int) -> float:
    """``1 - CosineDecay(0.99, warmup_epoch).get_dr(current_step)``: 0.01 -> 1 over N steps."""
    if current_step >= warmup_epoch:
        return 1.0
    return 1.0 - 0.99 * (1 + math.cos(math.pi * current_step / (warmup_epoch + 1))) / 2


class SPAM(CommonOptimizerMixin, torch.optim.Optimizer):
    """SPAM with the official keyword names and defaults (see the module docstring).

    ``compat``, ``state_bits`` (32/16/8/4), ``maximize``, ``on_nonfinite`` ("skip"/"raise")
    and ``backend`` are stablecore additions; ``lr`` may be a 0-d tensor. ``backend``: "auto"
    (the ``torch._foreach`` path for CPU params, the per-tensor eager path elsewhere), "eager"
    or "foreach".
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        warmup_epoch: int = 150,
        threshold: float = 5000,
        grad_accu_steps: int = 20,
        update_proj_gap: int = 500,
        density: float = 1.0,
        *,
        compat: str = "clean",
        state_bits: int = 32,
        maximize: bool = False,
        on_nonfinite: str = "skip",
        stochastic_rounding: bool = False,
        backend: str = "auto",
    ) -> None:
        if backend not in ("auto", "eager", "foreach"):
            raise ValueError(f"SPAM backend must be auto/eager/foreach, got {backend!r}")
        if compat not in ("clean", "reference"):
            raise ValueError(f"compat must be 'clean' or 'reference', got {compat!r}")
        if state_bits not in _lowbit.STATE_BITS:
            raise ValueError(f"state_bits must be one of {_lowbit.STATE_BITS}, got {state_bits}")
        if compat == "reference" and state_bits != 32:
            raise ValueError("compat='reference' keeps states in the gradient dtype: state_bits=32")
        if density != 1.0:
            raise NotImplementedError("SPAM with density < 1 (sparse masks) is not implemented")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if warmup_epoch < 0 or grad_accu_steps < 0 or update_proj_gap < 0:
            raise ValueError("warmup_epoch, grad_accu_steps and update_proj_gap must be >= 0")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            threshold=threshold,
            maximize=maximize,
            stochastic_rounding=stochastic_rounding,
        )
        super().__init__(params, defaults)
        self._setup_common(compat, state_bits, on_nonfinite, backend)
        self.warmup_epoch, self.grad_accu_steps = warmup_epoch, grad_accu_steps
        self.update_proj_gap, self.density = update_proj_gap, density
        self.current_step = warmup_epoch + 1  # no warmup before the first reset

    def state_dict(self):
        sd = super().state_dict()
        sd["stablecore"]["current_step"] = self.current_step
        return sd

    def load_state_dict(self, state_dict) -> None:
        current = state_dict.get("stablecore", {}).get("current_step", self.warmup_epoch + 1)
        super().load_state_dict(state_dict)
        self.current_step = int(current)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.on_nonfinite == "raise":
            self._raise_if_nonfinite()
        k1 = self.total_steps + 1
        gap = self.update_proj_gap
        reset = gap != 0 and k1 % gap == 0
        clip = k1 >= self.grad_accu_steps and (gap == 0 or k1 % gap >= self.grad_accu_steps)
        scale = warmup_scale(self.current_step, self.warmup_epoch)
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            for p in ps:
                if p.grad.is_sparse:
                    raise TypeError("SPAM does not support sparse gradients")
            if self.compat == "reference":
                for p in ps:
                    self._reference_param_step(p, group, reset, clip, scale)
            elif ps:
                self._clean_group_step(ps, group, reset, clip, scale)
        self.total_steps += 1
        self.current_step += 1
        if gap != 0 and (self.total_steps + 1) % gap == 0:
            self.current_step = 0
        return loss

    def _reference_param_step(self, p, group, reset: bool, clip: bool, scale: float) -> None:
        grad = p.grad
        state = self.state[p]
        if not bool(torch.isfinite(grad).all()):
            self._count_nonfinite(torch.zeros((), dtype=torch.bool, device=p.device))
            return
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        if reset:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        state["step"] += 1
        thr = group["threshold"]
        if thr != 0 and clip:
            mask = grad**2 > thr * exp_avg_sq
            grad.copy_(torch.where(mask, grad.sign() * torch.sqrt(exp_avg_sq * thr), grad))
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        lr = group["lr"]
        bc1 = 1.0 - beta1 ** state["step"]
        bc2 = 1.0 - beta2 ** state["step"]
        step_size = lr * math.sqrt(bc2) / bc1
        norm_grad = exp_avg / denom
        if isinstance(step_size, torch.Tensor):
            p.sub_(norm_grad * (step_size * scale))
        else:
            p.add_(norm_grad, alpha=-step_size * scale)
        if group["weight_decay"] > 0.0:
            if isinstance(lr, torch.Tensor):
                p.sub_(p * (lr * group["weight_decay"]))
            else:
                p.add_(p, alpha=-lr * group["weight_decay"])

    def _clean_group_step(self, ps, group, reset: bool, clip: bool, scale: float) -> None:
        # the only per-tensor statistic is "is the whole gradient finite": its shard-local
        # partials (max|g|) of all tensors of a device bucket go through one reduction
        dist_mesh = _distributed.check_group(ps, "SPAM")
        buckets: dict[torch.device, list[torch.Tensor]] = {}
        for p in ps:
            buckets.setdefault(p.device, []).append(p)
        for device, bucket in buckets.items():
            if dist_mesh is None and self._spam_backend(device, group) == "foreach":
                self._foreach_bucket_step(bucket, group, reset, clip, scale)
                continue
            gs = []
            for p in bucket:
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    _distributed.init_moment(state, "exp_avg", p, self.state_bits)
                    _distributed.init_moment(state, "exp_avg_sq", p, self.state_bits)
                g = _distributed.local(p.grad).to(torch.float32)
                gs.append(-g if group["maximize"] else g)
            partial = torch.stack([g.abs().amax() if g.numel() else g.new_zeros(()) for g in gs])
            d_max = _distributed.reducers(bucket)[0] if dist_mesh is not None else None
            reduce_max = _distributed.compose(d_max, self.reduce_max)
            keep = torch.isfinite(reduce_max(partial) if reduce_max is not None else partial)
            self._count_nonfinite(keep)
            for i, p in enumerate(bucket):
                state = _distributed.local_state(self.state[p])
                self._clean_param_step(
                    _distributed.local(p), state, gs[i], keep[i], group, reset, clip, scale
                )

    def _spam_backend(self, device: torch.device, group: dict) -> str:
        if group["stochastic_rounding"]:  # only the eager path rounds stochastically
            return "eager"
        if self.backend == "auto":
            return "foreach" if device.type == "cpu" else "eager"
        return self.backend

    def _foreach_bucket_step(self, bucket, group, reset: bool, clip: bool, scale: float) -> None:
        from stablecore.optim._foreach import foreach_spam_step

        bucket = [p for p in bucket if p.numel() > 0]  # an empty tensor has nothing to update
        if not bucket:
            return
        states = []
        for p in bucket:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                _distributed.init_moment(state, "exp_avg", p, self.state_bits)
                _distributed.init_moment(state, "exp_avg_sq", p, self.state_bits)
            states.append(state)
        hp = dict(
            lr=self._lr_tensor(group["lr"], bucket[0].device),
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            threshold=group["threshold"],
            maximize=group["maximize"],
            reset=reset,
            clip=clip,
            scale=scale,
            bits=self.state_bits,
        )
        keep = foreach_spam_step(bucket, [p.grad for p in bucket], states, hp)
        self._count_nonfinite(keep)

    def _clean_param_step(self, p, state, g, keep, group, reset, clip, scale) -> None:
        """One (local) tensor: ``g`` fp32 (sign applied), ``keep`` 0-d bool."""
        bits = self.state_bits
        if reset:
            m = torch.zeros_like(g)
            v = torch.zeros_like(g)
        else:
            m = _lowbit.load_moment(state, "exp_avg", p, bits)
            v = _lowbit.load_moment(state, "exp_avg_sq", p, bits)
        beta1, beta2 = group["betas"]
        thr = group["threshold"]
        if thr != 0 and clip:
            bound = v * thr
            g = torch.where(g * g > bound, torch.sign(g) * torch.sqrt(bound), g)
        s1 = state["step"] + 1.0
        m1 = m * beta1 + g * (1.0 - beta1)
        v1 = v * beta2 + (g * g) * (1.0 - beta2)
        lr = self._lr_tensor(group["lr"], p.device)
        step_size = lr * scale * torch.sqrt(1.0 - beta2**s1) / (1.0 - beta1**s1)
        p32 = p.to(torch.float32) - (m1 / (torch.sqrt(v1) + group["eps"])) * step_size
        if group["weight_decay"] > 0.0:
            p32 = p32 - p32 * (lr * group["weight_decay"])
        if p.dtype == torch.bfloat16 and group["stochastic_rounding"]:
            new_p = bf16_stochastic_round(p32)
        else:
            new_p = p32.to(p.dtype)
        p.copy_(torch.where(keep, new_p, p))
        state["step"].copy_(torch.where(keep, s1, state["step"]))
        _lowbit.store_moment(state, "exp_avg", m1, keep)
        _lowbit.store_moment(state, "exp_avg_sq", v1, keep)
