"""`prune()`: calibrate, score, allocate and return masks. Pure torch; knows nothing of Lightning."""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import scores as S
from .allocation import ALLOCATIONS, compute_masks
from .presets import GroupMap
from .result import PruningResult, apply_masks
from .stats import (
    Batch,
    ForwardFn,
    ReduceFn,
    TokenMaskFn,
    collect_gradients,
    collect_input_norms,
    default_forward,
    default_token_mask,
    iterate_shard,
)
from .targets import Target, find_targets, resolve_modalities


@dataclass(frozen=True)
class Method:
    """What a method needs ('activations', 'gradients' or nothing) and its own allocation."""

    needs: str | None
    allocation: str
    description: str


METHODS: dict[str, Method] = {
    "multiflow": Method("activations", "modality", "information flow (Eq. 6) with the multimodal prior (Eq. 7-8)"),
    "omp": Method(None, "global", "one-shot global magnitude pruning"),
    "lamp": Method(None, "global", "layer-adaptive magnitude scores, global threshold"),
    "random": Method(None, "global", "random scores, global threshold"),
    "wanda": Method("activations", "row", "|W| * input norm, compared within each output row"),
    "snip": Method("gradients", "global", "|gradient * weight| of the pretraining loss"),
    "itersnip": Method("gradients", "global", "SNIP repeated over rounds with an exponential schedule"),
}


def check_sparsity(sparsity: float) -> float:
    """Sparsity must be a finite number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def check_method(method: str, allocation: str | None) -> tuple[Method, str]:
    """The method's spec and the effective allocation (the method's own when None)."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; expected one of {sorted(METHODS)}")
    spec = METHODS[method]
    allocation = allocation or spec.allocation
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; expected one of {list(ALLOCATIONS)}")
    return spec, allocation


def prune(
    model: nn.Module,
    *,
    sparsity: float,
    method: str = "multiflow",
    calibration: Iterable[Batch] | None = None,
    forward: ForwardFn | None = None,
    modalities: GroupMap = None,
    exclude: Iterable[str] = (),
    token_mask: TokenMaskFn | None = None,
    num_batches: int | None = None,
    allocation: str | None = None,
    invert: bool = False,
    loss: Callable[[nn.Module, Batch], Tensor] | None = None,
    seed: int = 0,
    rounds: int = 10,
    keep_scores: bool = True,
    progress: bool = False,
    shard: tuple[int, int] | None = None,
    reduce: ReduceFn | None = None,
    transfer: Callable[[Batch], Batch] | None = None,
) -> PruningResult:
    """Compute pruning masks for `model`'s nn.Linear weights; the model itself is left unchanged.

    `allocation=None` uses the method's own rule: `modality` (Eq. 7-8) for multiflow, `row` for
    wanda, `global` for the others. Set it to run the paper's ablations (`magnitude`: ratios from
    one magnitude pool, "w/o multimodality"; `global`: one score threshold, "w/o distribution").
    `shard=(rank, world)` and `reduce` (in-place sum over processes) split calibration across
    processes; every process returns the same masks. Call `result.apply(model)` to zero weights.
    """
    sparsity = check_sparsity(sparsity)
    spec, allocation = check_method(method, allocation)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    group_spec = resolve_modalities(model, modalities, exclude)
    targets = find_targets(model, group_spec)
    groups = {name: t.group for name, t in targets.items()}
    # the preset travels with the masks so a task module can apply its `inherit` rules later
    preset = modalities if isinstance(modalities, str) else None
    if modalities is None:
        preset = getattr(model, "pruning_preset", None)
    if spec.needs is not None and calibration is None:
        raise ValueError(f"method {method!r} is data-driven and needs calibration batches (calibration=None)")
    if spec.needs == "gradients" and loss is None:
        raise ValueError(f"method {method!r} needs `loss(model, batch) -> scalar tensor`")
    # |W| drives the layer ratios of the pooled allocations and is OMP's score; other runs skip the copy
    needs_magnitudes = allocation in ("modality", "magnitude") or method == "omp" or keep_scores
    magnitudes = {name: S.magnitude_scores(t.param) for name, t in targets.items()} if needs_magnitudes else None
    info: dict[str, Any] = {}

    if spec.needs == "activations":
        stats = collect_input_norms(
            model,
            targets,
            calibration,  # type: ignore[arg-type]
            forward=forward or default_forward,
            token_mask=token_mask or default_token_mask,
            num_batches=num_batches,
            shard=shard,
            reduce=reduce,
            transfer=transfer,
            progress=progress,
        )
        _check_seen(stats.num_batches, stats.calls, method)
        info = {"num_batches": stats.num_batches, "num_samples": stats.num_samples}
        norms = {name: stats.sums[name].sqrt() for name in targets}
        fn = S.multiflow_scores if method == "multiflow" else S.wanda_scores
        scores = {name: fn(t.param, norms[name]) for name, t in targets.items()}
    elif method == "snip":
        stats = collect_gradients(
            model, targets, calibration, loss,  # type: ignore[arg-type]
            num_batches=num_batches, shard=shard, reduce=reduce, transfer=transfer, progress=progress,
        )
        _check_seen(stats.num_batches, stats.calls, method)
        info = {"num_batches": stats.num_batches, "num_samples": stats.num_samples}
        scores = {name: S.snip_scores(t.param, stats.sums[name]) for name, t in targets.items()}
    elif method == "itersnip":
        scores, info = _iterative_snip(
            model, targets, calibration, loss, sparsity, allocation, groups, magnitudes,  # type: ignore[arg-type]
            rounds=rounds, num_batches=num_batches, shard=shard, reduce=reduce, transfer=transfer, progress=progress,
        )
    elif method == "random":
        generator = torch.Generator().manual_seed(seed)
        scores = {name: S.random_scores(t.param, generator) for name, t in targets.items()}
    elif method == "lamp":
        scores = {name: S.lamp_scores(t.param) for name, t in targets.items()}
    else:  # omp
        scores = dict(magnitudes)  # type: ignore[arg-type]

    if invert:
        scores = {name: -s for name, s in scores.items()}
    masks = compute_masks(scores, sparsity, allocation, groups=groups, magnitudes=magnitudes)
    cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
    return PruningResult(
        masks=cpu(masks),
        groups=groups,
        method=method,
        target_sparsity=sparsity,
        allocation=allocation,
        invert=invert,
        preset=preset,
        calibration=info,
        scores=cpu(scores) if keep_scores else None,
        magnitudes=cpu(magnitudes) if keep_scores and magnitudes is not None else None,
    )


