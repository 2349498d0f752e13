"""Calibration statistics collected with forward hooks (activations) or backward (gradients).

Everything here works on plain torch modules and iterables of batches. Multi-process runs pass
`shard=(rank, world_size)` so each process sees its share of the batches, and `reduce` (an in-place
sum over processes) so every process ends with the statistics of all batches.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from .targets import Target

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], Any]
TokenMaskFn = Callable[[Batch], "Tensor | None"]
ReduceFn = Callable[[Tensor], Tensor]


@dataclass
class CalibrationStats:
    """Per-layer sums over all calibration tokens, plus what was seen (for the report)."""

    sums: dict[str, Tensor]  # name -> fp64 vector (in_features) or fp32 matrix (gradients)
    num_batches: int
    num_samples: int
    calls: dict[str, int]  # how many hook calls each layer received (0 = never ran)


def default_forward(model: nn.Module, batch: Batch) -> Any:
    """`model(**batch)` for a mapping, else `model(batch)`."""
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


def default_token_mask(batch: Batch) -> Tensor | None:
    """`batch["attention_mask"]` when the batch is a mapping that has it."""
    if isinstance(batch, Mapping) and "attention_mask" in batch:
        return batch["attention_mask"]
    return None


def move_to_device(batch: Batch, device: torch.device) -> Batch:
    """Tensors in (nested) mappings, lists and tuples moved to `device`; the rest unchanged."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: move_to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)
        except TypeError:  # a mapping type that cannot be built from a dict
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def iterate_shard(
    calibration: Iterable[Batch], num_batches: int | None, shard: tuple[int, int] | None
) -> Iterator[tuple[int, Batch]]:
    """Yield (global batch index, batch) for this process's share: batch i goes to rank i % world.

    A DataLoader over a map-style dataset is re-built on this rank's index batches, so a process
    loads only its own data; any other iterable is walked and the other ranks' batches skipped.
    """
    rank, world = shard if shard is not None else (0, 1)
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
    if (
        world > 1
        and isinstance(calibration, DataLoader)
        and not isinstance(calibration.dataset, IterableDataset)
        and calibration.batch_sampler is not None
    ):
        index_batches = list(itertools.islice(calibration.batch_sampler, num_batches))
        mine = index_batches[rank::world]
        loader = DataLoader(
            calibration.dataset,
            batch_sampler=mine,
            collate_fn=calibration.collate_fn,
            num_workers=calibration.num_workers,
            pin_memory=calibration.pin_memory,
            worker_init_fn=calibration.worker_init_fn,
            multiprocessing_context=calibration.multiprocessing_context,
            timeout=calibration.timeout,
        )
        yield from zip(range(rank, len(index_batches), world), loader)
        return
    for index, batch in enumerate(itertools.islice(calibration, num_batches)):
        if index % world == rank:
            yield index, batch


def expected_batches(calibration: Iterable[Batch], num_batches: int | None) -> int | None:
    """Number of batches for the progress bar, when the iterable knows its length."""
    try:
        total = len(calibration)  # type: ignore[arg-type]
    except TypeError:
        return num_batches
    return total if num_batches is None else min(total, num_batches)


def _batch_size(batch: Batch) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, (Tensor, Mapping, list, tuple)):
                size = _batch_size(item)
                if size:
                    return size
    return 0


