"""Demo: grokking at the edge of numerical stability (modular addition mod 113, bias-free MLP).

Four full-batch runs without weight decay (Prieto et al., ICLR 2025, Fig. 1-2 in miniature):

1. AdamW, float32 softmax CE: memorises (100 % train) without generalising.
2. ⊥AdamW (``stablecore.optim.OrthoGrad``): train and test rise together to >= 99 %.
3. AdamW, StableMax CE (float32): the logits grow until a float32 softmax would collapse on every
   training row, yet StableMax's correct-class gradients stay nonzero.
4. AdamW, softmax CE computed in float16 (the authors' ``--softmax_precision 16``): Softmax
   Collapse happens within a few hundred epochs and learning stalls (weight norm plateaus).
"""

from __future__ import annotations

from dataclasses import replace

from stablecore.demos import DemoContext, DemoResult
from stablecore.methods.grokking import GrokkingConfig, GrokkingHistory, train_grokking

TITLE = "Grokking: AdamW memorises, ⊥AdamW generalises, StableMax delays Softmax Collapse"


def _runs(ctx: DemoContext) -> list[tuple[str, GrokkingConfig]]:
    import torch

    if ctx.quick:  # a smoke run of every code path: seconds, nothing grokked
        base = GrokkingConfig(modulus=23, hidden=32, epochs=12, log_every=2, seed=ctx.seed)
        long = short = base
    else:
        base = GrokkingConfig(epochs=300, log_every=5, seed=ctx.seed)
        short = replace(base, epochs=250, stop_at_test_accuracy=0.99)
        long = replace(base, epochs=400, log_every=10)
    return [
        ("AdamW", base),
        ("⊥AdamW", replace(short, orthogonal=True)),
        ("AdamW + StableMax", replace(long, loss="stablemax", betas=(0.9, 0.999))),
        ("AdamW, fp16 softmax", replace(long, loss_dtype=torch.float16)),
    ]


def _row(name: str, h: GrokkingHistory) -> dict[str, object]:
    f = h.final()
    grok = h.first_epoch("test_accuracy", 0.99)
    return {
        "run": name,
        "epochs": f["epoch"],
        "train acc": round(f["train_accuracy"], 4),
        "test acc": round(f["test_accuracy"], 4),
        "epoch test>=99%": grok if grok is not None else "-",
        "max SC (own loss)": round(max(h.sc_fraction), 4),
        "max SC (fp32 softmax)": round(max(h.softmax_sc_fraction), 4),
        "|w|": round(f["weight_norm"], 1),
        "seconds": round(h.seconds, 1),
    }


def _plot(results: list[tuple[str, GrokkingHistory]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_sc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (name, h), color in zip(results, ("C0", "C1", "C2", "C3")):
        ax_acc.plot(h.epoch, h.train_accuracy, color=color, ls="--", label=f"{name} train")
        ax_acc.plot(h.epoch, h.test_accuracy, color=color, label=f"{name} test")
        ax_sc.plot(h.epoch, h.sc_fraction, color=color, label=f"{name}: own loss")
    stablemax = dict(results).get("AdamW + StableMax")
    if stablemax is not None:
        ax_sc.plot(stablemax.epoch, stablemax.softmax_sc_fraction, color="C2", ls=":",
                   label="StableMax run's logits under an fp32 softmax")  # fmt: skip
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="mod-113 addition, 40 % train, no wd")
    ax_sc.set(xlabel="epoch", ylabel="fraction of training rows",
              title="Softmax Collapse: correct-class gradient exactly 0")  # fmt: skip
    ax_acc.legend(fontsize=7)
    ax_sc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ctx: DemoContext) -> DemoResult:
    results = [(name, train_grokking(cfg, device=ctx.device, progress=not ctx.quick))
               for name, cfg in _runs(ctx)]  # fmt: skip
    path = ctx.out_dir / "grokking_accuracy.png"
    _plot(results, path)
    rows = [_row(name, h) for name, h in results]
    notes = (
        "Full-batch training of the paper's bias-free MLP on (a + b) mod 113 (40 % of pairs "
        "for training, float32, AdamW lr 0.01, eps 1e-25, no weight decay). Plain AdamW fits "
        "the training set and then only scales its weights up (naive loss minimisation), so "
        "test accuracy stays near chance; ⊥AdamW projects that direction out of every "
        "gradient and generalises. 'max SC (own loss)' is the largest fraction of training "
        "rows whose correct-class gradient was exactly zero under the loss actually used; "
        "'max SC (fp32 softmax)' applies the authors' test sum(exp(z - max z)) == 1 in float32 "
        "to the same logits. The StableMax run drives that to 100 % (a float32 softmax would "
        "have stopped learning) while its own collapse stays at 0; the float16 softmax run "
        "collapses for real. Not reproduced here: StableMax's eventual grokking (paper: "
        "1e4-1e5 epochs)."
    )
    if ctx.quick:
        notes = "Quick smoke run (modulus 23, 12 epochs): no conclusions. " + notes
    return DemoResult(title=TITLE, rows=rows, plots=[path], notes=notes)
