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
    _PRESETS[name] = preset
    return preset


def get_preset(name: str) -> Preset:
    """Look up a preset by name, importing the built-in backbones first so they register."""
    if name not in _PRESETS:
        _import_builtin_backbones()
    if name not in _PRESETS:
        raise ValueError(f"unknown modality preset {name!r}; registered: {sorted(_PRESETS)}")
    return _PRESETS[name]


def available_presets() -> list[str]:
    _import_builtin_backbones()
    return sorted(_PRESETS)


def _import_builtin_backbones() -> None:
    import importlib

    for module in ("mflightning.models.blip", "mflightning.models.xvlm"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:  # a backbone not (yet) present is not an error
            if err.name != module:
                raise
