"""Carried weights: the new values of the kept weights that SparseGPT and CHITA compute with their masks.

Those masks mean nothing without the weights (the kept weights were solved to make up for the
pruned ones), so a `PruningResult` carries both: `apply` writes the weights before zeroing,
files always hold them, a result of such a method without them is refused, and `at()` refuses
another sparsity (the weights were solved for this one).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .allocation import parse_pattern
from .methods import METHODS, get_method
from .upkeep import is_dtensor

if TYPE_CHECKING:
    from .result import PruningResult


def updates_weights(method: str) -> bool:
    """Whether the registered `method` changes the kept weights (an unknown method does not)."""
    try:
        return get_method(method).updates_weights
    except ValueError:
        return METHODS.get(method) is not None and METHODS[method].updates_weights


def check_carried_weights(result: "PruningResult") -> None:
    """Raise, naming the problem, unless `result`'s weights fit its masks (and exist when its method needs them)."""
    where = result._where()
    if result.weights is None:
        if updates_weights(result.method):
            raise ValueError(
                f"{where} come from {result.method!r}, which updates the kept weights, but carry no weights: "
                "applied alone they would prune the original weights without the method's compensation; "
                "keep the PruningResult that prune() returned, or a file it saved (files hold the weights)"
            )
        return
    if set(result.weights) != set(result.masks):
        odd = sorted(set(result.weights) ^ set(result.masks))
        raise ValueError(f"{where}: the carried weights and the masks name different layers: {odd[:5]}")
    for name, weight in result.weights.items():
        mask = result.masks[name]
        if tuple(weight.shape) != tuple(mask.shape):
            raise ValueError(f"{where}: carried weight {name!r} has shape {tuple(weight.shape)}, its mask "
                             f"{tuple(mask.shape)}")
        if not torch.isfinite(weight).all():
            raise ValueError(f"{where}: carried weight {name!r} holds non-finite values")
        if weight.masked_select(~mask.to(weight.device, torch.bool)).any():
            raise ValueError(f"{where}: carried weight {name!r} is non-zero where its mask prunes")


def carried_at(result: "PruningResult", sparsity: float, pattern: str | None) -> "PruningResult":
    """`result` itself when asked for its own sparsity and pattern; any other is an error naming why."""
    wanted = "%d:%d" % parse_pattern(pattern) if pattern is not None else result.pattern
    if math.isclose(sparsity, result.target_sparsity, rel_tol=0.0, abs_tol=1e-12) and wanted == result.pattern:
        return result
    asked = f"pattern={pattern!r}" if pattern is not None else f"sparsity={sparsity}"
    raise ValueError(
        f"{result._where()} come from {result.method!r}, whose kept weights were solved for sparsity "
        f"{result.target_sparsity:g}{f' ({result.pattern})' if result.pattern else ''}; they cannot be "
        f"re-thresholded to {asked}: re-run prune(method={result.method!r}, {asked})"
    )


def write_weights(model: nn.Module, weights: Mapping[str, Tensor]) -> None:
    """Copy each named weight into `model`'s parameter of that name (cast to its dtype; a sharded
    FSDP2 parameter takes its own shard of the full weight every process holds)."""
    from torch.distributed.tensor import distribute_tensor

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            param = params[name]
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(f"carried weight {name!r} has shape {tuple(value.shape)}, the model's "
                                 f"{tuple(param.shape)}")
            target: Any = param
            if is_dtensor(param):
                local = param.to_local()
                value = distribute_tensor(value.to(local.device, local.dtype), param.device_mesh, param.placements,
                                          src_data_rank=None).to_local()
                target = local
            value = value.to(target.device, target.dtype)
            if target.is_inference() and not torch.is_inference_mode_enabled():
                with torch.inference_mode():
                    target.copy_(value)
            else:
                target.copy_(value)
