"""The method registry: each pruning method's score function, what it needs and its own allocation.

A method is registered once, with a decorator on its score function (see `scores.py`):

    @register_method("omp", needs=None, allocation="global", description="...")
    def magnitude_scores(weight): ...

`needs` says what `prune()` must collect and hand to the score function as its second argument:
`"activations"` (the L2 norm of each input feature over the calibration tokens), `"gradients"`
(the loss gradient summed over the calibration batches), `"generator"` (a seeded
`torch.Generator`) or None (the weight alone). `iterative` methods (IterSNIP) repeat
collection and scoring over rounds. Registering a name twice is an error.

Methods that also change the kept weights (`updates_weights`: SparseGPT, CHITA) register their
solver rather than a score: `"hessians"` (SparseGPT, `sparsegpt.py`: X^T X of each layer's
calibration inputs) or `"gradient_rows"` (CHITA, `chita.py`: one loss gradient per calibration
batch). `prune()` hands them to their own driver, which returns masks and the updated weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

NEEDS = (None, "activations", "gradients", "generator", "hessians", "gradient_rows")


@dataclass(frozen=True)
class Method:
    """One registered pruning method."""

    name: str
    score: Callable[..., Tensor]  # score(weight) or score(weight, statistic) -> fp32 tensor of weight's shape
    needs: str | None
    allocation: str
    description: str
    iterative: bool = False
    updates_weights: bool = False  # its result carries new values for the kept weights

    @property
    def data_driven(self) -> bool:
        """Needs calibration batches (activations, gradients or Hessians)."""
        return self.needs in ("activations", "gradients", "hessians", "gradient_rows")

    def scores(self, weight: Tensor, statistic: Any = None) -> Tensor:
        """This method's scores for one weight matrix (higher = kept)."""
        return self.score(weight) if self.needs is None else self.score(weight, statistic)


METHODS: dict[str, Method] = {}


def register_method(
    name: str, *, needs: str | None, allocation: str, description: str, iterative: bool = False,
    updates_weights: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator registering `fn` as the score function of method `name`; a second registration is an error."""
    from .allocation import ALLOCATIONS

    if needs not in NEEDS:
        raise ValueError(f"method {name!r}: needs must be one of {NEEDS}, got {needs!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"method {name!r}: unknown allocation {allocation!r}; expected one of {list(ALLOCATIONS)}")

    def decorate(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in METHODS:
            raise ValueError(f"pruning method {name!r} is already registered (by {METHODS[name].score.__qualname__})")
        METHODS[name] = Method(name, fn, needs, allocation, description, iterative, updates_weights)
        return fn

    return decorate


def get_method(name: str) -> Method:
    """The registered method `name`; an unknown name is an error listing the known ones."""
    from . import chita, scores, sparsegpt  # noqa: F401  (register the built-in methods)

    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]
