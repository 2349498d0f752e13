"""Layer-wise allocation: turn scores into boolean masks (True = kept).

Conventions shared by every function: `k = int(n * sparsity)` entries are pruned from a pool of
`n`; the threshold is the k-th smallest value and every entry `<=` it is pruned, so ties at the
threshold are pruned and the realised sparsity can slightly exceed the target.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

ALLOCATIONS = ("modality", "magnitude", "global", "layer", "row")


def kth_smallest(values: Tensor, k: int) -> Tensor:
    """The k-th smallest entry (1-based) of a flat tensor, as a 0-dim tensor; -inf when k < 1."""
    if k < 1:
        return torch.tensor(float("-inf"), device=values.device)
    return torch.kthvalue(values.reshape(-1).float(), min(k, values.numel())).values


def global_masks(scores: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """One threshold over the pooled scores of all layers (OMP, LAMP, SNIP, random; 'w/o distribution')."""
    pool = torch.cat([s.reshape(-1) for s in scores.values()])
    threshold = kth_smallest(pool, int(pool.numel() * sparsity))
    del pool
    return {name: s > threshold for name, s in scores.items()}


def pooled_ratios(magnitudes: Mapping[str, Tensor], groups: Mapping[str, str], sparsity: float) -> dict[str, int]:
    """Eq. 7: how many weights to prune per layer, from one magnitude pool per group.

    Returns name -> number of entries to prune. Pass every layer in one group for the
    'w/o multimodality' ablation (OMP's layer-wise ratios).
    """
    counts: dict[str, int] = {}
    for group in dict.fromkeys(groups[name] for name in magnitudes):
        names = [name for name in magnitudes if groups[name] == group]
        pool = torch.cat([magnitudes[name].reshape(-1) for name in names])
        threshold = kth_smallest(pool, int(pool.numel() * sparsity))
        del pool
        for name in names:
            counts[name] = int((magnitudes[name] <= threshold).sum().item())
    return counts


def uniform_counts(scores: Mapping[str, Tensor], sparsity: float) -> dict[str, int]:
    """The same ratio in every layer."""
    return {name: int(s.numel() * sparsity) for name, s in scores.items()}


def masks_from_counts(scores: Mapping[str, Tensor], counts: Mapping[str, int]) -> dict[str, Tensor]:
    """Eq. 8: in each layer prune the entries scoring `<=` its k-th smallest score (k >= 1)."""
    return {name: s > kth_smallest(s, counts[name]) for name, s in scores.items()}


def row_masks(scores: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Wanda's comparison group: within each output row, prune `int(in * sparsity)` entries."""
    masks = {}
    for name, s in scores.items():
        k = int(s.shape[1] * sparsity)
        if k < 1:
            masks[name] = torch.ones_like(s, dtype=torch.bool)
            continue
        thresholds = torch.kthvalue(s.float(), k, dim=1, keepdim=True).values
        masks[name] = s > thresholds
    return masks


def compute_masks(
    scores: Mapping[str, Tensor],
    sparsity: float,
    allocation: str,
    *,
    groups: Mapping[str, str] | None = None,
    magnitudes: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Masks for `scores` at `sparsity` under one allocation rule (see ALLOCATIONS)."""
    if allocation == "global":
        return global_masks(scores, sparsity)
    if allocation == "layer":
        return masks_from_counts(scores, uniform_counts(scores, sparsity))
    if allocation == "row":
        return row_masks(scores, sparsity)
    if allocation in ("modality", "magnitude"):
        if magnitudes is None or groups is None:
            raise ValueError(f"allocation {allocation!r} needs the weight magnitudes and the groups")
        pool_groups = groups if allocation == "modality" else {name: "all" for name in scores}
        return masks_from_counts(scores, pooled_ratios(magnitudes, pool_groups, sparsity))
    raise ValueError(f"unknown allocation {allocation!r}; expected one of {ALLOCATIONS}")
