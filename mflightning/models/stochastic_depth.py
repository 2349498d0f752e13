"""Stochastic depth ("drop path") for pre-norm transformer layers whose modules we do not own.

BLIP's ViT (``models/blip/vit.py`` of the authors, timm's ``DropPath``) drops each residual branch
(attention and MLP, drawn independently) for a whole sample with probability ``p_i`` and scales the
kept ones by ``1 / (1 - p_i)``; ``p_i`` rises linearly over the layers, ``linspace(0, rate, depth)``.
transformers' ``BlipEncoderLayer`` has no such branch, so a forward hook on each branch module
(``self_attn``, ``mlp``) applies it to the branch output before the residual addition; parameter
names are unchanged (mask files still apply) and hooks travel with ``copy.deepcopy``.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

RATE_ATTRIBUTE = "_mfl_drop_path"  # the branch module's drop probability, read by the hook at every call


def drop_path(x: torch.Tensor, p: float) -> torch.Tensor:
    """Zero whole samples of ``x`` with probability ``p``, scale the rest by ``1 / (1 - p)`` (timm's rule)."""
    if p <= 0.0:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


def _drop_branch_output(module: nn.Module, args: tuple, output: Any) -> Any:
    p = getattr(module, RATE_ATTRIBUTE, 0.0)
    if not module.training or p <= 0.0:
        return output
    if isinstance(output, tuple):  # attention modules return (hidden_states, attention weights)
        return (drop_path(output[0], p),) + tuple(output[1:])
    return drop_path(output, p)


def layer_rates(rate: float, depth: int) -> list[float]:
    """Per-layer drop probabilities: ``linspace(0, rate, depth)`` (the stochastic depth decay rule)."""
    return [float(p) for p in torch.linspace(0.0, float(rate), depth, device="cpu")]


def set_drop_path_(layers: Iterable[nn.Module], rate: float, branches: tuple[str, ...]) -> list[float]:
    """Give each layer's ``branches`` (e.g. ``("self_attn", "mlp")``) drop path at the linear rule; returns the rates.

    ``rate=0`` switches it off. Hooks are installed once per branch module and read the stored rate,
    so the rate can be changed later (e.g. after loading a checkpoint).
    """
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    layers = list(layers)
    rates = layer_rates(rate, len(layers))
    for layer, p in zip(layers, rates):
        for branch in branches:
            module = getattr(layer, branch, None)
            if module is None:
                raise ValueError(f"{type(layer).__name__} has no branch module {branch!r} for drop path")
            if not hasattr(module, RATE_ATTRIBUTE):
                module.register_forward_hook(_drop_branch_output)
            setattr(module, RATE_ATTRIBUTE, p)
    return rates
