"""Modality presets: how a backbone's prunable layers split into groups.

A backbone registers a preset once (``register_preset("blip", ...)``) so that users can
write ``modalities="blip"``. A preset bundles the group map, the heads that stay dense,
the groups whose inputs are image tokens (``image_groups``) and the layers whose inputs
are image tokens outside those groups (``unfiltered``); the statistics of both are never
filtered by the text attention mask.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Union

GroupMap = Union[None, str, Mapping[str, str], Callable[[str], str]]

# Cross-attention key/value projections read image tokens, so text padding never applies.
DEFAULT_UNFILTERED: tuple[str, ...] = (
    r"crossattention\.self\.(key|value)\.weight$",
    r"cross_?attn\.(k|v|kv|key|value)(_proj)?\.weight$",
)


@dataclass(frozen=True)
class Preset:
    """A named modality map: groups (name -> regex on parameter names) and dense heads."""

    name: str
    groups: Mapping[str, str]
    exclude: tuple[str, ...] = ()
    unfiltered: tuple[str, ...] = DEFAULT_UNFILTERED
    description: str = ""
    # Optional mask inheritance: regex on a parameter name -> replacement naming the
    # parameter whose mask it takes (e.g. a decoder copy inheriting its encoder's mask).
    inherit: tuple[tuple[str, str], ...] = field(default=())
    # Groups whose layers read image tokens: their statistics are never PAD-filtered. Declared,
    # never guessed from a group's name.
    image_groups: tuple[str, ...] = ()


_PRESETS: dict[str, Preset] = {}
_LOADERS: list[Callable[[], None]] = []


def register_preset(
    name: str,
    groups: Mapping[str, str],
    exclude: tuple[str, ...] = (),
    unfiltered: tuple[str, ...] = DEFAULT_UNFILTERED,
    description: str = "",
    inherit: tuple[tuple[str, str], ...] = (),
    image_groups: tuple[str, ...] = (),
) -> Preset:
    """Register (or replace) a preset; returns it. Regexes and image groups are checked here, not at use."""
    for pattern in (*groups.values(), *exclude, *unfiltered, *(p for p, _ in inherit)):
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"preset {name!r}: invalid regex {pattern!r}: {err}") from err
    image_groups = (image_groups,) if isinstance(image_groups, str) else tuple(image_groups)
    unknown = [g for g in image_groups if g not in groups]
    if unknown:
        raise ValueError(f"preset {name!r}: image_groups {unknown} are not among its groups {list(groups)}")
    preset = Preset(
        name, dict(groups), tuple(exclude), tuple(unfiltered), description, tuple(inherit), image_groups
    )
    if name in _PRESETS and _PRESETS[name] != preset:  # the same definition again (a re-import) is fine
        raise ValueError(f"modality preset {name!r} is already registered with another definition")
    _PRESETS[name] = preset
    return preset


def add_preset_loader(loader: Callable[[], None]) -> None:
    """Register `loader`, called once when a preset name is not (yet) known, to register more presets.

    The engine imports nothing from the rest of the package: the package registers a loader that
    imports its built-in backbones (each registering its preset) only when one is asked for.
    """
    if loader not in _LOADERS:
        _LOADERS.append(loader)


def _run_loaders() -> None:
    while _LOADERS:
        _LOADERS.pop(0)()


def get_preset(name: str) -> Preset:
    """Look up a preset by name, running the registered preset loaders first if it is not known."""
    if name not in _PRESETS:
        _run_loaders()
    if name not in _PRESETS:
        raise ValueError(f"unknown modality preset {name!r}; registered: {sorted(_PRESETS)}")
    return _PRESETS[name]


def available_presets() -> list[str]:
    """Every registered preset name (after running the preset loaders)."""
    _run_loaders()
    return sorted(_PRESETS)
