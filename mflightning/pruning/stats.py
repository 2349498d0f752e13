"""Calibration statistics collected with forward hooks (activations) or backward (gradients).

Everything here works on plain torch modules and iterables of batches (`batches.py`). Multi-process
runs pass `shard=(rank, world_size)` so each process sees its share of the batches, and `reduce`
(an in-place sum over processes) so every process ends with the statistics of all batches.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .attention import AttentionObserver, fastpath_disabled, seq_first_linears
from .batches import (  # noqa: F401  (the batch helpers are re-exported: callers import them from here)
    Batch,
    CalibrationError,
    ForwardFn,
    ReduceFn,
    TokenMaskFn,
    _batch_size,
    _call,
    _progress_bar,
    clone_inference_tensors,
    default_forward,
    default_token_mask,
    describe_batch,
    describe_function,
    distributed_sampler_shard,
    expected_batches,
    iterate_shard,
    map_tensors,
    move_to_device,
)
from .provenance import DEFER, TokenRoles, unknown_role_error
from .targets import Target
from .upkeep import is_dtensor


@dataclass
class CalibrationStats:
    """Per-layer sums over all calibration tokens, plus what was seen (for the report)."""

    sums: dict[str, Tensor]  # name -> fp64 vector (in_features) or fp32 matrix (gradients)
    num_batches: int
    num_samples: int
    calls: dict[str, int]  # how many hook calls each layer received (0 = never ran)


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

    def __init__(self, gram: bool = False) -> None:
        self.gram = gram  # X^T X of the kept tokens (SparseGPT's Hessian) instead of the squares' sums
        self.mask: Tensor | None = None  # the batch's (B, L) token mask, bool
        # one entry per way of reducing: unfiltered, filtered (B, L, ...), filtered (L, B, ...), filtered
        # (B*L, D): tokens flattened batch-major before the layer (OPT's fc1/fc2)
        self._last: list[tuple[Tensor, int, Tensor] | None] = [None, None, None, None]

    def slot(self, x: Tensor, filter_tokens: bool, seq_first: bool = False) -> int:
        """How x is reduced: 0 unfiltered, else the layout in which the token mask applies to it."""
        mask = self.mask
        if not filter_tokens or mask is None:
            return 0
        if x.dim() >= 3:
            if seq_first:
                return 2 if (x.shape[1], x.shape[0]) == mask.shape else 0
            return 1 if x.shape[:2] == mask.shape else 0
        if x.dim() == 2 and mask.dim() == 2 and mask.size(0) > 1:
            # B*L rows of a batch of B > 1 are tokens flattened batch-major; with B == 1 an (L, D) input
            # may as well be unbatched (nn.MultiheadAttention), and is left unfiltered
            return 3 if x.shape[0] == mask.numel() else 0
        return 0

    def __call__(self, x: Tensor, filter_tokens: bool, seq_first: bool = False) -> Tensor:
        """Sum over tokens of x**2 per feature; `seq_first`: x is (L, B, ...) rather than (B, L, ...)."""
        slot = self.slot(x, filter_tokens, seq_first)
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
        elif slot == 3:
            features = x[self.mask.reshape(-1)]
        else:
            features = x
        features = features.reshape(-1, x.shape[-1]).float()  # squared in fp32 whatever the compute dtype
        if self.gram:
            return features.T @ features
        return features.square().sum(0)  # much faster on CPU than vector_norm(dim=0)

    def clear(self) -> None:
        """Forget the batch: its mask and the inputs kept for sharing (their memory is released)."""
        self.mask = None
        self._last = [None, None, None, None]


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
    gram: bool = False,
) -> CalibrationStats:
    """Sum over calibration tokens of each prunable layer's squared input, per input feature.

    `gram=True` sums the outer products instead, X^T X (in x in, SparseGPT's Hessian), with the
    same token filtering, hooks and reduction.

    The model runs in eval mode without gradients (every submodule's mode is restored after);
    inputs are squared in fp32 and summed in fp64 whatever the compute dtype. Padding tokens
    (token mask 0) are left out for layers with `filter_tokens` whose input starts with the mask's
    (B, L) dims (for sequence-first inputs, (L, B); for tokens flattened batch-major, B*L rows); a
    layer no preset or `image_groups=` declares is filtered only where its input is traced to the
    text (`provenance.py`, on the first batch). nn.MultiheadAttention weights are observed
    through `attention.AttentionObserver`; torch's fused attention fast paths are off meanwhile.
    Works under `torch.inference_mode()` and on inference tensors; the sums are normal tensors.
    A user function that raises is re-raised as CalibrationError naming the batch.
    """
    device = next(iter(targets.values())).param.device
    acc_dtype = _accumulator_dtype(device)
    with torch.inference_mode(False):  # the sums must outlive an inference-mode caller
        sums = {n: torch.zeros((t.param.shape[1],) * (2 if gram else 1), dtype=acc_dtype, device=device)
                for n, t in targets.items()}
    calls = {n: 0 for n in targets}
    squared = _SquaredInputs(gram)
    seq_first = seq_first_linears(model)
    recording = [True]  # False during a lockstep forward, whose statistics are not counted
    # layers no declaration says text or image of: one probe forward traces where their inputs come from
    roles = TokenRoles(n for n, t in targets.items() if t.filter_tokens and t.infer_text_tokens)
    undecided: list[ValueError] = []  # a layer whose input may be text or image tokens
    deferred: list[tuple[str, tuple[int, ...], bool, Tensor, Tensor]] = []

    def filters(name: str, inputs: list[Tensor], seq_first_input: bool) -> list[Any]:
        """Per input of this call: leave padding out? Declared by the target, else traced (or an error)."""
        target = targets[name]
        if name not in roles.names:
            return [target.filter_tokens] * len(inputs)
        call = roles.observe(name, inputs) if roles.probing else roles.roles_of_call(name, len(inputs))
        for x, role in zip(inputs, call):
            if role is None and squared.slot(x, True, seq_first_input) and not undecided:
                # raised once the forward returns, so the user function's error wrapping does not hide it
                undecided.append(unknown_role_error(name, x.shape, squared.mask.shape, roles.reason_for(name)))  # type: ignore[union-attr]
        return call

    def record(name: str, inputs: list[Tensor], seq_first_input: bool) -> None:
        if not recording[0]:
            return
        acc = sums[name]
        call = filters(name, inputs, seq_first_input)
        with torch.no_grad():  # the probe forward runs with gradients on
            for x, role in zip(inputs, call):
                if role is DEFER:  # text or not is known when the probe forward ends: both sums kept till then
                    matched = bool(squared.slot(x, True, seq_first_input))
                    deferred.append((name, tuple(x.shape), matched, squared(x, True, seq_first_input), squared(x, False)))
                else:
                    acc.add_(squared(x, bool(role), seq_first_input))
        calls[name] += 1

    def make_hook(name: str, seq_first_input: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, Tensor):
                raise TypeError(f"prunable layer {name!r} was called without an input tensor (kwargs {sorted(kwargs)})")
            record(name, [x], seq_first_input)

        return hook

    def record_attention(name: str, inputs: Iterable[Tensor]) -> None:
        record(name, list(inputs), True)

    attention = AttentionObserver(record_attention)
    hooked: list[tuple[nn.Module, Any]] = []
    for name, target in targets.items():
        for module in target.modules:
            if isinstance(module, nn.MultiheadAttention):
                attention.add(module, name, target.param)
            else:
                hooked.append((module, make_hook(name, id(module) in seq_first)))
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
            roles.start_batch()
            if index is None:  # keeps pace with the other ranks' collectives; statistics not counted
                recording[0] = False
                try:
                    forward(model, batch)
                finally:
                    recording[0] = True
                continue
            mask = _call("the token mask", describe_function(token_mask), index, batch, token_mask, batch)
            squared.mask = None if mask is None else mask.to(device=device).bool()
            if not (roles.pending and squared.mask is not None and _traced_forward(
                roles, model, batch, forward, squared.mask, sums, calls, deferred, undecided,
            )):
                _call("the forward", describe_function(forward, batch), index, batch, forward, model, batch)
            squared.clear()  # release the batch's activations
            if undecided:
                raise undecided[0]
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


def _traced_forward(
    roles: TokenRoles, model: nn.Module, batch: Batch, forward: ForwardFn, mask: Tensor,
    sums: dict[str, Tensor], calls: dict[str, int], deferred: list, undecided: list[ValueError],
) -> bool:
    """The first batch's forward, tracing which layer inputs carry text tokens (`provenance.py`).

    Returns False when that forward raised (e.g. it cannot run with gradients on): its partial
    statistics are undone, every traced role is unknown, and the caller runs the batch as usual.
    """
    saved = ({name: s.clone() for name, s in sums.items()}, dict(calls))
    try:
        with roles.probe(model, batch, mask, frozen=lambda p: not is_dtensor(p)) as marked:
            forward(model, marked)
    except Exception as error:
        for name, s in saved[0].items():
            sums[name].copy_(s)
        calls.update(saved[1])
        deferred.clear()
        undecided.clear()
        roles.failed(error)
        return False
    for name, shape, matched, filtered, unfiltered in deferred:
        if roles.aligned_is_text:
            sums[name].add_(filtered)
        elif matched:
            undecided.append(unknown_role_error(name, shape, tuple(mask.shape), roles.reason_for(name)))
        else:
            sums[name].add_(unfiltered)
    deferred.clear()
    return True


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