def _check_seen(num_batches: int, calls: dict[str, int], method: str) -> None:
    if num_batches == 0:
        raise ValueError(f"method {method!r}: the calibration data yielded no batches (empty loader?)")
    unseen = [name for name, count in calls.items() if count == 0]
    if unseen:
        raise ValueError(
            f"{len(unseen)} prunable layer(s) never ran during calibration (first: {unseen[:3]}); the "
            "calibration forward must run every prunable layer (define calibration_step / forward), "
            "or leave those layers dense with `exclude`"
        )


def _iterative_snip(
    model: nn.Module,
    targets: dict[str, Target],
    calibration: Iterable[Batch],
    loss: Callable[[nn.Module, Batch], Tensor],
    sparsity: float,
    allocation: str,
    groups: dict[str, str],
    magnitudes: dict[str, Tensor] | None,
    *,
    rounds: int,
    num_batches: int | None,
    shard: tuple[int, int] | None,
    reduce: ReduceFn | None,
    transfer: Callable[[Batch], Batch] | None,
    progress: bool,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """IterSNIP: T rounds at sparsity 1 - (1 - s)^((t+1)/T), zeroing weights between rounds.

    Each round consumes the next slice of the (cycled) calibration batches. The model's weights
    are restored when done, so only the returned scores carry the result.
    """
    originals = {name: t.param.detach().clone() for name, t in targets.items()}
    total = num_batches if num_batches is not None else _length(calibration)
    per_round = max(1, (total or rounds) // rounds)
    rank, world = shard if shard is not None else (0, 1)
    stream = enumerate(_cycle(calibration))
    seen = 0
    scores: dict[str, Tensor] = {}
    try:
        for t in range(rounds):
            round_sparsity = 1.0 - (1.0 - sparsity) ** ((t + 1) / rounds)
            chunk = itertools.islice(stream, per_round)
            batches = ((i, b) for i, b in chunk if i % world == rank)
            stats = collect_gradients(
                model, targets, calibration, loss, reduce=reduce, transfer=transfer, progress=progress, batches=batches
            )
            _check_seen(stats.num_batches, stats.calls, "itersnip")
            seen += stats.num_batches
            scores = {name: S.snip_scores(tg.param, stats.sums[name]) for name, tg in targets.items()}
            masks = compute_masks(scores, round_sparsity, allocation, groups=groups, magnitudes=magnitudes)
            apply_masks(model, masks)
    finally:
        with torch.no_grad():
            for name, t in targets.items():
                t.param.copy_(originals[name])
    return scores, {"num_batches": seen, "rounds": rounds}


def _length(calibration: Iterable[Batch]) -> int | None:
    try:
        return len(calibration)  # type: ignore[arg-type]
    except TypeError:
        return None


def _cycle(calibration: Iterable[Batch]):
    """Yield the batches again and again (a one-shot iterator is materialised once); stops if empty."""
    source = list(calibration) if iter(calibration) is calibration else calibration
    while True:
        empty = True
        for batch in source:
            empty = False
            yield batch
        if empty:
            return