def _reduce_all(tensors: list[Tensor], reduce: ReduceFn | None) -> list[Tensor]:
    """Sum-reduce many tensors with one collective call (flattened into one buffer per dtype)."""
    if reduce is None or not tensors:
        return tensors
    out: list[Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for indices in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        flat = reduce(flat)
        offset = 0
        for i in indices:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].view_as(tensors[i])
            offset += n
    return out  # type: ignore[return-value]


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def collect_input_norms(
    model: nn.Module,
    targets: Mapping[str, Target],
    calibration: Iterable[Batch],
    *,
    forward: ForwardFn = default_forward,
    token_mask: TokenMaskFn = default_token_mask,
    num_batches: int | None = None,
    shard: tuple[int, int] | None = None,
    reduce: ReduceFn | None = None,
    transfer: Callable[[Batch], Batch] | None = None,
    progress: bool = False,
) -> CalibrationStats:
    """Sum over calibration tokens of each prunable layer's squared input, per input feature.

    The model runs in eval mode without gradients (its mode is restored after); inputs are
    squared in fp32 and summed in fp64 whatever the compute dtype. Padding tokens (token mask 0)
    are left out for layers with `filter_tokens` whose input starts with the mask's (B, L) dims.
    """
    device = next(iter(targets.values())).param.device
    acc_dtype = _accumulator_dtype(device)
    sums = {n: torch.zeros(t.param.shape[1], dtype=acc_dtype, device=device) for n, t in targets.items()}
    calls = {n: 0 for n in targets}
    state: dict[str, Tensor | None] = {"mask": None}
    # Layers reading the same input (query/key/value projections) share one reduction: the last
    # input seen is kept (which also stops its memory from being reused) with its version counter,
    # so an in-place change between two calls is never mistaken for the same values.
    last: dict[bool, tuple[Tensor, int, Tensor] | None] = {True: None, False: None}

    def squared_sums(x: Tensor, filtered: bool) -> Tensor:
        cached = last[filtered]
        if cached is not None and cached[0] is x and cached[1] == x._version:
            return cached[2]
        features = x[state["mask"]] if filtered else x
        features = features.reshape(-1, x.shape[-1]).float()  # squared in fp32 whatever the compute dtype
        result = features.square().sum(0)  # much faster on CPU than vector_norm(dim=0)
        last[filtered] = (x, x._version, result)
        return result

    def make_hook(name: str, filter_tokens: bool):
        acc = sums[name]

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            mask = state["mask"]
            filtered = filter_tokens and mask is not None and x.dim() >= 3 and x.shape[:2] == mask.shape
            acc.add_(squared_sums(x, filtered))
            calls[name] += 1

        return hook

    handles = [
        module.register_forward_pre_hook(make_hook(name, target.filter_tokens))
        for name, target in targets.items()
        for module in target.modules
    ]
    transfer = transfer or (lambda b: move_to_device(b, device))
    seen_batches = seen_samples = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _progress_bar(calibration, num_batches, progress, "calibration") as bar:
            for index, batch in iterate_shard(calibration, num_batches, shard):
                batch = transfer(batch)
                mask = token_mask(batch)
                state["mask"] = None if mask is None else mask.to(device=device).bool()
                forward(model, batch)
                last[True] = last[False] = None  # release the batch's activations
                _check_finite(sums, index)
                seen_batches += 1
                seen_samples += _batch_size(batch)
                bar.update(shard[1] if shard else 1)
    finally:
        for handle in handles:
            handle.remove()
        state["mask"] = None
        last[True] = last[False] = None
        model.train(was_training)
    names = list(sums)
    counts = torch.tensor([seen_batches, seen_samples, *calls.values()], dtype=torch.float64, device=device)
    reduced = _reduce_all([*sums.values(), counts], reduce)
    counts = [int(c) for c in reduced[-1].tolist()]
    return CalibrationStats(
        sums=dict(zip(names, reduced[:-1])),
        num_batches=counts[0],
        num_samples=counts[1],
        calls=dict(zip(names, counts[2:])),
    )


def collect_gradients(
    model: nn.Module,
    targets: Mapping[str, Target],
    calibration: Iterable[Batch],
    loss: Callable[[nn.Module, Batch], Tensor],
    *,
    num_batches: int | None = None,
    shard: tuple[int, int] | None = None,
    reduce: ReduceFn | None = None,
    transfer: Callable[[Batch], Batch] | None = None,
    progress: bool = False,
    batches: Iterator[tuple[int, Batch]] | None = None,
) -> CalibrationStats:
    """Sum over calibration batches of d loss / d W for every prunable weight (for SNIP).

    Gradients land in fp32 buffers, not in `.grad`; the model's `.grad`, `requires_grad` flags and
    train/eval mode are restored afterwards.
    """
    device = next(iter(targets.values())).param.device
    params = {n: t.param for n, t in targets.items()}
    sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in params.items()}
    calls = {n: 0 for n in targets}
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    transfer = transfer or (lambda b: move_to_device(b, device))
    seen_batches = seen_samples = 0
    was_training = model.training
    model.eval()
    iterator = batches if batches is not None else iterate_shard(calibration, num_batches, shard)
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad(), _progress_bar(calibration, num_batches, progress, "gradients") as bar:
            for index, batch in iterator:
                batch = transfer(batch)
                value = loss(model, batch)
                if not isinstance(value, Tensor) or value.dim() != 0:
                    raise TypeError(f"loss(model, batch) must return a scalar tensor, got {value!r:.80}")
                if not torch.isfinite(value):
                    raise FloatingPointError(f"calibration batch {index}: the loss is {value.item()}")
                grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
                for (name, acc), grad in zip(sums.items(), grads):
                    if grad is not None:
                        acc.add_(grad.float())
                        calls[name] += 1
                seen_batches += 1
                seen_samples += _batch_size(batch)
                bar.update(shard[1] if shard else 1)
    finally:
        for n, p in params.items():
            p.requires_grad_(saved_flags[n])
        model.train(was_training)
    names = list(sums)
    counts = torch.tensor([seen_batches, seen_samples, *calls.values()], dtype=torch.float32, device=device)
    reduced = _reduce_all([*sums.values(), counts], reduce)
    counts = [int(c) for c in reduced[-1].tolist()]
    return CalibrationStats(dict(zip(names, reduced[:-1])), counts[0], counts[1], dict(zip(names, counts[2:])))


def _check_finite(sums: Mapping[str, Tensor], index: int) -> None:
    total = torch.stack([s.sum() for s in sums.values()]).sum()
    if math.isfinite(total.item()):
        return
    bad = [name for name, s in sums.items() if not torch.isfinite(s).all()]
    raise FloatingPointError(
        f"non-finite activations during calibration (batch {index}) at the input of "
        f"{len(bad)} layer(s), first: {bad[:3]}; check the data and the model's precision"
    )


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress_bar(calibration: Iterable[Batch], num_batches: int | None, enabled: bool, desc: str):
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=expected_batches(calibration, num_batches), desc=desc, unit="batch", dynamic_ncols=True)
