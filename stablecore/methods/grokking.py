"""Grokking on modular arithmetic: the setup of "Grokking at the Edge of Numerical Stability".

Prieto et al. (ICLR 2025), as the authors' code builds it: all pairs ``(a, b)`` of ``Z_p``
(``p = 113``), label ``(a op b) mod p``, 40 % of pairs for training (split seed 42), a bias-free
ReLU MLP ``2p (two one-hots) -> 200 -> 200 -> p``, full-batch training in float32 without
weight decay, AdamW with ``betas=(0.9, 0.99)`` and ``eps=1e-25``.

What it shows (measured on CPU; see ``stablecore.demos.grokking``):

* AdamW fits the training set and does not generalise: past 100 % train accuracy the gradient
  mostly scales the weights up (naive loss minimisation), which lowers the loss without
  changing a prediction, until float32 softmax collapses.
* ⊥AdamW (:class:`stablecore.optim.OrthoGrad`) removes that direction: train and test accuracy
  rise together to >= 99 %.
* StableMax cross-entropy grows the logits far beyond the point where a float32 softmax would
  have collapsed, yet its correct-class gradients stay nonzero: the collapse is delayed.

Per logged epoch the loop records accuracies, the loss, the weight norm, cos(-grad, w) (NLM
alignment), and two Softmax-Collapse fractions of the training rows: ``sc_fraction`` (the
correct-class gradient of the loss actually used is exactly 0 in its dtype) and
``softmax_sc_fraction`` (the authors' metric: ``sum(exp(z - max z)) == 1`` in float32 on the
same logits, i.e. what a float32 softmax would do).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablecore.optim.orthograd import OrthoGrad, nlm_alignment

__all__ = [
    "GrokkingConfig",
    "GrokkingData",
    "GrokkingHistory",
    "GrokkingMLP",
    "cross_entropy",
    "modular_arithmetic_dataset",
    "softmax_collapse_fraction",
    "train_grokking",
]

_OPS = {"+": torch.add, "-": torch.sub, "*": torch.mul}


@dataclass
class GrokkingData:
    """Pairs ``x_*: [N, 2]`` int64 in ``[0, p)`` and labels ``y_*: [N]`` int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    modulus: int


