"""SparseGPT (Frantar & Alistarh, 2023): layer-wise optimal brain surgeon from calibration Hessians.

Per layer, H = X^T X of the layer's calibration inputs (PAD tokens dropped as for MultiFlow, summed
over processes; `stats.collect_input_norms(gram=True)`), dampened by 1% of its mean diagonal. The
columns are visited left to right in blocks of 128: in each block the pruned entries are chosen
(unstructured: the lowest w^2 / [U]_jj^2 of the block, U the upper Cholesky factor of H^-1; N:M:
the same saliency within each run of M columns when the run starts), and every pruned weight's
error is spread over the columns right of it with the optimal-brain-surgeon update. The result is
a mask and new values for the kept weights.

One pass: all Hessians come from one calibration pass over the dense model, not layer by layer on
the already-pruned model's inputs (the SparseGPT paper's sequential variant), because a calibration
forward here is any user function over a multimodal model with no common chain of blocks to replay
layer by layer; sequential calibration would cost one full pass per depth.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .allocation import parse_pattern
from .methods import register_method

BLOCK_SIZE = 128  # columns handled together (the SparseGPT paper's B)
DAMPENING = 0.01  # lambda = 1% of the mean diagonal of H (the paper's default)


@register_method("sparsegpt", needs="hessians", allocation="layer", updates_weights=True,
                 description="layer-wise OBS from calibration Hessians X^T X; updates the kept weights")
def sparsegpt_layer(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    pattern: str | None = None,
    *,
    block_size: int = BLOCK_SIZE,
    dampening: float = DAMPENING,
    name: str = "layer",
) -> tuple[Tensor, Tensor]:
    """(kept mask, new weight) of one (out x in) layer from its input Hessian (in x in).

    Unstructured: each block of `block_size` columns loses round(sparsity * its size) weights.
    `pattern="N:M"` keeps N of every M consecutive inputs of each row. Computed in fp32 (fp64 on
    CPU for the factorisation); the new weight is fp32 with exact zeros where the mask is False.
    """
    W = weight.detach().float().clone()
    rows, columns = W.shape
    if tuple(hessian.shape) != (columns, columns):
        raise ValueError(f"{name}: Hessian of shape {tuple(hessian.shape)} for a weight with {columns} inputs")
    prune_n = keep_m = 0
    if pattern is not None:
        keep_n, keep_m = parse_pattern(pattern)
        prune_n = keep_m - keep_n
        if columns % keep_m:
            raise ValueError(f"{name}: {columns} inputs are not a multiple of M={keep_m} of pattern {pattern!r}")
    H = hessian.detach().to(W.device, torch.float64).clone()
    dead = torch.diagonal(H) == 0  # inputs that were always zero: their weights carry no signal
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damp = dampening * torch.diagonal(H).mean()
    H.diagonal().add_(damp)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"{name}: the dampened Hessian is not positive definite ({err}); "
                         "is the calibration data finite?") from err
    U = U.to(torch.float32)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        W1, U1 = W[:, start:end].clone(), U[start:end, start:end]
        diag = torch.diagonal(U1)
        errors = torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)  # True = pruned
        if not prune_n:
            saliency = W1.square() / diag.square().unsqueeze(0)
            count = round(sparsity * saliency.numel())
            if count:
                lowest = torch.topk(saliency.reshape(-1), count, largest=False).indices
                mask1.view(-1)[lowest] = True
        for i in range(end - start):
            if prune_n and i % keep_m == 0:
                saliency = W1[:, i:i + keep_m].square() / diag[i:i + keep_m].square().unsqueeze(0)
                mask1.scatter_(1, i + torch.topk(saliency, prune_n, dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            error = (w - q) / diag[i]
            W1[:, i:] -= error.unsqueeze(1) * U1[i, i:].unsqueeze(0)  # the OBS update of the columns right of i
            W1[:, i] = q
            errors[:, i] = error
        W[:, start:end] = W1
        pruned[:, start:end] = mask1
        W[:, end:] -= errors @ U[start:end, end:]  # the block's errors onto the columns right of the block
    W[pruned] = 0.0
    return ~pruned, W


def sparsegpt_masks(
    weights: Mapping[str, Tensor],
    hessians: Mapping[str, Tensor],
    sparsity: float,
    pattern: str | None = None,
    *,
    dense_if_incompatible: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(masks, new weights) of every layer; with `dense_if_incompatible`, a layer whose inputs do not
    fit the N:M pattern stays dense with its weights unchanged."""
    masks: dict[str, Tensor] = {}
    updated: dict[str, Tensor] = {}
    for name, weight in weights.items():
        if pattern is not None and dense_if_incompatible and weight.shape[1] % parse_pattern(pattern)[1]:
            masks[name] = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
            updated[name] = weight.detach().float()
            continue
        masks[name], updated[name] = sparsegpt_layer(weight, hessians[name], sparsity, pattern, name=name)
    return masks, updated
