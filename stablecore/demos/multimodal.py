"""3MAT on synthetic incomplete multimodal data: accuracy with 0, 1 and 2 modalities missing.

A latent class ``c`` (4 classes) drives three modalities, each weakly informative on its own:
``clinical`` (6 tabular features), ``lab`` (12 tabular features) and ``image`` (1 x 16 x 16, a
noisy blob whose position and orientation depend on ``c``). In training every (sample, modality)
is missing completely at random with probability ``p_missing`` (a sample keeps at least one).

Compared: 3MAT trained on every sample (missing modalities skip their stage) with modality
dropout, the same without modality dropout, and a complete-case baseline (same network, trained
only on the samples that have all modalities, then fed mean-imputed (zero) inputs for the
missing modalities at test time, since it has no notion of absence).
"""

from __future__ import annotations

import time

import torch

from stablecore.demos import DemoContext, DemoResult
from stablecore.nn.multimodal import CascadedModalityTransformer, ImageEncoder, TabularEncoder

TITLE = "3MAT: cascaded multimodal transformer with missing modalities (synthetic MCAR data)"

MODALITIES = ("clinical", "lab", "image")
N_CLASSES = 4


def make_synthetic(
    n: int, generator: torch.Generator, *, noise: float = 1.0
) -> tuple[dict, torch.Tensor]:
    """``n`` samples: ``({"clinical": [n, 6], "lab": [n, 12], "image": [n, 1, 16, 16]}, y: [n])``.

    Class means come from a fixed seed (the "world"), the samples from ``generator``.
    """
    world = torch.Generator().manual_seed(1234)
    mu_c = torch.randn(N_CLASSES, 6, generator=world) * 0.45
    mu_l = torch.randn(N_CLASSES, 12, generator=world) * 0.3
    y = torch.randint(0, N_CLASSES, (n,), generator=generator)
    clinical = mu_c[y] + noise * torch.randn(n, 6, generator=generator)
    lab = mu_l[y] + noise * torch.randn(n, 12, generator=generator)
    # Image: an anisotropic blob; class sets the quadrant (bit 0) and orientation (bit 1).
    g = torch.linspace(-1, 1, 16)
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    cx = torch.where(y % 2 == 0, -0.35, 0.35) + 0.25 * torch.randn(n, generator=generator)
    cy = 0.25 * torch.randn(n, generator=generator)
    wide = (y // 2 == 0)[:, None, None]
    sx = torch.where(wide, 0.5, 0.2)
    sy = torch.where(wide, 0.2, 0.5)
    blob = torch.exp(
        -((xx - cx[:, None, None]) ** 2) / (2 * sx**2)
        - ((yy - cy[:, None, None]) ** 2) / (2 * sy**2)
    )
    image = blob + 1.2 * noise * torch.randn(n, 16, 16, generator=generator)
    return {"clinical": clinical, "lab": lab, "image": image.unsqueeze(1)}, y


def mcar_mask(n: int, p_missing: float, generator: torch.Generator) -> torch.Tensor:
    """``[n, 3]`` bool availability, each entry missing w.p. ``p_missing``, >= 1 kept per row."""
    m = torch.rand(n, len(MODALITIES), generator=generator) >= p_missing
    empty = ~m.any(1)
    m[empty, torch.randint(0, len(MODALITIES), (int(empty.sum()),), generator=generator)] = True
    return m


def drop_exactly(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, 3]`` availability with exactly ``k`` random modalities missing per sample."""
    order = torch.rand(n, len(MODALITIES), generator=generator).argsort(1)
    m = torch.ones(n, len(MODALITIES), dtype=torch.bool)
    m.scatter_(1, order[:, :k], False)
    return m


def build(seed: int, modality_dropout: float, d_model: int = 32) -> CascadedModalityTransformer:
    torch.manual_seed(seed)
    enc = {
        "clinical": TabularEncoder(6, d_model),
        "lab": TabularEncoder(12, d_model),
        "image": ImageEncoder(1, d_model),
    }
    return CascadedModalityTransformer(
        enc, d_model, N_CLASSES, n_heads=2, modality_dropout=modality_dropout
    )


def _as_present(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: mask[:, j] for j, name in enumerate(MODALITIES)}


def train(net, x, y, mask, *, epochs: int, seed: int, batch: int = 128, progress: bool = False):
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    net.train()
    for _ in tqdm(range(epochs), disable=not progress, desc="3MAT"):
        perm = torch.randperm(y.shape[0], generator=gen)
        for s in range(0, y.shape[0], batch):
            i = perm[s : s + batch]
            out = net({k: v[i] for k, v in x.items()}, _as_present(mask[i]), generator=gen)
            loss = net.loss(out, y[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def accuracy(net, x, y, mask, *, impute: bool = False) -> float:
    """Accuracy with availability ``mask``; ``impute`` zero-fills missing inputs and marks all
    modalities present (for the complete-case baseline)."""
    if impute:
        x = {k: torch.where(_bcast(mask[:, j], v), v, 0.0) for j, (k, v) in enumerate(x.items())}
        mask = torch.ones_like(mask)
    out = net(x, _as_present(mask))
    return float((out.logits.argmax(1) == y).double().mean())


def _bcast(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return m.view(-1, *([1] * (v.ndim - 1)))


def run(ctx: DemoContext) -> DemoResult:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_train, n_test, epochs = (600, 300, 4) if ctx.quick else (3000, 1500, 25)
    p_missing = 0.5
    gen = torch.Generator().manual_seed(ctx.seed)
    x_tr, y_tr = make_synthetic(n_train, gen)
    mask_tr = mcar_mask(n_train, p_missing, gen)
    x_te, y_te = make_synthetic(n_test, gen)
    complete = mask_tr.all(1)
    x_cc = {k: v[complete] for k, v in x_tr.items()}
    models = {
        "3MAT (skip + modality dropout 0.25)": (build(ctx.seed, 0.25), x_tr, y_tr, mask_tr),
        "3MAT (skip, no modality dropout)": (build(ctx.seed, 0.0), x_tr, y_tr, mask_tr),
        "complete-case baseline (drop incomplete)": (
            build(ctx.seed, 0.0),
            x_cc,
            y_tr[complete],
            mask_tr[complete],
        ),
    }
    rows, curves = [], {}
    for name, (net, x, y, mask) in models.items():
        t0 = time.perf_counter()
        train(net, x, y, mask, epochs=epochs, seed=ctx.seed)
        secs = time.perf_counter() - t0
        accs = []
        for k in (0, 1, 2):
            m = drop_exactly(n_test, k, torch.Generator().manual_seed(ctx.seed + 100 + k))
            accs.append(accuracy(net, x_te, y_te, m, impute=name.startswith("complete")))
            rows.append(
                {
                    "model": name,
                    "modalities_missing": k,
                    "accuracy": round(accs[-1], 4),
                    "train_samples": int(y.shape[0]),
                    "train_s": round(secs, 1),
                }
            )
        curves[name] = accs
    # Single-modality accuracies of the main model (which modality carries what).
    main = models["3MAT (skip + modality dropout 0.25)"][0]
    singles = []
    for j, name in enumerate(MODALITIES):
        m = torch.zeros(n_test, 3, dtype=torch.bool)
        m[:, j] = True
        singles.append(f"{name} {accuracy(main, x_te, y_te, m):.3f}")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, accs in curves.items():
        ax.plot([0, 1, 2], accs, marker="o", label=name)
    ax.axhline(1 / N_CLASSES, color="grey", ls=":", label="chance")
    ax.set_xticks([0, 1, 2])
    ax.set_xlabel("modalities missing per test sample (of 3)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plot = ctx.out_dir / "multimodal_missing.png"
    fig.savefig(plot, dpi=120)
    plt.close(fig)
    notes = (
        f"Synthetic MCAR data: {n_train} training samples, each modality missing with probability "
        f"{p_missing} (only {int(complete.sum())} complete samples), {n_test} test samples with "
        "exactly 0/1/2 of the 3 modalities removed at random. 3MAT skips the stage of a missing "
        "modality; the complete-case baseline trains on complete samples only and sees zero "
        "(mean) imputation at test time. Single-modality accuracy of 3MAT: "
        + ", ".join(singles)
        + f". Chance = {1 / N_CLASSES:.2f}. The paper's ADNI numbers (0.987) need closed data "
        "and are not reproduced here."
    )
    return DemoResult(TITLE, rows, [plot], notes)