def modular_arithmetic_dataset(
    modulus: int = 113,
    op: str = "+",
    train_fraction: float = 0.4,
    seed: int = 42,
    device: str | torch.device = "cpu",
) -> GrokkingData:
    """All ``p^2`` pairs ``(a, b)`` labelled ``(a op b) mod p``, split at random.

    Example::

        >>> d = modular_arithmetic_dataset(113); d.x_train.shape, d.x_test.shape
        (torch.Size([5107, 2]), torch.Size([7662, 2]))
    """
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    if modulus < 2:
        raise ValueError(f"modulus must be >= 2, got {modulus}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    a, b = torch.meshgrid(torch.arange(modulus), torch.arange(modulus), indexing="ij")
    x = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)
    y = _OPS[op](x[:, 0], x[:, 1]).remainder(modulus)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(train_fraction * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    return GrokkingData(
        x[tr].to(device), y[tr].to(device), x[te].to(device), y[te].to(device), modulus
    )


class GrokkingMLP(nn.Module):
    """Bias-free ReLU MLP on two concatenated one-hots: ``[N, 2] -> [N, p]`` logits.

    ``input`` is ``Linear(2p, hidden, bias=False)`` as in the paper; multiplying a one-hot by it
    is a column gather, so the forward gathers (same numbers, no ``[N, 2p]`` one-hot matrix).
    Being bias-free and ReLU, the net is positively homogeneous: scaling every weight by c
    scales the logits by c^3, the direction naive loss minimisation follows.
    """

    def __init__(self, modulus: int = 113, hidden: int = 200, dtype=torch.float32) -> None:
        super().__init__()
        self.modulus = modulus
        self.input = nn.Linear(2 * modulus, hidden, bias=False, dtype=dtype)
        self.hidden = nn.Linear(hidden, hidden, bias=False, dtype=dtype)
        self.output = nn.Linear(hidden, modulus, bias=False, dtype=dtype)

    def forward(self, pairs: Tensor) -> Tensor:
        cols = self.input.weight.t()  # [2p, hidden]
        h = F.relu(cols[pairs[:, 0]] + cols[self.modulus + pairs[:, 1]])
        return self.output(F.relu(self.hidden(h)))


def _log_stablemax(logits: Tensor) -> Tensor:
    from stablecore.ops import log_stablemax

    return log_stablemax(logits, dim=-1)


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    loss: Literal["softmax", "stablemax"] = "softmax",
    dtype: torch.dtype | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Softmax or StableMax cross-entropy of ``logits: [N, V]`` computed in ``dtype``.

    ``dtype`` (default: the logits' dtype) is the working precision whose rounding decides
    Softmax Collapse; the authors' ``--softmax_precision``.
    """
    z = logits if dtype is None else logits.to(dtype)
    if loss == "softmax":
        return F.cross_entropy(z, target, reduction=reduction)
    if loss == "stablemax":
        return F.nll_loss(_log_stablemax(z), target, reduction=reduction)
    raise ValueError(f"loss must be 'softmax' or 'stablemax', got {loss!r}")


@torch.no_grad()
def softmax_collapse_fraction(logits: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Fraction of rows of ``logits: [N, V]`` with ``sum(exp(z - max z)) == 1`` in ``dtype``
    (the authors' ``softmax_collapse``): there a softmax loss and its correct-class gradient
    are exactly zero. Returns a 0-d float32 tensor."""
    z = logits.to(dtype)
    z = z - z.amax(-1, keepdim=True)
    return (z.exp().sum(-1) == 1).float().mean()


@dataclass
class GrokkingConfig:
    """One run. Defaults: the paper's ⊥AdamW-vs-AdamW setting (Fig. 1), without the ⊥."""

    modulus: int = 113
    op: str = "+"
    train_fraction: float = 0.4
    split_seed: int = 42
    hidden: int = 200
    epochs: int = 300
    optimizer: Literal["adamw", "sgd"] = "adamw"
    orthogonal: bool = False  # wrap the optimizer in OrthoGrad
    renorm: bool = True
    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-25
    momentum: float = 0.8  # SGD only
    weight_decay: float = 0.0
    loss: Literal["softmax", "stablemax"] = "softmax"
    dtype: torch.dtype = torch.float32  # model
    loss_dtype: torch.dtype | None = None  # None: the model's dtype
    reshuffle: bool = True  # the authors reshuffle the full batch every epoch (rounding order)
    seed: int = 0  # model init and reshuffling
    log_every: int = 1
    stop_at_test_accuracy: float | None = None  # stop once test accuracy reaches this


@dataclass
class GrokkingHistory:
    """Curves of one run, one entry per logged epoch (plain Python floats)."""

    config: GrokkingConfig
    epoch: list[int] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    sc_fraction: list[float] = field(default_factory=list)
    softmax_sc_fraction: list[float] = field(default_factory=list)
    weight_norm: list[float] = field(default_factory=list)
    nlm_alignment: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def first_epoch(self, curve: str, at_least: float) -> int | None:
        """First logged epoch where ``curve`` (e.g. ``"test_accuracy"``) reaches ``at_least``."""
        for e, v in zip(self.epoch, getattr(self, curve)):
            if v >= at_least:
                return e
        return None

    def final(self) -> dict[str, float]:
        keys = ("train_accuracy", "test_accuracy", "train_loss", "sc_fraction",
                "softmax_sc_fraction", "weight_norm", "nlm_alignment")  # fmt: skip
        return {"epoch": self.epoch[-1], **{k: getattr(self, k)[-1] for k in keys}}


def _make_optimizer(cfg: GrokkingConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        cls, kw = torch.optim.AdamW, {"betas": cfg.betas, "eps": cfg.eps}
    elif cfg.optimizer == "sgd":
        cls, kw = torch.optim.SGD, {"momentum": cfg.momentum}
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {cfg.optimizer!r}")
    kw.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.orthogonal:
        return OrthoGrad(model.parameters(), cls, renorm=cfg.renorm, **kw)
    return cls(model.parameters(), **kw)


def train_grokking(
    config: GrokkingConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> GrokkingHistory:
    """Full-batch training of :class:`GrokkingMLP`; returns the logged curves.

    Example (⊥AdamW reaches >= 99 % test accuracy at epoch ~122, seconds on a CPU)::

        >>> h = train_grokking(GrokkingConfig(orthogonal=True, stop_at_test_accuracy=0.99))
        >>> h.test_accuracy[-1] >= 0.99
        True
    """
    from tqdm.auto import tqdm

    cfg = config or GrokkingConfig()
    device = torch.device(device)
    data = modular_arithmetic_dataset(
        cfg.modulus, cfg.op, cfg.train_fraction, cfg.split_seed, device
    )
    torch.manual_seed(cfg.seed)
    model = GrokkingMLP(cfg.modulus, cfg.hidden, cfg.dtype).to(device)
    opt = _make_optimizer(cfg, model)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    hist = GrokkingHistory(cfg)
    n_train = len(data.y_train)
    start = time.perf_counter()
    bar = tqdm(range(1, cfg.epochs + 1), disable=not progress, desc="grokking", leave=False)
    for epoch in bar:
        order = torch.randperm(n_train, generator=shuffle_gen) if cfg.reshuffle else None
        x = data.x_train[order] if order is not None else data.x_train
        y = data.y_train[order] if order is not None else data.y_train
        logits = model(x)
        logits.retain_grad()  # its gradient tells which rows collapsed, at no extra cost
        row_loss = cross_entropy(logits, y, cfg.loss, cfg.loss_dtype, reduction="none")
        loss = row_loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        log = epoch % cfg.log_every == 0 or epoch == cfg.epochs
        if log:
            # Before the step: the gradient the optimizer is about to use.
            align = nlm_alignment(model.parameters()).total
        opt.step()
        if not log:
            continue
        with torch.no_grad():
            test_acc = (model(data.x_test).argmax(-1) == data.y_test).float().mean()
            weight_norm = torch.sqrt(sum((p.double() ** 2).sum() for p in model.parameters()))
            sc = (logits.grad.gather(1, y[:, None]) == 0).float().mean()
            row = [
                (logits.argmax(-1) == y).float().mean(), test_acc, loss.detach(), sc,
                softmax_collapse_fraction(logits), weight_norm, align,
            ]  # fmt: skip
        hist.epoch.append(epoch)
        for name, v in zip(
            ("train_accuracy", "test_accuracy", "train_loss", "sc_fraction",
             "softmax_sc_fraction", "weight_norm", "nlm_alignment"), row,
        ):  # fmt: skip
            getattr(hist, name).append(float(v))
        bar.set_postfix(
            train=f"{hist.train_accuracy[-1]:.3f}", test=f"{hist.test_accuracy[-1]:.3f}"
        )
        if (
            cfg.stop_at_test_accuracy is not None
            and hist.test_accuracy[-1] >= cfg.stop_at_test_accuracy
        ):
            break
    hist.seconds = time.perf_counter() - start
    return hist
