"""Calibration statistics collected with forward hooks (activations) or backward (gradients).

Everything here works on plain torch modules and iterables of batches. Multi-process runs pass
`shard=(rank, world_size)` so each process sees its share of the batches, and `reduce` (an in-place
sum over processes) so every process ends with the statistics of all batches.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from .attention import AttentionObserver, fastpath_disabled, seq_first_linears
from .targets import Target

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


class _SquaredInputs:
    """Per-feature sums of squared inputs over one batch's tokens, padding left out where asked.

    Layers reading the same input (query/key/value projections) share one reduction: the last
    input seen per filtering mode is kept (which also stops its memory from being reused) with its
    version counter, so an in-place change between two calls is never mistaken for the same
    values. Inference tensors have no version counter and are never shared.
    """

    def __init__(self) -> None:
        self.mask: Tensor | None = None  # the batch's (B, L) token mask, bool
        # one entry per way of reducing: unfiltered, filtered (B, L, ...), filtered (L, B, ...)
        self._last: list[tuple[Tensor, int, Tensor] | None] = [None, None, None]

    def __call__(self, x: Tensor, filter_tokens: bool, seq_first: bool = False) -> Tensor:
        """Sum over tokens of x**2 per feature; `seq_first`: x is (L, B, ...) rather than (B, L, ...)."""
        mask = self.mask
        slot = 0
        if filter_tokens and mask is not None and x.dim() >= 3:
            if seq_first:
                slot = 2 if (x.shape[1], x.shape[0]) == mask.shape else 0
            else:
                slot = 1 if x.shape[:2] == mask.shape else 0
        try:
            version = x._version
        except RuntimeError:  # an inference tensor has no version counter: never shared
            return self._reduce(x, slot)
        cached = self._last[slot]
        if cached is not None and cached[0] is x and cached[1] == version:
            return cached[2]
        result = self._reduce(x, slot)
        self._last[slot] = (x, version, result)
        return result

    def _reduce(self, x: Tensor, slot: int) -> Tensor:
        if slot == 1:
            features = x[self.mask]
        elif slot == 2:
            features = x.transpose(0, 1)[self.mask]
        else:
            features = x
        features = features.reshape(-1, x.shape[-1]).float()  # squared in fp32 whatever the compute dtype
        return features.square().sum(0)  # much faster on CPU than vector_norm(dim=0)

    def clear(self) -> None:
        """Forget the batch: its mask and the inputs kept for sharing (their memory is released)."""
        self.mask = None
        self._last = [None, None, None]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """`model.eval()` for the block; afterwards every submodule gets its own train/eval flag back.

    Restoring only the top-level flag would put, e.g., a frozen eval() teacher into train mode.
    """
    saved = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        model.train(saved[0][1])
        for module, training in saved:  # parents before children: a fix-up of a parent is refined below it
            if module.training != training:
                module.train(training)


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
    lockstep: bool = False,
) -> CalibrationStats:
    """Sum over calibration tokens of each prunable layer's squared input, per input feature.

    The model runs in eval mode without gradients (every submodule's mode is restored after);
    inputs are squared in fp32 and summed in fp64 whatever the compute dtype. Padding tokens
    (token mask 0) are left out for layers with `filter_tokens` whose input starts with the mask's
    (B, L) dims (for sequence-first inputs, (L, B)). nn.MultiheadAttention weights are observed
    through `attention.AttentionObserver`; torch's fused attention fast paths are off meanwhile.
    Works under `torch.inference_mode()` and on inference tensors; the sums are normal tensors.
    A user function that raises is re-raised as CalibrationError naming the batch.
    """
    device = next(iter(targets.values())).param.device
    acc_dtype = _accumulator_dtype(device)
    with torch.inference_mode(False):  # the sums must outlive an inference-mode caller
        sums = {n: torch.zeros(t.param.shape[1], dtype=acc_dtype, device=device) for n, t in targets.items()}
    calls = {n: 0 for n in targets}
    squared = _SquaredInputs()
    seq_first = seq_first_linears(model)
    recording = [True]  # False during a lockstep forward, whose statistics are not counted

    def make_hook(name: str, filter_tokens: bool, seq_first_input: bool):
        acc = sums[name]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not recording[0]:
                return
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, Tensor):
                raise TypeError(f"prunable layer {name!r} was called without an input tensor (kwargs {sorted(kwargs)})")
            acc.add_(squared(x, filter_tokens, seq_first_input))
            calls[name] += 1

        return hook

    def record_attention(name: str, inputs: Iterable[Tensor]) -> None:
        if not recording[0]:
            return
        acc, filter_tokens = sums[name], targets[name].filter_tokens
        for x in inputs:
            acc.add_(squared(x, filter_tokens, seq_first=True))
        calls[name] += 1

    attention = AttentionObserver(record_attention)
    hooked: list[tuple[nn.Module, Any]] = []
    for name, target in targets.items():
        for module in target.modules:
            if isinstance(module, nn.MultiheadAttention):
                attention.add(module, name, target.param)
            else:
                hooked.append((module, make_hook(name, target.filter_tokens, id(module) in seq_first)))
    transfer = transfer or (lambda b: move_to_device(b, device))
    seen_batches = seen_samples = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(_eval_mode(model))
        stack.callback(squared.clear)
        for module, hook in hooked:
            stack.callback(module.register_forward_pre_hook(hook, with_kwargs=True).remove)
        if attention:
            stack.enter_context(attention)
        if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
            stack.enter_context(fastpath_disabled())  # the fused paths skip the hooked modules
        stack.enter_context(torch.no_grad())
        bar = stack.enter_context(_progress_bar(calibration, num_batches, progress, "calibration"))
        for index, batch in iterate_shard(calibration, num_batches, shard, lockstep=lockstep):
            batch = transfer(batch)
            if index is None:  # keeps pace with the other ranks' collectives; statistics not counted
                recording[0] = False
                try:
                    forward(model, batch)
                finally:
                    recording[0] = True
                continue
            mask = _call("the token mask", describe_function(token_mask), index, batch, token_mask, batch)
            squared.mask = None if mask is None else mask.to(device=device).bool()
            _call("the forward", describe_function(forward, batch), index, batch, forward, model, batch)
            squared.clear()  # release the batch's activations
            _check_finite(sums, index)
            seen_batches += 1
            seen_samples += _batch_size(batch)
            bar.update(shard[1] if shard else 1)
    names = list(sums)
    with torch.inference_mode(False):
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
    every submodule's train/eval mode are restored afterwards. Inside `torch.inference_mode()` the
    gradients are taken with it switched off (batch tensors made there are cloned); parameters that
    are inference tensors cannot have gradients and are refused by name.
    """
    device = next(iter(targets.values())).param.device
    params = {n: t.param for n, t in targets.items()}
    frozen = [n for n, p in params.items() if p.is_inference()]
    if frozen:
        raise ValueError(
            f"gradient-based pruning needs parameters that can take gradients, but {len(frozen)} prunable "
            f"weight(s) are inference tensors (first: {frozen[:3]}), made under torch.inference_mode(); "
            "build or load the model outside it"
        )
    with torch.inference_mode(False):
        sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in params.items()}
    calls = {n: 0 for n in targets}
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    transfer = transfer or (lambda b: move_to_device(b, device))
    label = describe_function(loss)
    seen_batches = seen_samples = 0
    iterator = batches if batches is not None else iterate_shard(calibration, num_batches, shard)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(_eval_mode(model))
        stack.callback(_restore_requires_grad, params, saved_flags)
        for p in params.values():
            p.requires_grad_(True)
        stack.enter_context(torch.enable_grad())
        bar = stack.enter_context(_progress_bar(calibration, num_batches, progress, "gradients"))
        for index, batch in iterator:
            batch = clone_inference_tensors(transfer(batch))
            value = _call("the loss", label, index, batch, loss, model, batch)
            if not isinstance(value, Tensor) or value.dim() != 0:
                raise TypeError(f"loss(model, batch) must return a scalar tensor, got {value!r:.80}")
            if not torch.isfinite(value):
                raise FloatingPointError(f"calibration batch {index}: the loss is {value.item()}")
            inputs = list(params.values())
            grads = _call(
                "the backward pass of the loss", label, index, batch,
                lambda: torch.autograd.grad(value, inputs, allow_unused=True),
            )
            for (name, acc), grad in zip(sums.items(), grads):
                if grad is not None:
                    acc.add_(grad.float())
                    calls[name] += 1
            seen_batches += 1
            seen_samples += _batch_size(batch)
            bar.update(shard[1] if shard else 1)
    names = list(sums)
    with torch.inference_mode(False):
        counts = torch.tensor([seen_batches, seen_samples, *calls.values()], dtype=torch.float32, device=device)
        reduced = _reduce_all([*sums.values(), counts], reduce)
    counts = [int(c) for c in reduced[-1].tolist()]
    return CalibrationStats(dict(zip(names, reduced[:-1])), counts[0], counts[1], dict(zip(names, counts[2:])))


def _holds_inference_tensor(batch: Batch) -> bool:
    if isinstance(batch, Tensor):
        return batch.is_inference()
    if isinstance(batch, Mapping):
        return any(_holds_inference_tensor(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return any(_holds_inference_tensor(v) for v in batch)
    return False


def _restore_requires_grad(params: Mapping[str, Tensor], flags: Mapping[str, bool]) -> None:
    for name, p in params.items():
        p.requires_grad_(flags[name])


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
