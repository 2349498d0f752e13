"""`PruningConfig`: the settings of one pruning run, declared and validated once.

`prune()`, `MultiFlowCallback` and the recipes' `pruning:` section all take these fields (the
callback and the recipes add where masks come from and where they go). Only plain values live
here, so a config prints, serialises and parses (jsonargparse reads dataclasses, so
`--print_config` shows every field); the calibration data and the functions that run the model
are arguments of `prune()` itself.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Union

import torch
from torch import Tensor

from .allocation import ALLOCATIONS, parse_pattern
from .methods import Method, get_method
from .targets import SHARED_WEIGHT_INPUTS

# None (the model's `pruning_preset`, else one group), a preset name, a mapping group -> regex;
# in Python also a callable name -> group
Modalities = Union[None, str, dict[str, str]]


@dataclass
class PruningConfig:
    """What to prune and how; validated when built (`ValueError` naming the field and the value).

    Args:
        sparsity: fraction of the prunable weights to remove, in [0, 1) (any real number, numpy
            scalar or one-element tensor); None only where masks come from elsewhere.
        method: a registered method: multiflow (default), omp, lamp, random, wanda, snip, itersnip,
            sparsegpt, chita, chita++ (the last three also update the kept weights).
        allocation: None (the method's own), modality, magnitude, global, layer or row.
        invert: keep the lowest scores (the sanity-check ablation).
        modalities: None (the model's `pruning_preset`, else one group), a preset name, a mapping
            group -> regex, or (Python only) a callable name -> group.
        exclude: regexes of parameter names that stay dense (any name of a shared parameter).
        image_groups: groups whose inputs are image tokens, never PAD-filtered (None: the preset's;
            a mapping declares none unless listed here).
        prune_tied_embeddings: also prune Linear weights tied to an nn.Embedding (dense by default).
        shared_weight_inputs: whose inputs feed the statistic of a weight that several distinct
            modules apply (tied layers): "first_module" (default; the module under the weight's
            first name, as MULTIFLOW's reference code) or "every_module".
        num_batches: use only the first N calibration batches (None: all).
        seed: seed of the random baseline.
        rounds: IterSNIP rounds.
        pattern: an N:M pattern such as "2:4" or "4:8": in every row, each run of M consecutive
            input weights keeps its N highest scores (any method); the sparsity is then 1 - N/M
            (None: derived; another value is an error) and `allocation` does not apply.
        dense_if_incompatible: with `pattern`, keep layers whose input width is not a multiple of M
            dense instead of stopping with an error naming them.
        allow_degenerate: accept degenerate scores (a layer whose scores are all equal, or ties that
            push the realised sparsity more than one point over the target) instead of an error
            naming the layers; e.g. a model whose zeros are meant to stay pruned.
    """

    sparsity: float | None = None
    method: str = "multiflow"
    allocation: str | None = None
    invert: bool = False
    modalities: Modalities = None
    exclude: tuple[str, ...] = ()
    image_groups: tuple[str, ...] | None = None
    prune_tied_embeddings: bool = False
    shared_weight_inputs: str = "first_module"
    num_batches: int | None = None
    seed: int = 0
    rounds: int = 10
    pattern: str | None = None
    dense_if_incompatible: bool = False
    allow_degenerate: bool = False

    def __post_init__(self) -> None:
        if self.sparsity is not None:
            self.sparsity = check_sparsity(self.sparsity)
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            self.pattern = f"{n}:{m}"
            implied = 1.0 - n / m
            if self.sparsity is None:
                self.sparsity = implied
            elif abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"pattern {self.pattern!r} prunes exactly {implied:g} of each layer, but sparsity={self.sparsity}; "
                    "leave sparsity unset with a pattern"
                )
        check_method(self.method, self.allocation)
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.exclude = tuple(self.exclude)
        if self.image_groups is not None:
            self.image_groups = (self.image_groups,) if isinstance(self.image_groups, str) else tuple(self.image_groups)
        if self.shared_weight_inputs not in SHARED_WEIGHT_INPUTS:
            raise ValueError(
                f"shared_weight_inputs must be one of {SHARED_WEIGHT_INPUTS}, got {self.shared_weight_inputs!r}"
            )
        if self.num_batches is not None:
            self.num_batches = _count("num_batches", self.num_batches)
        self.rounds = _count("rounds", self.rounds)

    @classmethod
    def build(cls, config: "PruningConfig | None" = None, **settings: Any) -> "PruningConfig":
        """`config` with `settings` changed (a new, validated config); an unknown setting is an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"unknown pruning setting(s) {unknown}; PruningConfig fields: {sorted(known)}")
        return replace(config, **settings) if config is not None else cls(**settings)

    @property
    def spec(self) -> Method:
        """The registered method."""
        return get_method(self.method)

    @property
    def effective_allocation(self) -> str:
        """The allocation rule this run uses: the given one, else the method's own."""
        return self.allocation or self.spec.allocation

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (for reports and metadata)."""
        values = asdict(self)
        if callable(self.modalities):
            values["modalities"] = getattr(self.modalities, "__qualname__", repr(self.modalities))
        return values


def check_sparsity(sparsity: Any) -> float:
    """Sparsity as a float in [0, 1).

    Any real number is accepted (int, float, numpy scalar, fractions.Fraction), and so is a tensor
    or numpy array holding one non-bool real number (a 0-dim tensor from a config or a sweep).
    Bools, NaN/inf, strings and values outside [0, 1) are refused, the value in the message.
    """
    value = _real_number(sparsity)
    if value is None or not math.isfinite(value):
        raise ValueError(f"sparsity must be a real number in [0, 1), got {sparsity!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return value


def check_method(method: str, allocation: str | None) -> tuple[Method, str]:
    """The method's registry entry and the effective allocation (the method's own when None)."""
    spec = get_method(method)
    allocation = allocation or spec.allocation
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; expected one of {list(ALLOCATIONS)}")
    return spec, allocation


def _count(name: str, value: Any) -> int:
    """`value` as an int >= 1: an integral number (int, numpy integer, a float like 2.0), never a bool or a string."""
    number = _real_number(value)
    if number is None or not math.isfinite(number) or number != int(number) or number < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(number)


def _real_number(value: Any) -> float | None:
    """`value` as a float when it is one real number (not a bool), else None."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            return None
        value = value.item()
    elif type(value).__module__ == "numpy" and hasattr(value, "dtype"):  # numpy scalar or array
        if value.size != 1 or value.dtype.kind not in "iuf":
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)
