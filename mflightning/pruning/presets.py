"""Modality presets: how a backbone's prunable layers split into groups.

A backbone registers a preset once (``register_preset("blip", ...)``) so that users can
write ``modalities="blip"``. A preset bundles the group map, the heads that stay dense,
the groups whose inputs are image tokens (``image_groups``) and the layers whose inputs
are image tokens outside those groups (``unfiltered``); the statistics of both are never
filtered by the text attention mask.

Optionally a preset also carries what depends on the model instance: `exclude_for(model)`, more
layers to keep dense (e.g. the vision layers after the one LLaVA reads), and `adapter(model)`, a
`CalibrationAdapter` with the forward / token mask that runs the family on processor batches.
Models that carry no `pruning_preset` attribute (transformers' classes) are recognised by the
functions registered with `register_recogniser`; `recognise_preset(model)` asks them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Union

GroupMap = Union[None, str, Mapping[str, str], Callable[[str], str]]

# Cross-attention key/value projections read image tokens, so text padding never applies.
DEFAULT_UNFILTERED: tuple[str, ...] = (
    r"crossattention\.self\.(key|value)\.weight$",
    r"cross_?attn\.(k|v|kv|key|value)(_proj)?\.weight$",
)


@dataclass(frozen=True)
class CalibrationAdapter:
    """How a model family runs on calibration batches: `forward(model, batch)` and `token_mask(batch)`.

    Either may be None (the engine's default: `model(**batch)`, `batch["attention_mask"]`). A user's
    `forward=` / `token_mask=` given to `prune()` wins over the adapter's.
    """

    forward: Callable[[Any, Any], Any] | None = None
    token_mask: Callable[[Any], Any] | None = None
    description: str = ""


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
    # Model-dependent parts (not compared between two registrations of a name):
    # exclude_for(model) -> more exclude regexes for this model instance (layers it never uses);
    # adapter(model) -> CalibrationAdapter that runs this model on processor batches.
    exclude_for: Callable[[Any], Iterable[str]] | None = field(default=None, compare=False)
    adapter: Callable[[Any], CalibrationAdapter] | None = field(default=None, compare=False)


_PRESETS: dict[str, Preset] = {}
_LOADERS: list[Callable[[], None]] = []
_RECOGNISERS: list[Callable[[Any], "str | None"]] = []


def register_preset(
    name: str,
    groups: Mapping[str, str],
    exclude: tuple[str, ...] = (),
    unfiltered: tuple[str, ...] = DEFAULT_UNFILTERED,
    description: str = "",
    inherit: tuple[tuple[str, str], ...] = (),
    image_groups: tuple[str, ...] = (),
    exclude_for: Callable[[Any], Iterable[str]] | None = None,
    adapter: Callable[[Any], CalibrationAdapter] | None = None,
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
    for what, fn in (("exclude_for", exclude_for), ("adapter", adapter)):
        if fn is not None and not callable(fn):
            raise TypeError(f"preset {name!r}: {what} must be a callable taking the model, got {type(fn)!r}")
    preset = Preset(
        name, dict(groups), tuple(exclude), tuple(unfiltered), description, tuple(inherit), image_groups,
        exclude_for, adapter,
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


def register_recogniser(recogniser: Callable[[Any], "str | None"]) -> None:
    """Register `recogniser(model) -> preset name | None`, asked (in registration order) by
    `recognise_preset` for a model without a `pruning_preset` attribute. It should raise, naming the
    problem, when the model is ambiguous (two families), rather than guess."""
    if not callable(recogniser):
        raise TypeError(f"a recogniser must be callable, got {type(recogniser)!r}")
    if recogniser not in _RECOGNISERS:
        _RECOGNISERS.append(recogniser)


def recognise_preset(model: Any) -> str | None:
    """The preset that `modalities=None` means for `model`: its `pruning_preset` attribute, else the
    first registered recogniser's answer (e.g. a transformers CLIPModel, also inside a wrapper), else None.

    The preset named is looked up (loaders run) so that an unknown name is an error here.
    """
    name = getattr(model, "pruning_preset", None)
    if name is None:
        for recogniser in list(_RECOGNISERS):
            name = recogniser(model)
            if name is not None:
                break
    if name is not None:
        get_preset(name)
    return name


def calibration_adapter(model: Any, preset: str | None) -> CalibrationAdapter | None:
    """The preset's calibration adapter built for `model`, or None (no preset, or one without adapter)."""
    if preset is None:
        return None
    found = get_preset(preset)
    return None if found.adapter is None else found.adapter(model)
