"""Small helpers to collect evaluation outputs across processes (each sample counted once)."""
from __future__ import annotations

from typing import Any, Callable, Hashable, Iterable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world_size() -> int:
    """Number of processes in the default group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable, e.g. CPU tensors), in rank order, on every process."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_zero(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give its (picklable) result to every process."""
    if world_size() == 1:
        return fn()
    holder: list[Any] = [fn() if rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def dedupe(items: Iterable[T], key: Callable[[T], Hashable]) -> list[T]:
    """Keep the first item of each key, sorted by key (a padded sampler repeats samples)."""
    seen: dict[Hashable, T] = {}
    for item in items:
        seen.setdefault(key(item), item)
    return [seen[k] for k in sorted(seen)]


def to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu")


# ----------------------------------------------------------------------------- training-time gathers
def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Every process's ``n`` (e.g. its batch size), in rank order: ``[n]`` on one process."""
    return [size for (size,) in gather_shapes(n, device=device)]


def gather_shapes(*dims: int, device: torch.device | str = "cpu") -> list[tuple[int, ...]]:
    """Every process's ``dims`` (e.g. its batch size and sequence length), in rank order, in one collective."""
    if world_size() == 1:
        return [tuple(int(d) for d in dims)]
    mine = torch.tensor([int(d) for d in dims], dtype=torch.long, device=device)
    out = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(out, mine)
    return [tuple(int(v) for v in t.tolist()) for t in out]


def pad_length(tensor: torch.Tensor, length: int, value: float = 0) -> torch.Tensor:
    """``tensor`` padded along dim 1 to ``length`` with ``value`` (token tensors of ranks padded differently)."""
    missing = length - tensor.size(1)
    if missing <= 0:
        return tensor
    shape = (tensor.size(0), missing, *tensor.shape[2:])
    return torch.cat([tensor, tensor.new_full(shape, value)], dim=1)


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` along dim 0 (sizes may differ per rank) whose backward hands each process the sum,
    over every process, of the gradient with respect to its own rows."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank()
        longest = max(sizes)
        padded = tensor.contiguous()
        if tensor.size(0) < longest:
            padded = torch.cat([padded, padded.new_zeros((longest - tensor.size(0), *tensor.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()  # all_reduce writes in place: never into autograd's own buffer
        # every process's loss may read every process's rows: sum the gradients over processes
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Every process's ``tensor`` concatenated along dim 0 in rank order, on every process.

    Differentiable: the gradient reaching process ``r``'s rows from every process's loss flows back
    to process ``r`` (summed; DDP then averages parameter gradients over processes, so a loss that is a
    mean over the local rows trains like one process on the concatenated batch). ``sizes`` are the
    processes' dim-0 sizes (``gather_sizes``; None: gathered here, one more collective). On one
    process it is the identity (the tensor itself).
    """
    if world_size() == 1:
        return tensor
    if sizes is None:
        sizes = gather_sizes(tensor.size(0), tensor.device)
    if len(sizes) != world_size() or sizes[rank()] != tensor.size(0):
        raise ValueError(f"all_gather: sizes {sizes} do not fit {world_size()} processes with "
                         f"{tensor.size(0)} rows on rank {rank()}")
    return _GatherWithGrad.apply(tensor, list(sizes))


class _ScaleGrad(torch.autograd.Function):
    """The identity whose backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_grad(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor`` unchanged, its gradient multiplied by ``factor`` on the way back (itself when factor is 1).

    The XVLM authors' ITC (``models/xvlm/xvlm.py``): every process computes the loss of the whole global
    batch, and their ``AllGather``'s backward keeps only the gradient of its own rows, summing nothing
    over processes. That loss is the mean over processes of the per-process losses computed with
    ``all_gather`` (local rows against the gathered keys), so each process's features get 1/world of
    the exact gradient: ``scale_grad(features, 1 / world)`` before the ITC gives their gradients exactly
    (the temperature, read outside the gather, keeps its exact gradient in both).
    """
    return tensor if factor == 1 else _ScaleGrad.apply(tensor, float(factor))
