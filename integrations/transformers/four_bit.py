"""4-bit (INT4 / FP4) training of LLaMA-family transformers models, as Stable-SPAM runs it.

:func:`apply_4bit_training` swaps the attention and MLP projections (``q/k/v/o_proj``,
``gate/up/down_proj``) for :class:`stablecore.nn.quant_linear.QuantLinear`: weights and input
activations are fake-quantized in the forward pass with straight-through gradients, while the
embeddings, ``lm_head`` and the RMSNorms stay in full precision (notes §3, from the paper's
``main_pretrain.py`` target list). Works for any model that names its projections this way
(LLaMA, Mistral, Qwen2, ...).
"""

from __future__ import annotations

import transformers
from torch import nn

from stablecore.nn.quant_linear import quantize_linear_layers

__all__ = ["LLAMA_4BIT_TARGETS", "apply_4bit_training"]

#: The linears the paper quantizes: attention and MLP projections only.
LLAMA_4BIT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_4bit_training(
    model: nn.Module,
    fmt: str = "int4",
    group_size: int = 256,
    keep_outliers: int = 2,
    targets=LLAMA_4BIT_TARGETS,
) -> nn.Module:
    """Turn on simulated 4-bit training for a LLaMA-family model, in place.

    Args:
        model: a ``transformers`` model (``LlamaForCausalLM``, ``LlamaModel``, ...) or any
            module whose linears are named as in LLaMA.
        fmt: ``"int4"`` (INT4 weights and activations, the paper's default), ``"fp4"`` (the
            paper's 9-level "FP4" grid) or ``"e2m1"`` (true FP4).
        group_size, keep_outliers: as :func:`stablecore.nn.quant_linear.quantize_linear_layers`
            (paper: 256 and 2).
        targets: the layer names to quantize (default: attention and MLP projections).

    Returns:
        ``model``, with its parameter objects unchanged (build the optimizer before or after).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``. ValueError: no projection found.

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
        ...                   num_hidden_layers=2, num_attention_heads=4)
        >>> model = apply_4bit_training(LlamaForCausalLM(cfg), fmt="int4")
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    try:
        return quantize_linear_layers(
            model, fmt=fmt, group_size=group_size, keep_outliers=keep_outliers, targets=targets
        )
    except ValueError as exc:
        if "matched" not in str(exc):
            raise
        kind = "transformers model" if isinstance(model, transformers.PreTrainedModel) else "model"
        raise ValueError(
            f"{type(model).__name__} ({kind}) has no linear layers named {tuple(targets)}; "
            "apply_4bit_training expects a LLaMA-family model"
        ) from exc
