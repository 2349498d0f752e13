"""Calibration batches: how they are sharded over processes, moved, described and run.

Pure torch. `iterate_shard` gives each process its share (batch i to rank i % world; a map-style
DataLoader is rebuilt on this rank's index batches; a DistributedSampler loader is already a
share), `_call` runs a user function on a batch and re-raises its errors as `CalibrationError`
naming the batch, and the tensor walkers move batches or clone inference tensors.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], Any]
TokenMaskFn = Callable[[Batch], "Tensor | None"]
ReduceFn = Callable[[Tensor], Tensor]


# Errors that keep their type when a user function raises them during calibration: an
# interrupt, and running out of memory (callers catch that one by type to retry smaller).
_NOT_WRAPPED: tuple[type[BaseException], ...] = (
    MemoryError,
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
)


class CalibrationError(RuntimeError):
    """A user function (forward, loss, token mask) raised during calibration.

    The message names the global batch index, the function and the batch's contents; the
    original exception is the `__cause__`.
    """


def default_forward(model: nn.Module, batch: Batch) -> Any:
    """`model(**batch)` for a mapping, else `model(batch)`."""
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


def describe_function(fn: Callable[..., Any], batch: Batch = None) -> str:
    """How an error message names a calibration function: its `__qualname__`, else its repr.

    `default_forward` describes the call it makes on this batch (`model(**batch)` / `model(batch)`);
    a wrapper can set its own `__qualname__` (e.g. `pl_module.calibration_step(batch)`).
    """
    if fn is default_forward:
        return "model(**batch)" if isinstance(batch, Mapping) else "model(batch)"
    return getattr(fn, "__qualname__", None) or repr(fn)


def describe_batch(batch: Batch, limit: int = 8) -> str:
    """A short summary of a batch for error messages: keys or items with their types and shapes."""
    if isinstance(batch, Mapping):
        items = [f"{key!r}: {_describe_value(value)}" for key, value in itertools.islice(batch.items(), limit)]
        more = ", ..." if len(batch) > limit else ""
        return f"{type(batch).__name__} {{{', '.join(items)}{more}}}"
    if isinstance(batch, (list, tuple)):
        items = [_describe_value(value) for value in batch[:limit]]
        more = ", ..." if len(batch) > limit else ""
        return f"{type(batch).__name__} of {len(batch)} ({', '.join(items)}{more})"
    return _describe_value(batch)


def _describe_value(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[{len(value)}]"
    if isinstance(value, Mapping):
        keys = list(itertools.islice(value, 4))
        return f"{type(value).__name__} with keys {keys}{'...' if len(value) > 4 else ''}"
    if isinstance(value, str):
        return f"str {value[:20]!r}"
    return type(value).__name__


def _call(what: str, label: str, index: int, batch: Batch, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, its exceptions re-raised as CalibrationError naming the batch and `label`."""
    try:
        return fn(*args)
    except (CalibrationError, *_NOT_WRAPPED):
        raise
    except Exception as err:
        raise CalibrationError(
            f"during calibration, batch {index}: {what} `{label}` raised {type(err).__name__}: {err} "
            f"(batch: {describe_batch(batch)})"
        ) from err


def default_token_mask(batch: Batch) -> Tensor | None:
    """`batch["attention_mask"]` when the batch is a mapping that has it."""
    if isinstance(batch, Mapping) and "attention_mask" in batch:
        return batch["attention_mask"]
    return None


