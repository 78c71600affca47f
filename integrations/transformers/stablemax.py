"""Train a transformers causal LM with StableMax cross-entropy, and watch for Softmax Collapse.

* :func:`apply_stablemax` patches one model instance. With ``fused_linear=True`` its ``forward``
  computes the training loss with :func:`stablecore.ops.stablemax_linear_cross_entropy` straight
  from the final hidden states and the LM head (no ``[tokens, V]`` logits; ``logits`` is
  ``None`` in the output while training with labels, as in Liger). Otherwise, and in eval mode,
  the logits are computed and the loss is :func:`stablecore.ops.stablemax_cross_entropy`.
  Works for LLaMA-family models and any ``*ForCausalLM`` whose forward is
  ``decoder -> last_hidden_state -> lm_head`` (found through ``base_model_prefix`` and
  ``get_output_embeddings()``); models that post-process logits (soft-capping, scaling) are
  refused rather than silently changed.
* :class:`SoftmaxCollapseCallback` logs, every ``every_n_steps`` optimizer steps, the fraction of
  (sub-sampled) tokens whose correct-class gradient / loss is exactly zero for softmax and for
  StableMax in the working precision (:func:`stablecore.ops.softmax_collapse.softmax_collapse_stats`).

Caveats: the fused path reads ``lm_head.weight`` directly, so ZeRO-3/FSDP parameter gathering
hooks on ``lm_head`` do not fire (same as Liger); use ``fused_linear=False`` there.

Example::

    model = LlamaForCausalLM(config)
    apply_stablemax(model)                       # fused linear + StableMax CE
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[SoftmaxCollapseCallback()])
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from transformers.modeling_outputs import CausalLMOutputWithPast

from stablecore.ops.linear_cross_entropy import stablemax_linear_cross_entropy
from stablecore.ops.softmax_collapse import softmax_collapse_stats
from stablecore.ops.stablemax_cross_entropy import stablemax_cross_entropy

__all__ = ["SoftmaxCollapseCallback", "apply_stablemax", "remove_stablemax"]

logger = logging.getLogger("stablecore")
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class _CollapseMonitor:
    """Computes collapse statistics on the next forward after :meth:`request`."""

    def __init__(self) -> None:
        self.pending: dict | None = None
        self.last: dict[str, float] | None = None

    def request(self, max_rows: int, kinds: tuple[str, ...], dtype: torch.dtype | None) -> None:
        self.pending = {"max_rows": max_rows, "kinds": kinds, "dtype": dtype}

    @torch.no_grad()
    def record(self, logits_fn, targets: torch.Tensor, ignore_index: int = -100) -> None:
        """``logits_fn(rows)`` gives the logits of the selected flat rows."""
        if self.pending is None:
            return
        req, self.pending = self.pending, None
        rows = torch.nonzero(targets != ignore_index).flatten()[: req["max_rows"]]
        logits = logits_fn(rows)
        dtype = req["dtype"] or torch.promote_types(logits.dtype, torch.float32)
        stats: dict[str, float] = {}
        for kind in req["kinds"]:
            s = softmax_collapse_stats(logits, targets[rows], kind=kind, dtype=dtype)
            stats[f"{kind}_collapse_fraction"] = s["collapse_fraction"]
            stats[f"{kind}_zero_loss_fraction"] = s["zero_loss_fraction"]
        self.last = stats


def _shifted_targets(labels, shift_labels, ignore_index):
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _reduce(loss_sum_or_mean, num_items_in_batch):
    if num_items_in_batch is None:
        return loss_sum_or_mean
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum_or_mean.device)
    return loss_sum_or_mean / num_items_in_batch


def _stablemax_forward(
    self, input_ids=None, attention_mask=None, *, labels=None, logits_to_keep=0, **kwargs
):
    state = self._stablecore_stablemax
    return_dict = kwargs.pop("return_dict", None)
    num_items_in_batch = kwargs.get("num_items_in_batch")
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    decoder = getattr(self, self.base_model_prefix)
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = outputs.last_hidden_state
    if isinstance(logits_to_keep, int) and logits_to_keep > 0:
        hidden = hidden[:, -logits_to_keep:]
    head = self.get_output_embeddings()
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = logits = None
    if labels is not None and state["fused_linear"] and self.training:
        targets = _shifted_targets(labels, shift_labels, ignore_index).to(hidden.device)
        hidden2d = hidden.reshape(-1, hidden.shape[-1])
        loss = stablemax_linear_cross_entropy(
            hidden2d,
            head.weight,
            targets,
            head.bias,
            ignore_index=ignore_index,
            reduction=reduction,
        )
        loss = _reduce(loss, num_items_in_batch)
        state["monitor"].record(lambda rows: head(hidden2d[rows].detach()), targets, ignore_index)
    else:
        logits = head(hidden)
        if labels is not None:
            targets = _shifted_targets(labels, shift_labels, ignore_index).to(logits.device)
            logits2d = logits.reshape(-1, logits.shape[-1])
            loss = stablemax_cross_entropy(
                logits2d, targets, ignore_index=ignore_index, reduction=reduction
            )
            loss = loss.to(torch.promote_types(loss.dtype, torch.float32))
            loss = _reduce(loss, num_items_in_batch)
            state["monitor"].record(lambda rows: logits2d[rows].detach(), targets, ignore_index)
    fields = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
    out = CausalLMOutputWithPast(loss=loss, logits=logits)
    for key, value in fields.items():
        out[key] = value
    return out.to_tuple() if return_dict is False else out


def apply_stablemax(model: torch.nn.Module, fused_linear: bool = True) -> torch.nn.Module:
    """Make ``model`` (a transformers ``*ForCausalLM`` instance) train with StableMax CE.

    Args:
        model: e.g. ``LlamaForCausalLM``; patched in place (its instance ``forward``).
        fused_linear: compute the training loss from hidden states and the LM head in chunks
            (no ``[tokens, V]`` logits; ``logits`` is ``None`` while training with labels).

    Returns:
        ``model``. Calling it again updates ``fused_linear``; :func:`remove_stablemax` undoes it.

    Raises:
        TypeError: the model has no decoder (``base_model_prefix``) or LM head, or it
        post-processes its logits (soft-capping / scaling), which this path would drop.
    """
    prefix = getattr(model, "base_model_prefix", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not prefix or not hasattr(model, prefix) or head is None or not hasattr(head, "weight"):
        raise TypeError(
            f"apply_stablemax needs a causal LM with a decoder at model.base_model_prefix and an "
            f"LM head (get_output_embeddings()); {type(model).__name__} has neither"
        )
    config = getattr(model, "config", None)
    for name in _LOGIT_POSTPROCESSING:
        value = getattr(config, name, None)
        if value not in (None, 1.0, 0.0, False):
            raise TypeError(
                f"{type(model).__name__} post-processes logits (config.{name}={value}); "
                f"apply_stablemax would drop that"
            )
    state = getattr(model, "_stablecore_stablemax", None)
    if state is None:
        state = {"monitor": _CollapseMonitor()}
        model._stablecore_stablemax = state
        model.forward = types.MethodType(_stablemax_forward, model)
    state["fused_linear"] = fused_linear
    return model


def remove_stablemax(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply_stablemax` (restores the class ``forward``)."""
    if getattr(model, "_stablecore_stablemax", None) is not None:
        del model.forward
        del model._stablecore_stablemax
    return model


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


