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