def map_tensors(batch: Batch, fn: Callable[[Tensor], Tensor]) -> Batch:
    """`fn` applied to every tensor in (nested) mappings, lists, tuples and namedtuples; the rest unchanged."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        mapped = {k: map_tensors(v, fn) for k, v in batch.items()}
        try:
            return type(batch)(mapped)
        except TypeError:  # a mapping type that cannot be built from a dict
            return mapped
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def move_to_device(batch: Batch, device: torch.device) -> Batch:
    """Tensors in (nested) mappings, lists and tuples moved to `device`; the rest unchanged."""
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def clone_inference_tensors(batch: Batch) -> Batch:
    """The batch with inference tensors (made under inference_mode) cloned into ordinary ones.

    Autograd cannot save inference tensors and they carry no version counter. A batch holding
    none is returned as is (same object and container types).
    """
    if not _holds_inference_tensor(batch):
        return batch
    return map_tensors(batch, lambda t: t.clone() if t.is_inference() else t)


def distributed_sampler_shard(calibration: Iterable[Batch]) -> tuple[int, int] | None:
    """(rank, num_replicas) of the DistributedSampler a DataLoader draws from, else None.

    The sampler may be the loader's `sampler` or sit inside its `batch_sampler`; such a loader
    already yields this rank's share only.
    """
    if not isinstance(calibration, DataLoader):
        return None
    for sampler in (calibration.sampler, getattr(calibration.batch_sampler, "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            return int(sampler.rank), int(sampler.num_replicas)
    return None


def iterate_shard(
    calibration: Iterable[Batch], num_batches: int | None, shard: tuple[int, int] | None, *, lockstep: bool = False
) -> Iterator[tuple[int | None, Batch]]:
    """Yield (global batch index, batch) for this process's share: batch i goes to rank i % world.

    A DataLoader over a map-style dataset is re-built on this rank's index batches, so a process
    loads only its own data; any other iterable is walked and the other ranks' batches skipped.
    A DataLoader drawing from a DistributedSampler is already this rank's share: it is iterated as
    is, its i-th batch being global batch `i * world + rank`. `num_batches` caps the global count.

    `lockstep=True` (sharded parameters, whose forward is itself a collective) makes every rank run
    the same number of forwards: a rank whose share is one short gets one more batch with index
    None, to run without counting it.
    """
    rank, world = shard if shard is not None else (0, 1)
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
    presharded = distributed_sampler_shard(calibration)
    if presharded is not None:
        yield from _iterate_presharded(calibration, num_batches, shard, presharded, lockstep)
        return
    if (
        world > 1
        and isinstance(calibration, DataLoader)
        and not isinstance(calibration.dataset, IterableDataset)
        and calibration.batch_sampler is not None
    ):
        index_batches = list(itertools.islice(calibration.batch_sampler, num_batches))
        mine = index_batches[rank::world]
        indices: list[int | None] = list(range(rank, len(index_batches), world))
        if lockstep and index_batches and len(mine) < -(-len(index_batches) // world):
            mine.append(index_batches[-1])  # a forward to keep pace with the other ranks, not counted
            indices.append(None)
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
        yield from zip(indices, loader)
        return
    count, last = 0, None
    for index, batch in enumerate(itertools.islice(calibration, num_batches)):
        count, last = index + 1, batch
        if index % world == rank:
            yield index, batch
    if lockstep and count and count % world and count % world <= rank:
        yield None, last  # the last group of batches had none for this rank: keep pace, not counted


def _iterate_presharded(
    loader: Iterable[Batch],
    num_batches: int | None,
    shard: tuple[int, int] | None,
    presharded: tuple[int, int],
    lockstep: bool = False,
) -> Iterator[tuple[int | None, Batch]]:
    """The batches of a loader over a DistributedSampler, numbered globally (`i * world + rank`)."""
    rank, world = presharded
    if shard is not None and tuple(shard) != presharded:
        raise ValueError(
            f"the calibration DataLoader's DistributedSampler is rank {rank} of {world}, but this process "
            f"calibrates as shard {tuple(shard)} (rank, world); build the sampler for this process or drop it"
        )
    for i, batch in enumerate(loader):
        index = i * world + rank
        if num_batches is not None and index >= num_batches:
            if lockstep and i * world < num_batches:  # a lower rank still has this batch: keep pace
                yield None, batch
            return
        yield index, batch


def expected_batches(calibration: Iterable[Batch], num_batches: int | None) -> int | None:
    """Number of batches for the progress bar (over all processes), when the iterable knows its length."""
    try:
        total = len(calibration)  # type: ignore[arg-type]
    except TypeError:
        return num_batches
    presharded = distributed_sampler_shard(calibration)
    if presharded is not None:
        total *= presharded[1]  # the loader holds one rank's share
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


def _holds_inference_tensor(batch: Batch) -> bool:
    if isinstance(batch, Tensor):
        return batch.is_inference()
    if isinstance(batch, Mapping):
        return any(_holds_inference_tensor(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return any(_holds_inference_tensor(v) for v in batch)
    return False


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