class SoftmaxCollapseCallback(TrainerCallback):
    """Log Softmax-Collapse fractions (Prieto et al. 2025) during ``Trainer`` training.

    Every ``every_n_steps`` optimizer steps, the first forward of the step measures, on up to
    ``max_rows`` non-ignored tokens, ``<kind>_collapse_fraction`` (correct-class gradient exactly
    0) and ``<kind>_zero_loss_fraction`` for each ``kind`` in ``kinds``, in ``dtype`` (default:
    the logits' dtype promoted to float32, as transformers upcasts logits for its loss).

    Works with models patched by :func:`apply_stablemax` (statistics from the hidden states) and
    with unpatched causal LMs (a forward hook reads ``logits`` and ``labels``). Results go to
    :attr:`history`, to ``state.log_history`` and into the ``logs`` of the next ``on_log``
    (callbacks after this one, e.g. reporters added later, see them).
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        max_rows: int = 4096,
        kinds: tuple[str, ...] = ("softmax", "stablemax"),
        dtype: torch.dtype | None = None,
    ) -> None:
        if every_n_steps < 1 or max_rows < 1:
            raise ValueError(
                f"every_n_steps and max_rows must be >= 1, got {every_n_steps}, {max_rows}"
            )
        self.every_n_steps, self.max_rows, self.kinds, self.dtype = (
            every_n_steps,
            max_rows,
            kinds,
            dtype,
        )
        self.history: list[dict[str, float]] = []
        self._pending: dict[str, float] = {}
        self._hooked: dict[int, tuple] = {}

    def _monitor(self, model) -> _CollapseMonitor:
        model = _unwrap(model)
        state = getattr(model, "_stablecore_stablemax", None)
        if state is not None:
            return state["monitor"]
        if id(model) not in self._hooked:
            monitor = _CollapseMonitor()

            def hook(module, args, kwargs, output, _m=monitor):
                labels, logits = kwargs.get("labels"), getattr(output, "logits", None)
                if labels is None or logits is None or _m.pending is None:
                    return
                targets = _shifted_targets(labels, kwargs.get("shift_labels"), -100)
                flat = logits.reshape(-1, logits.shape[-1])
                _m.record(lambda rows: flat[rows].detach(), targets.to(flat.device))

            handle = model.register_forward_hook(hook, with_kwargs=True)
            self._hooked[id(model)] = (monitor, handle)
        return self._hooked[id(model)][0]

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step % self.every_n_steps == 0:
            self._monitor(model).request(self.max_rows, self.kinds, self.dtype)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        monitor = self._monitor(model)
        monitor.pending = None
        if monitor.last is not None:
            record = {**monitor.last, "step": state.global_step}
            monitor.last = None
            self.history.append(record)
            state.log_history.append(dict(record))
            self._pending.update({k: v for k, v in record.items() if k != "step"})
            logger.info("softmax collapse at step %d: %s", state.global_step, record)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._pending:
            logs.update(self._pending)
            self._pending = {}

    def on_train_end(self, args, state, control, **kwargs):
        for _monitor, handle in self._hooked.values():
            handle.remove()
        self._hooked.clear()
