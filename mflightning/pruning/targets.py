"""Which weights are prunable and which modality group each belongs to."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from torch import nn

from .presets import DEFAULT_UNFILTERED, GroupMap, get_preset

SINGLE_GROUP = "all"


@dataclass
class Target:
    """One prunable weight: its parameter name, the modules that use it and its group."""

    name: str
    param: nn.Parameter
    modules: list[nn.Linear]
    group: str
    filter_tokens: bool  # drop padding tokens from its input statistics


@dataclass(frozen=True)
class GroupSpec:
    """Resolved `modalities` argument: how to assign groups, what to leave dense."""

    assign: Callable[[str], str | None]
    exclude: tuple[str, ...]
    unfiltered: tuple[str, ...]
    description: str


def resolve_modalities(model: nn.Module, modalities: GroupMap, exclude: Iterable[str] = ()) -> GroupSpec:
    """Turn None / preset name / regex map / callable into one group-assignment function."""
    exclude = tuple(exclude)
    for pattern in exclude:
        _compile(pattern, "exclude")
    if modalities is None:
        preset_name = getattr(model, "pruning_preset", None)
        if preset_name is None:
            return GroupSpec(lambda name: SINGLE_GROUP, exclude, DEFAULT_UNFILTERED, "one group")
        modalities = preset_name
    if isinstance(modalities, str):
        preset = get_preset(modalities)
        return GroupSpec(
            _regex_assigner(preset.groups, f"preset {preset.name!r}"),
            preset.exclude + exclude,
            preset.unfiltered,
            f"preset {preset.name!r}",
        )
    if isinstance(modalities, Mapping):
        if not modalities:
            raise ValueError("modalities: the group map is empty")
        return GroupSpec(_regex_assigner(modalities, "modalities"), exclude, DEFAULT_UNFILTERED, "regex map")
    if callable(modalities):
        return GroupSpec(modalities, exclude, DEFAULT_UNFILTERED, "callable")
    raise TypeError(
        f"modalities must be None, a preset name, a mapping group -> regex or a callable, got {type(modalities)!r}"
    )


def find_targets(model: nn.Module, spec: GroupSpec) -> dict[str, Target]:
    """All nn.Linear weights not excluded, keyed by their name in `model.named_parameters()`.

    A weight shared by several Linear modules (tied layers) is one target with all its modules, so
    its statistics accumulate every call. Raises if a layer gets no group.
    """
    canonical = {id(p): name for name, p in model.named_parameters()}
    targets: dict[str, Target] = {}
    seen_modules: set[int] = set()
    for _, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, nn.Linear) or id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        weight = module.weight
        name = canonical.get(id(weight))
        if name is None:
            continue
        if any(re.search(p, name) for p in spec.exclude):
            continue
        if name in targets:
            targets[name].modules.append(module)
            continue
        group = spec.assign(name)
        if group is None:
            raise ValueError(
                f"prunable layer {name!r} {tuple(weight.shape)} matches no modality group "
                f"({spec.description}); add it to a group or to `exclude`"
            )
        filter_tokens = group != "vision" and not any(re.search(p, name) for p in spec.unfiltered)
        targets[name] = Target(name, weight, [module], str(group), filter_tokens)
    if not targets:
        raise ValueError("the model has no prunable nn.Linear weights (after `exclude`)")
    return targets


def _regex_assigner(groups: Mapping[str, str], where: str) -> Callable[[str], str | None]:
    compiled = [(group, _compile(pattern, f"{where} group {group!r}")) for group, pattern in groups.items()]

    def assign(name: str) -> str | None:
        for group, regex in compiled:
            if regex.search(name):
                return group
        return None

    return assign


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{where}: invalid regex {pattern!r}: {err}") from err
