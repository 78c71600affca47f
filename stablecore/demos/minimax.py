"""Demo: causal minimax stable-subset selection on the paper's synthetic benchmark.

Full run: the first split of ``which_invariance_sim`` (10 training environments pooled, 10 test
environments): 256 stable subsets -> equivalence classes -> one grouped predictor and one
adversarial worst-case estimate per class; the chosen subset's max test-environment MSE is shown
next to the whole stable set's. Quick run: a 5-variable toy SCM with the same structure type.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stablecore.demos import DemoContext, DemoResult
from stablecore.methods.minimax import CausalMinimax, simulation_experiment

TITLE = "Causal minimax: which stable subset to transfer (max test-env MSE, chosen vs full set)"

SIM = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "which_invariance_sim"


def _toy(n, seed, env_ids):
    rng = np.random.default_rng(seed)
    e = rng.choice(env_ids, n).astype(float)
    x1 = rng.normal(size=n)
    y = 0.8 * x1 + 0.5 * rng.normal(size=n)
    m = (e - 10.5) * 0.3 * y + 0.3 * rng.normal(size=n)
    x2 = np.tanh(m) + y + 0.3 * rng.normal(size=n)
    return {"E": e, "X1": x1, "Y": y, "M": m, "X2": x2}


def toy_rows(seed=0, fit_iters=200, adv_iters=60) -> list[dict]:
    parents = {"E": [], "X1": [], "Y": ["X1"], "M": ["Y", "E"], "X2": ["M", "Y"]}
    train = _toy(600, seed, np.arange(8, 14))
    tests = [_toy(200, seed + 1 + e, [e]) for e in (1, 5, 16, 20)]
    mm = CausalMinimax(parents, fit_iters=fit_iters, adv_iters=adv_iters, progress=False).fit(train)
    full = tuple(mm.stable_)
    return [
        {
            "split": "toy",
            "classes": len(mm.classes_),
            "chosen": ",".join(mm.best_subset_),
            "h*_chosen": round(mm.hstar_[mm.best_subset_], 4),
            "h*_full": round(mm.hstar_[mm._rep_of(full)], 4),
            "max_test_mse_chosen": round(max(mm.risk(t) for t in tests), 4),
            "max_test_mse_full": round(max(mm.risk(t, full) for t in tests), 4),
        }
    ]


def run(ctx: DemoContext) -> DemoResult:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if ctx.quick or not (SIM / "gtaug.gml").exists():
        rows = toy_rows(ctx.seed, fit_iters=120, adv_iters=30)
    else:
        rows = simulation_experiment(
            SIM, n_splits=1, fit_iters=1000, adv_iters=300, seed=ctx.seed, progress=False
        )
    fig, ax = plt.subplots(figsize=(5, 3))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["max_test_mse_chosen"] for r in rows], 0.4, label="chosen subset")
    ax.bar(x + 0.2, [r["max_test_mse_full"] for r in rows], 0.4, label="full stable set")
    ax.set_xticks(x)
    ax.set_xticklabels([r["split"][:10] for r in rows], fontsize=7)
    ax.set_ylabel("max test-env MSE (std. Y)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = ctx.out_dir / "minimax_max_mse.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    notes = (
        "Stable subsets grouped into classes with equal f_S' by d-separation in the graph with the "
        "arrows into the mutable variables cut (the shipped graph gives 45 classes of 256 subsets, "
        "as the official cache); one grouped MLP fits every class's predictor, one batched "
        "adversary (mutable mechanisms replaced by range-bounded MLPs) estimates each h*. "
        "Shorter training than the official code (1000 / 300 vs 10000 / <=10000 Adam steps)."
    )
    return DemoResult(title=TITLE, rows=rows, plots=[path], notes=notes)
