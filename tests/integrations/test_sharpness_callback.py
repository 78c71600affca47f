"""SharpnessCallback inside a real transformers.Trainer on a tiny model (CPU, a few steps)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from stablecore.integrations.transformers.sharpness_callback import SharpnessCallback  # noqa: E402

from stablecore.methods.sharpness import top_eigenvalues  # noqa: E402
from stablecore.testing import assert_close, seed_all  # noqa: E402


class TinyClassifier(nn.Module):
    """A Trainer-compatible module: ``forward(x, labels) -> {"loss", "logits"}``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def test_callback_logs_sharpness(tmp_path):
    seed_all(0)
    model = TinyClassifier()
    xs, ys = torch.randn(32, 4), torch.randint(0, 3, (32,))
    dataset = [{"x": xs[i], "labels": ys[i]} for i in range(32)]
    batch = {"x": xs[:16], "labels": ys[:16]}
    cb = SharpnessCallback(batch, every=2, num_probes=8)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=0.1,
        lr_scheduler_type="constant",
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[cb])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "sharpness/lambda_max" in h]
    assert [h["step"] for h in logged] == [2, 4]
    assert len(cb.history) == 2
    last = logged[-1]
    for key in ("trace", "trace_stderr", "frobenius", "lambda_max", "gd_margin", "sgd_margin"):
        assert f"sharpness/{key}" in last
    assert_close(
        torch.tensor(last["sharpness/gd_margin"]),
        torch.tensor(2 / 0.1 - last["sharpness/lambda_max"]),
    )
    assert_close(
        torch.tensor(last["sharpness/sgd_margin"]),
        torch.tensor(2 * 8 / 0.1 - last["sharpness/trace"]),
    )
    # the logged lambda_max is the model's (measured in eval mode on the same batch)
    lam = top_eigenvalues(model.eval(), None, batch, k=1, tol=1e-8).eigenvalues[0]
    assert_close(torch.tensor(last["sharpness/lambda_max"]), lam.float(), dtype=torch.float32)
    # the reporting path: on_log consumed the pending metrics (logging_steps=2 = every) ...
    assert cb._pending is None
    # ... by merging them into the logs dict that later callbacks (wandb, ...) receive
    cb._pending = {"sharpness/trace": 1.5}
    logs = {"loss": 0.3}
    cb.on_log(args, trainer.state, trainer.control, logs=logs)
    assert logs == {"loss": 0.3, "sharpness/trace": 1.5} and cb._pending is None


def test_callback_rejects_bad_every():
    with pytest.raises(ValueError, match="every"):
        SharpnessCallback({"x": torch.ones(1, 4)}, every=0)
