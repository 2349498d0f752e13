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


# ---------------------------------------------------------------------------------------- N:M patterns
def parse_pattern(pattern: str) -> tuple[int, int]:
    """`"N:M"` -> (N, M): in every row, each run of M consecutive input weights keeps N (0 < N < M)."""
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"pattern must be 'N:M' with integers 0 < N < M (e.g. '2:4'), got {pattern!r}")
    n, m = (int(p) for p in parts)
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: N must be in 1..M-1 (N={n}, M={m})")
    return n, m


def pattern_masks(
    scores: Mapping[str, Tensor], pattern: str, *, dense_if_incompatible: bool = False
) -> dict[str, Tensor]:
    """N:M masks: in each row, every run of M consecutive inputs keeps its N highest scores (exactly N).

    A layer whose input width is not a multiple of M is an error naming it, or, with
    `dense_if_incompatible`, keeps every weight (an all-True mask: dense, and counted as such).
    """
    n, m = parse_pattern(pattern)
    incompatible = [name for name, s in scores.items() if s.dim() != 2 or s.shape[1] % m]
    if incompatible and not dense_if_incompatible:
        shapes = ", ".join(f"{name} {tuple(scores[name].shape)}" for name in incompatible[:5])
        raise ValueError(
            f"pattern {pattern!r}: {len(incompatible)} layer(s) have an input width that is not a multiple of "
            f"{m} ({shapes}); exclude them, or keep them dense with dense_if_incompatible=True"
        )
    masks = {}
    for name, s in scores.items():
        if name in incompatible:
            masks[name] = torch.ones_like(s, dtype=torch.bool)
            continue
        groups = s.float().reshape(s.shape[0], s.shape[1] // m, m)
        keep = groups.topk(n, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
        masks[name] = mask.reshape(s.shape)
    return masks


def pattern_violations(masks: Mapping[str, Tensor], pattern: str) -> dict[str, int]:
    """Layers breaking an N:M pattern: name -> number of M-runs keeping more than N (empty: all satisfy it).

    A layer whose input width is not a multiple of M counts all its rows as violations.
    """
    n, m = parse_pattern(pattern)
    bad = {}
    for name, mask in masks.items():
        if mask.dim() != 2 or mask.shape[1] % m:
            bad[name] = int(mask.shape[0])
            continue
        kept = mask.reshape(mask.shape[0], mask.shape[1] // m, m).sum(-1)
        count = int((kept > n).sum())
        if count:
            bad[name] = count
    return bad
