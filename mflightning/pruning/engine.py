"""`prune()`: calibrate, score, allocate and return masks. Pure torch; knows nothing of Lightning."""
from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import chita as C
from . import scores as S
from .allocation import compute_masks, pattern_masks
from .config import PruningConfig
from .methods import Method
from .presets import calibration_adapter, recognise_preset
from .naming import copy_exclusions
from .result import SHOWN, PruningResult, apply_masks
from .sparsegpt import sparsegpt_masks
from .batches import (
    Batch,
    ForwardFn,
    ReduceFn,
    TokenMaskFn,
    default_forward,
    default_token_mask,
    distributed_sampler_shard,
)
from .stats import collect_gradients, collect_input_norms
from .targets import SINGLE_GROUP, GroupSpec, Target, find_targets, resolve_modalities
from .upkeep import full_tensor, is_dtensor


# A layer pruned beyond this (at a lower target) is warned about: it barely passes any signal.
NEARLY_EMPTY = 0.99


def _outside_inference_mode(fn: Callable[..., PruningResult]) -> Callable[..., PruningResult]:
    """Run `fn` with inference mode off, so it works when called under `torch.inference_mode()`.

    Under inference mode every new tensor is an inference tensor: it has no version counter (which
    the statistics use) and autograd cannot save it, so masks made there would break a later
    `apply` or fine-tuning outside inference mode. Inference mode is only ever switched off here.
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> PruningResult:
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapped


@_outside_inference_mode
def prune(
    model: nn.Module,
    config: PruningConfig | None = None,
    *,
    calibration: Iterable[Batch] | None = None,
    forward: ForwardFn | None = None,
    token_mask: TokenMaskFn | None = None,
    loss: Callable[[nn.Module, Batch], Tensor] | None = None,
    keep_scores: bool = True,
    progress: bool = False,
    shard: tuple[int, int] | None = None,
    reduce: ReduceFn | None = None,
    transfer: Callable[[Batch], Batch] | None = None,
    **settings: Any,
) -> PruningResult:
    """Compute pruning masks for `model`'s prunable weights; the model itself is left unchanged.

    What to prune is a `PruningConfig` (`config`, and/or its fields as keywords: `sparsity`,
    `method`, `allocation`, `invert`, `modalities`, `exclude`, `image_groups`,
    `prune_tied_embeddings`, `shared_weight_inputs`, `num_batches`, `seed`, `rounds`, `allow_degenerate`). Degenerate
    scores (a layer whose scores are all equal, or ties pushing the realised sparsity more than one point over
    the target) are an error naming the layers unless `allow_degenerate=True`. `allocation=None` uses the method's
    own rule: `modality` (Eq. 7-8) for multiflow, `row` for wanda, `global` for the others. Set it
    to run the paper's ablations (`magnitude`: ratios from one magnitude pool, "w/o
    multimodality"; `global`: one score threshold, "w/o distribution").

    The rest says how to run the model: `calibration` batches, `forward(model, batch)`,
    `token_mask(batch)`, `loss(model, batch)` for gradient methods. `shard=(rank, world)` and
    `reduce` (in-place sum over processes) split calibration across processes; every process
    returns the same masks. Call `result.apply(model)` to zero weights.

    `modalities=None` takes the model's preset: its `pruning_preset` attribute, else a registered
    recogniser's answer (transformers' CLIPModel, SiglipModel, BLIP-2, LLaVA, bare or inside a
    wrapper: `mflightning.models.hf_families`). A preset's calibration adapter then supplies the
    forward and token mask that run the family on processor batches, unless `forward=` /
    `token_mask=` are given.

    Works under `torch.inference_mode()` too (the returned tensors are ordinary ones). A layer left
    more than 99% pruned while the target is lower gets a warning (a freshly initialised head or a
    pooler usually belongs in `exclude`).
    """
    config = PruningConfig.build(config, **settings)
    if config.sparsity is None:
        raise ValueError("prune() needs a sparsity in [0, 1) (config.sparsity is None)")
    sparsity, method, spec, allocation = config.sparsity, config.method, config.spec, config.effective_allocation
    # modalities=None: the model's preset (`pruning_preset`, or recognised: transformers' classes)
    preset = config.modalities if isinstance(config.modalities, str) else None
    if config.modalities is None:
        preset = recognise_preset(model)
    # the preset's calibration adapter (a transformers family's forward on processor batches), only when no
    # forward is given: a user's forward runs any model, also one the adapter could not (e.g. a look-alike)
    adapter = calibration_adapter(model, preset) if calibration is not None and forward is None else None
    if adapter is not None:
        forward = adapter.forward
        token_mask = token_mask or adapter.token_mask
    group_spec = resolve_modalities(
        # declared copies (momentum / EMA encoders, `pruning_copies`) take their source's masks, unscored
        model, preset if config.modalities is None else config.modalities, config.exclude + copy_exclusions(model),
        image_groups=config.image_groups, prune_tied_embeddings=config.prune_tied_embeddings,
    )
    targets = find_targets(model, group_spec, shared_weight_inputs=config.shared_weight_inputs)
    groups = {name: t.group for name, t in targets.items()}
    # the preset travels with the masks so a task module can apply its `inherit` rules later
    if spec.data_driven and calibration is None:
        raise ValueError(f"method {method!r} is data-driven and needs calibration batches (calibration=None)")
    gradients = spec.needs in ("gradients", "gradient_rows")
    if gradients and loss is None:
        raise ValueError(f"method {method!r} needs `loss(model, batch) -> scalar tensor`")
    if gradients:
        _check_no_inference_parameters(targets, method)
    if spec.updates_weights:
        _check_weight_updating(config)
    # |W| drives the layer ratios of the pooled allocations and is OMP's score; other runs skip the copy
    needs_magnitudes = not spec.updates_weights and (
        allocation in ("modality", "magnitude") or spec.score is S.magnitude_scores or keep_scores
    )
    weights = _full_weights(targets, spec)
    magnitudes = {name: S.magnitude_scores(w) for name, w in weights.items()} if needs_magnitudes else None
    collect = dict(num_batches=config.num_batches, shard=shard, reduce=reduce, transfer=transfer, progress=progress)
    info: dict[str, Any] = {}
    statistics: Mapping[str, Any] = {}
    updated: dict[str, Tensor] | None = None  # new values of the kept weights (weight-updating methods)
    scores: dict[str, Tensor] | None = None

    if spec.needs == "hessians":
        stats = collect_input_norms(
            model, targets, calibration,  # type: ignore[arg-type]
            forward=forward or default_forward, token_mask=token_mask or default_token_mask, gram=True,
            lockstep=any(is_dtensor(t.param) for t in targets.values()), **collect,  # type: ignore[arg-type]
        )
        _check_seen(stats.num_batches, stats.calls, method)
        info = {"num_batches": stats.num_batches, "num_samples": stats.num_samples}
        masks, updated = sparsegpt_masks(
            weights, stats.sums, sparsity, config.pattern, dense_if_incompatible=config.dense_if_incompatible
        )
        del stats
    elif spec.needs == "gradient_rows":
        masks, updated, info = _chita(
            model, targets, calibration, loss, sparsity, method,  # type: ignore[arg-type]
            rounds=config.rounds, **collect,  # type: ignore[arg-type]
        )
    elif spec.iterative:
        scores, info = _iterative_snip(
            model, targets, calibration, loss, sparsity, allocation, groups, magnitudes,  # type: ignore[arg-type]
            rounds=config.rounds, **collect,  # type: ignore[arg-type]
        )
    else:
        if spec.needs == "activations":
            stats = collect_input_norms(
                model, targets, calibration,  # type: ignore[arg-type]
                forward=forward or default_forward, token_mask=token_mask or default_token_mask,
                lockstep=any(is_dtensor(t.param) for t in targets.values()), **collect,  # type: ignore[arg-type]
            )
            _check_seen(stats.num_batches, stats.calls, method)
            info = {"num_batches": stats.num_batches, "num_samples": stats.num_samples}
            norms = {name: stats.sums[name].sqrt() for name in targets}
            statistics = norms
        elif spec.needs == "gradients":
            stats = collect_gradients(model, targets, calibration, loss, **collect)  # type: ignore[arg-type]
            _check_seen(stats.num_batches, stats.calls, method)
            info = {"num_batches": stats.num_batches, "num_samples": stats.num_samples}
            statistics = stats.sums
        elif spec.needs == "generator":
            generator = torch.Generator().manual_seed(config.seed)
            statistics = {name: generator for name in targets}  # one generator, consumed in layer order
        if magnitudes is not None and spec.score is S.magnitude_scores:
            scores = dict(magnitudes)  # OMP's score is |W|: reuse it
        else:
            scores = {name: spec.scores(weights[name], statistics.get(name)) for name in targets}

    if updated is None:
        assert scores is not None
        if config.invert:
            scores = {name: -s for name, s in scores.items()}
        if config.pattern is not None:
            masks = pattern_masks(scores, config.pattern, dense_if_incompatible=config.dense_if_incompatible)
        else:
            masks = compute_masks(scores, sparsity, allocation, groups=groups, magnitudes=magnitudes)
            if not config.allow_degenerate:
                _check_degenerate(scores, masks, sparsity, method, spec)
    _warn_nearly_empty(masks, sparsity)
    cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
    return PruningResult(
        masks=cpu(masks),
        groups=groups,
        method=method,
        target_sparsity=sparsity,
        allocation=allocation,
        invert=config.invert,
        preset=preset,
        calibration=info,
        scores=cpu(scores) if keep_scores and scores is not None else None,
        magnitudes=cpu(magnitudes) if keep_scores and magnitudes is not None else None,
        exclude=config.exclude,
        dense_layers=_dense_layers(model, targets),
        pattern=config.pattern,
        weights=None if updated is None else {name: w.detach().cpu() for name, w in updated.items()},
    )


def _check_weight_updating(config: PruningConfig) -> None:
    """Refuse the settings a weight-updating method (SparseGPT, CHITA) has no meaning for, naming them."""
    method, own = config.method, config.spec.allocation
    if config.invert:
        raise ValueError(f"method {method!r} solves for the weights it keeps; invert=True has no meaning for it")
    if config.allocation not in (None, own):
        raise ValueError(f"method {method!r} allocates by its own rule ({own!r}); allocation={config.allocation!r} "
                         "cannot apply")
    if config.pattern is not None and config.spec.needs != "hessians":
        raise ValueError(f"method {method!r} keeps the k best weights of the whole model; it has no N:M variant "
                         f"(pattern={config.pattern!r}); sparsegpt has one")


def _full_weights(targets: Mapping[str, Target], spec: Method) -> dict[str, Tensor]:
    """Each prunable weight whole: a sharded (FSDP2 DTensor) weight is gathered, one layer at a time.

    Scores and the Eq. 7 pools need whole layers; every process computes the same masks, which
    mask upkeep then shards like the parameters. Gradient methods are not verified under FSDP2.
    """
    sharded = [name for name, t in targets.items() if is_dtensor(t.param)]
    if sharded and spec.needs in ("gradients", "gradient_rows"):
        raise NotImplementedError(
            f"method {spec.name!r} is not supported on sharded (FSDP2/DTensor) parameters (first: {sharded[:3]}); "
            "use multiflow, wanda, omp, lamp or random, or compute the masks unsharded and pass masks="
        )
    return {name: full_tensor(t.param.detach()) for name, t in targets.items()}


def _check_no_inference_parameters(targets: Mapping[str, Target], method: str) -> None:
    """Gradient methods cannot use weights that are inference tensors: raise, naming them."""
    frozen = [name for name, t in targets.items() if t.param.is_inference()]
    if frozen:
        raise RuntimeError(
            f"method {method!r} needs gradients, but {len(frozen)} prunable weight(s) are inference tensors "
            f"(first: {frozen[:3]}): the model was built or loaded under torch.inference_mode(), and autograd "
            "cannot use such tensors; build or load it outside inference mode (torch.no_grad() is fine), or "
            "use an activation-based (multiflow, wanda) or data-free (omp, lamp, random) method"
        )


def _warn_nearly_empty(masks: Mapping[str, Tensor], sparsity: float) -> None:
    """Warn, naming them, about layers left more than 99% pruned when the target is lower than that."""
    if sparsity >= NEARLY_EMPTY or not masks:
        return
    kept = torch.stack([m.sum() for m in masks.values()]).tolist()  # one device sync for all layers
    ratios = {name: 1.0 - k / m.numel() for (name, m), k in zip(masks.items(), kept)}
    nearly_empty = [name for name, ratio in ratios.items() if ratio > NEARLY_EMPTY]
    if not nearly_empty:
        return
    shown = ", ".join(f"{name} ({ratios[name]:.2%})" for name in nearly_empty[:SHOWN])
    more = f" and {len(nearly_empty) - SHOWN} more" if len(nearly_empty) > SHOWN else ""
    warnings.warn(
        f"{len(nearly_empty)} layer(s) left more than {NEARLY_EMPTY:.0%} pruned at target sparsity {sparsity}: "
        f"{shown}{more}; such a layer passes almost no signal. If it is a freshly initialised head or a "
        "pooler (e.g. BERT's), keep it dense with exclude=[regex, ...]",
        stacklevel=4,  # the caller of prune(), past the inference-mode wrapper
    )


# Ties at a threshold are pruned: more than this over the target (overall) means the scores are degenerate.
OVERSHOOT = 0.01


def _check_degenerate(
    scores: Mapping[str, Tensor], masks: Mapping[str, Tensor], sparsity: float, method: str, spec: Method
) -> None:
    """Raise, naming the layers, when the scores cannot rank the weights: a layer whose scores are all
    equal (it would be kept or pruned whole), or ties that push the realised sparsity more than
    `OVERSHOOT` over the target. `allow_degenerate=True` accepts them."""
    names = list(masks)
    figures = torch.stack([
        torch.stack([s.max().float() - s.min().float(), (s == 0).sum().float(), m.sum().float()])
        for s, m in ((scores[n], masks[n]) for n in names)
    ]).cpu().tolist()
    sizes = [masks[n].numel() for n in names]
    # all scores equal and some pruned: the layer goes whole (at a tiny target, kept whole is harmless)
    flat = [n for n, (spread, _, kept), size in zip(names, figures, sizes) if spread == 0 and size > 1 and kept < size]
    realised = 1.0 - sum(f[2] for f in figures) / max(1, sum(sizes))
    if not flat and realised <= sparsity + OVERSHOOT:
        return
    ratios = {n: 1.0 - f[2] / size for n, f, size in zip(names, figures, sizes)}
    zeros = {n: f[1] / size for n, f, size in zip(names, figures, sizes)}
    worst = sorted(names, key=lambda n: ratios[n], reverse=True)
    shown = ", ".join(f"{n} ({ratios[n]:.1%} pruned, {zeros[n]:.0%} zero scores)" for n in (flat or worst)[:SHOWN])
    more = f" and {len(flat or worst) - SHOWN} more" if len(flat or worst) > SHOWN else ""
    what = (
        f"{len(flat)} layer(s) have all their scores equal" if flat
        else f"tied scores (pruned together at the threshold) make the realised sparsity {realised:.4f}, "
             f"more than {OVERSHOOT:.0%} over the target"
    )
    if spec.needs == "gradients":
        cause = (
            "a gradient method sees no gradient through these layers: typically the loss reads them through a "
            "zero-initialised head (torchvision's ViT zero-inits its classification head), so every |g * w| is 0; "
            "train or initialise the head first, or use an activation-based method (multiflow, wanda)"
        )
    else:
        cause = (
            "scores are zero wherever an input feature is always zero (dead inputs: a feature the calibration data "
            "never sets, or a layer after a zeroed one) or the weights are zero, and ties are pruned together; "
            "check the calibration data and the model"
        )
    raise ValueError(
        f"method {method!r} at sparsity {sparsity}: degenerate scores: {what}: {shown}{more}. Likely cause: {cause}. "
        "Pass allow_degenerate=True to prune with them anyway"
    )


def _dense_layers(model: nn.Module, targets: Mapping[str, Target]) -> dict[str, int]:
    """The weights `find_targets` finds in `model` with no exclusion but `targets` leaves out: name -> size."""
    every = find_targets(model, GroupSpec(lambda name: SINGLE_GROUP, (), (), "every prunable layer", refuse_computed_weights=False))
    return {name: t.param.numel() for name, t in every.items() if name not in targets}


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

    The calibration batches are split over the rounds (`_round_batches`). The model's weights are
    restored when done, so only the scores carry the result.
    """
    originals = {name: t.param.detach().clone() for name, t in targets.items()}
    seen = 0
    scores: dict[str, Tensor] = {}
    try:
        for t, (_, batches) in enumerate(_round_batches(calibration, num_batches, shard, rounds, "itersnip")):
            round_sparsity = 1.0 - (1.0 - sparsity) ** ((t + 1) / rounds)
            stats = collect_gradients(
                model, targets, calibration, loss, reduce=reduce, transfer=transfer, progress=progress,
                batches=((i, b) for _, i, b in batches),
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


def _chita(
    model: nn.Module,
    targets: dict[str, Target],
    calibration: Iterable[Batch],
    loss: Callable[[nn.Module, Batch], Tensor],
    sparsity: float,
    method: str,
    *,
    rounds: int,
    num_batches: int | None,
    shard: tuple[int, int] | None,
    reduce: ReduceFn | None,
    transfer: Callable[[Batch], Batch] | None,
    progress: bool,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """CHITA (one round) or CHITA++ (`rounds` rounds, each on the pruned, updated model): (masks, weights, info).

    The calibration batches are split over the rounds like IterSNIP's; the model's weights are
    restored when done, the new ones travel in the result.
    """
    del progress  # one line per round would be all a bar could show
    rounds = rounds if method == "chita++" else 1
    weights = sum(t.param.numel() for t in targets.values())
    originals = {name: t.param.detach().clone() for name, t in targets.items()}
    masks: dict[str, Tensor] | None = None
    updated: dict[str, Tensor] = {}
    seen = 0
    try:
        for round_sparsity, (rows, batches) in zip(
            C.round_sparsities(sparsity, rounds), _round_batches(calibration, num_batches, shard, rounds, method)
        ):
            C.check_memory(method, rows, weights)
            A, batch_size = C.gradient_rows(model, targets, batches, loss, rows, masks=masks, reduce=reduce,
                                            transfer=transfer)
            seen += rows
            updated = C.chita_round(A, {n: t.param for n, t in targets.items()}, round_sparsity, batch_size)
            del A
            masks = {n: (w != 0).to(targets[n].param.device) for n, w in updated.items()}
            with torch.no_grad():
                for name, t in targets.items():
                    t.param.copy_(updated[name])
    finally:
        with torch.no_grad():
            for name, t in targets.items():
                t.param.copy_(originals[name])
    assert masks is not None
    info = {"num_batches": seen, "rounds": rounds, "lambda": C.LAMBDA, "block_size": C.BLOCK_SIZE}
    return masks, updated, info


def _round_batches(
    calibration: Iterable[Batch], num_batches: int | None, shard: tuple[int, int] | None, rounds: int, method: str
) -> Iterator[tuple[int, Iterator[tuple[int, int, Batch]]]]:
    """Per round: (its number of batches, this process's (row in the round, batch index, batch)).

    The calibration batches (the first `num_batches`) are split over the rounds, each round taking
    the next slice, so every batch is used once; with fewer batches than rounds they are reused so
    that each round has one. Data without a length (a generator, a DataLoader over an
    IterableDataset) is counted first: a one-shot iterator is kept in a list, any other iterable is
    walked once more. A DistributedSampler loader is this rank's share: its rows interleave the ranks.
    Each round's batches must be consumed before the next round is asked for.
    """
    rank, world = shard if shard is not None else (0, 1)
    spread, offset = 1, 0
    presharded = distributed_sampler_shard(calibration)
    if presharded is not None:  # already this rank's share: its batch i is global batch i * world + rank
        offset, spread = presharded
        if num_batches is not None:
            num_batches = max(0, -(-(num_batches - offset) // spread))
        rank, world = 0, 1
    source = _replayable(calibration, num_batches)
    total = _count_batches(source, num_batches)
    if total == 0:
        raise ValueError(f"method {method!r}: the calibration data yielded no batches (empty loader?)")
    stream = enumerate(_cycle(source, total))
    start = 0
    for size in _round_sizes(total, rounds):
        chunk = itertools.islice(stream, size)
        yield size * spread, _rows(chunk, start, spread, offset, rank, world)
        start += size


def _rows(chunk: Iterable[tuple[int, Batch]], start: int, spread: int, offset: int, rank: int, world: int
          ) -> Iterator[tuple[int, int, Batch]]:
    return (((i - start) * spread + offset, i, b) for i, b in chunk if i % world == rank)


def _replayable(calibration: Iterable[Batch], num_batches: int | None) -> Iterable[Batch]:
    """An iterable that can be walked again: a one-shot iterator (generator) becomes a list of its first batches."""
    if isinstance(calibration, Iterator):
        return list(itertools.islice(calibration, num_batches))
    return calibration


def _count_batches(calibration: Iterable[Batch], num_batches: int | None) -> int:
    """How many batches will be used: its length (at most `num_batches`), or one counting pass without one."""
    try:
        total = len(calibration)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in itertools.islice(calibration, num_batches))
    return total if num_batches is None else min(total, num_batches)


def _round_sizes(total: int, rounds: int) -> list[int]:
    """Batches per round: `total` split as evenly as possible, at least one each."""
    return [max(1, (t + 1) * total // rounds - t * total // rounds) for t in range(rounds)]


def _cycle(calibration: Iterable[Batch], total: int) -> Iterator[Batch]:
    """The first `total` batches again and again; stops if a pass yields none."""
    while True:
        empty = True
        for batch in itertools.islice(calibration, total):
            empty = False
            yield batch
        if empty:
            return
