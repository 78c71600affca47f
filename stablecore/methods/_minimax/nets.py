"""Grouped tiny MLPs: ``G`` independent one-hidden-layer sigmoid networks as one batched model.

Used three times by causal minimax: the structural equations of the regenerated descendants of
``X_M`` (one group per variable), the predictors ``f_S'`` (one group per equivalence class) and
the adversarial mutable mechanisms ``J_theta`` (one group per class and mutable variable).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

INITS = ("random", "ones")


@contextmanager
def threads(n: int | None):
    """Tiny matrices: extra torch threads only add contention (much slower on a loaded machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class GroupedMLP(torch.nn.Module):
    """``G`` independent one-hidden-layer sigmoid MLPs on masked inputs, one batched model.

    ``forward(Z: [n, p] or [G, n, p]) -> [G, n]`` (float32); ``mask: [G, p]`` selects each group's
    inputs. Groups share nothing, so fitting them together equals fitting them one at a time
    (Adam is elementwise and the loss is a sum over groups).

    ``init="random"``: Gaussian first/second layer (seeded per group). ``init="ones"``: every
    weight 1 and bias 0, the official code's ``NonLinearF(baseinit=True)``. Then all hidden units
    get identical gradients and stay identical, so the network is a single-index model
    ``c + a * sigmoid(w . x + b)``: monotone, bounded, hard to overfit -- a strong inductive bias
    that matters on the shipped benchmark (see ``simulation_experiment``).

    Example::

        net = GroupedMLP(torch.ones(3, 5), hidden=4).fit(torch.randn(64, 5), torch.randn(3, 64))
        net(torch.randn(10, 5)).shape   # torch.Size([3, 10])
    """

    def __init__(self, mask: torch.Tensor, hidden: int = 12, seed: int = 0, init: str = "random"):
        super().__init__()
        if mask.ndim != 2:
            raise ValueError(f"mask must be [G, p], got shape {tuple(mask.shape)}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        G, p = mask.shape
        self.register_buffer("mask", mask.to(torch.float32))
        if init == "ones":
            W1, W2 = torch.ones(G, p, hidden), torch.ones(G, hidden)
        else:
            gens = [torch.Generator().manual_seed(seed + g) for g in range(G)]
            W1 = torch.stack([torch.randn(p, hidden, generator=x) for x in gens]) / p**0.5
            W2 = torch.stack([torch.randn(hidden, generator=x) for x in gens]) / hidden**0.5
        self.W1 = torch.nn.Parameter(W1)
        self.b1 = torch.nn.Parameter(torch.zeros(G, hidden))
        self.W2 = torch.nn.Parameter(W2)
        self.b2 = torch.nn.Parameter(torch.zeros(G))

    def forward(self, Z: torch.Tensor) -> torch.Tensor:
        if Z.ndim == 2:
            Z = Z.expand(self.mask.shape[0], *Z.shape)
        H = torch.sigmoid(torch.bmm(Z, self.W1 * self.mask[:, :, None]) + self.b1[:, None, :])
        return (H * self.W2[:, None, :]).sum(-1) + self.b2[:, None]

    def forward_group(self, Z: torch.Tensor, g: int) -> torch.Tensor:
        """Group ``g`` only, on ``Z: [..., n, p]`` -> ``[..., n]`` (no work for the other groups)."""
        H = torch.sigmoid(Z @ (self.W1[g] * self.mask[g][:, None]) + self.b1[g])
        return H @ self.W2[g] + self.b2[g]

    def weight_norm(self) -> torch.Tensor:
        """``[G]``: ``||W1_g|| + ||W2_g||`` over the unmasked weights (the official penalty's
        norm: weights only, biases free)."""
        G = self.mask.shape[0]
        w1 = (self.W1 * self.mask[:, :, None]).reshape(G, -1).norm(dim=1)
        return w1 + self.W2.norm(dim=1)

    def fit(self, Z, y, iters: int = 2000, lr: float = 0.02, progress=False, num_threads=1):
        """``Z: [n, p]`` or ``[G, n, p]``, ``y: [n]`` or ``[G, n]``; full-batch Adam on the MSE."""
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        y = y.expand(self.mask.shape[0], -1) if y.ndim == 1 else y
        with threads(num_threads):
            for _ in tqdm(range(iters), disable=not progress, desc="grouped MLP"):
                opt.zero_grad(set_to_none=True)
                loss = (self(Z) - y).square().mean(-1).sum()  # sum: groups stay independent
                loss.backward()
                opt.step()
        return self
