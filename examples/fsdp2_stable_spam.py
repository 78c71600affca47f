"""Train the Stable-SPAM demo's tiny byte-level LLaMA with FSDP2 and 4-bit Stable-SPAM states,
checkpoint it with ``torch.distributed.checkpoint`` mid-run, and resume from the checkpoint.

Run (CPU, gloo; 2 processes)::

    torchrun --nproc-per-node 2 examples/fsdp2_stable_spam.py --steps 30 --save-at 15
    torchrun --nproc-per-node 2 examples/fsdp2_stable_spam.py --steps 30 --resume

The second command loads the step-15 checkpoint (model, optimizer, the optimizer's counters)
and runs steps 16..30: it prints exactly the losses of the first run's steps 16..30 (the
batches and the learning rate are functions of the step number, so nothing else is needed).

What it shows:

* ``fully_shard`` on every decoder layer and on the root: every parameter is a DTensor
  sharded along dim 0, and :class:`~stablecore.optim.stable_spam.StableSPAM` takes them as is
  (per-tensor max|g| and norms are all-reduced once per pass over the whole logical tensor).
* ``state_bits=4``: moments of tensors whose rows are whole 128-blocks are 4-bit codes plus an
  fp32 absmax per block, stored as DTensors sharded like the parameter; everything else keeps
  fp32 moments, the same tensors at every world size (see ``stablecore.optim._distributed``).
* ``get_state_dict`` / ``dcp.save`` / ``dcp.load`` / ``set_state_dict``, plus
  ``get_optimizer_extra`` / ``set_optimizer_extra`` for the global step counters that
  ``get_state_dict`` drops. The checkpoint reshards: resume with another ``--nproc-per-node``.

The model is the demo's (:mod:`stablecore.demos.optimizers`: ``LlamaForCausalLM`` over the 256
byte values with INT4 fake-quantized linears, trained on the Python standard library's source);
it needs ``transformers``. ``--tiny`` shrinks it for tests.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

DEFAULT_CKPT = Path("fsdp2_stable_spam_ckpt")
MODEL = dict(hidden=256, intermediate=512, layers=2, heads=4, seq=64, batch=8, group_size=256)
TINY = dict(hidden=128, intermediate=256, layers=1, heads=2, seq=32, batch=4, group_size=128)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="total steps of the run")
    ap.add_argument("--save-at", type=int, default=15, help="save a checkpoint after this step")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    ap.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="checkpoint directory")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a smaller model (tests)")
    ap.add_argument("--losses-out", type=Path, default=None, help="rank 0 writes losses here")
    return ap.parse_args(argv)


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warmup (10% of the run), cosine to 10%: the demo's schedule, as a function of the
    1-based step so that a resumed run needs no scheduler state."""
    warmup = max(1, steps // 10)
    k = step - 1
    if k < warmup:
        return lr * (k + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, steps - warmup))))


def global_batch(data: torch.Tensor, step: int, cfg: dict, seed: int) -> torch.Tensor:
    """[batch, seq + 1] int64 tokens of ``step`` (the same on every rank, any world size)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - cfg["seq"] - 1, (cfg["batch"],), generator=gen)
    return data[starts[:, None] + torch.arange(cfg["seq"] + 1)[None, :]].long()


def build(cfg: dict, args: argparse.Namespace, mesh):
    """The demo's tiny LLaMA, fully sharded, and StableSPAM with 4-bit states."""
    from torch.distributed.fsdp import fully_shard

    from stablecore.demos.optimizers import build_model, make_optimizer

    model = build_model(dict(cfg), args.seed, torch.device("cpu"))  # same init on every rank
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_optimizer(
        "Stable-SPAM", model.parameters(), args.lr, args.steps, state_bits=4, device="cpu"
    )
    return model, opt


def describe_states(model, opt) -> str:
    """Which parameters got 4-bit moments (the rule reads the logical shape only)."""
    params = list(model.parameters())
    quant = [p for p in params if "exp_avg_codes" in opt.state[p]]
    frac = sum(p.numel() for p in quant) / sum(p.numel() for p in params)
    return (
        f"4-bit moments for {len(quant)} of {len(params)} parameters ({100 * frac:.1f}% of the "
        "elements; the rest are norm weights, fp32)"
    )


def save_checkpoint(model, opt, step: int, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from stablecore.optim._distributed import get_optimizer_extra

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    if dist.get_rank() == 0:  # plain counters: a small side file next to the shards
        torch.save({"step": step, **get_optimizer_extra(opt)}, path / "extra.pt")
    dist.barrier()


def load_checkpoint(model, opt, path: Path) -> int:
    """Load model + optimizer shards (resharded to this world size); returns the saved step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from stablecore.optim._distributed import set_optimizer_extra

    extra = torch.load(path / "extra.pt")
    # on a fresh optimizer get_state_dict runs one lr = 0 step on zero grads to create the
    # states (DTensor moments, 4-bit codes) that dcp.load fills in; the counters it bumps are
    # overwritten by set_optimizer_extra
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    set_optimizer_extra(opt, extra)
    return int(extra["step"])


def train(args: argparse.Namespace) -> list[tuple[int, float]]:
    """Run on an initialized process group; returns rank 0's ``(step, loss)`` list (global
    mean loss of each step run here)."""
    from torch.distributed.device_mesh import init_device_mesh

    from stablecore.demos.optimizers import load_corpus

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TINY if args.tiny else MODEL
    if cfg["batch"] % world:
        raise ValueError(f"batch {cfg['batch']} is not divisible by world size {world}")
    mesh = init_device_mesh("cpu", (world,))
    model, opt = build(cfg, args, mesh)
    data = load_corpus(200_000 if args.tiny else 2_000_000)
    start = load_checkpoint(model, opt, args.ckpt) if args.resume else 0
    rows = slice(rank * cfg["batch"] // world, (rank + 1) * cfg["batch"] // world)
    losses = []
    for step in range(start + 1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        tokens = global_batch(data, step, cfg, args.seed)[rows]
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()  # FSDP2 reduce-scatters the mean gradient of the global batch
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        mean = float(mean) / world
        losses.append((step, mean))
        if rank == 0:
            print(f"step {step:4d}  loss {mean:.6f}", flush=True)
        if rank == 0 and step == start + 1:
            print(describe_states(model, opt), flush=True)
        if not args.resume and step == args.save_at:
            save_checkpoint(model, opt, step, args.ckpt)
            if rank == 0:
                print(f"saved checkpoint after step {step} to {args.ckpt}", flush=True)
    return losses


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")  # rank, world size and rendezvous from torchrun's env
    try:
        losses = train(args)
        if dist.get_rank() == 0 and args.losses_out is not None:
            args.losses_out.write_text("".join(f"{k} {v!r}\n" for k, v in losses))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
