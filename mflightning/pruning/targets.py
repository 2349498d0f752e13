"""Which weights are prunable and which modality group each belongs to."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from torch import nn

from .attention import attention_weights
from .presets import DEFAULT_UNFILTERED, GroupMap, get_preset, recognise_preset

SINGLE_GROUP = "all"

# Modules whose weight is an embedding table: an nn.Linear sharing it (a tied LM head) is not
# pruned as a layer unless asked, since its mask would also cut rows out of the embedding.
EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)

# Whose calls feed the statistic of a weight that several distinct modules apply (tied layers):
# "first_module": only the first module in the model's name order (the module under the weight's
# first name; MULTIFLOW's reference code: on BLIP's tied pretraining layout the encoder's inputs, never
# the decoder's); "every_module": every module applying it. One module called several times (reached
# under several names) accumulates all its calls either way.
SHARED_WEIGHT_INPUTS = ("first_module", "every_module")


@dataclass
class Target:
    """One prunable weight: its parameter name, the modules that use it and its group.

    `modules` are the modules whose calls feed its statistics: an nn.Linear (the input of its
    forward) or an nn.MultiheadAttention whose packed/separate input projection or output
    projection this weight is (see `attention.py`). `shared_by` are the other modules that apply
    the same weight but do not feed its statistics (see `SHARED_WEIGHT_INPUTS`).
    """

    name: str
    param: nn.Parameter
    modules: list[nn.Module]
    group: str
    filter_tokens: bool  # drop padding tokens from its input statistics
    # no preset or image_groups= says whether its input is text: calibration traces it (provenance.py)
    infer_text_tokens: bool = False
    shared_by: list[nn.Module] = field(default_factory=list)


@dataclass(frozen=True)
class GroupSpec:
    """Resolved `modalities` argument: how to assign groups, what to leave dense, what reads images.

    `known_groups` are the group names the map declares (None for a callable, whose groups are
    known only once every layer is assigned); `image_groups` are checked against them, or against
    the groups the targets got, in `find_targets`.
    """

    assign: Callable[[str], str | None]
    exclude: tuple[str, ...]
    unfiltered: tuple[str, ...]
    description: str
    image_groups: tuple[str, ...] = ()
    known_groups: tuple[str, ...] | None = None
    prune_tied_embeddings: bool = False
    # False: neither a preset nor the caller said which groups read image tokens (traced instead)
    image_groups_declared: bool = True
    # refuse nn.Linear layers whose weight is computed (weight_norm, parametrizations) unless excluded
    refuse_computed_weights: bool = True


def resolve_modalities(
    model: nn.Module,
    modalities: GroupMap,
    exclude: Iterable[str] = (),
    *,
    image_groups: Iterable[str] | None = None,
    prune_tied_embeddings: bool = False,
) -> GroupSpec:
    """Turn None / preset name / regex map / callable into one group-assignment function.

    None means the model's preset: its `pruning_preset` attribute, else what a registered recogniser
    says (`presets.recognise_preset`: transformers' CLIP, SigLIP, BLIP-2, LLaVA, bare or inside a
    wrapper), else one group. A preset's `exclude_for(model)` adds this model's unused layers to `exclude`.

    `image_groups` names the groups whose layers read image tokens (never PAD-filtered). None
    takes the preset's declaration; with a regex map, a callable or a single group, None declares
    nothing: calibration then traces which inputs carry text tokens (`provenance.py`). `prune_tied_embeddings` makes an nn.Linear weight that is also an
    nn.Embedding's table (a tied LM head) prunable; by default it stays dense.
    """
    exclude = tuple(exclude)
    for pattern in exclude:
        _compile(pattern, "exclude")
    declared = _as_names(image_groups)
    options = dict(prune_tied_embeddings=bool(prune_tied_embeddings))
    undeclared = dict(options, image_groups_declared=declared is not None)
    if modalities is None:
        preset_name = recognise_preset(model)  # `pruning_preset`, else a registered recogniser (transformers' classes)
        if preset_name is None:
            return GroupSpec(
                lambda name: SINGLE_GROUP, exclude, DEFAULT_UNFILTERED, "one group",
                declared or (), (SINGLE_GROUP,), **undeclared,
            )
        modalities = preset_name
    if isinstance(modalities, str):
        preset = get_preset(modalities)
        # layers this model instance never uses in its forward (e.g. LLaVA's vision layers after the one it reads)
        model_exclude = tuple(preset.exclude_for(model)) if preset.exclude_for is not None else ()
        for pattern in model_exclude:
            _compile(pattern, f"preset {preset.name!r} exclude_for")
        return GroupSpec(
            _regex_assigner(preset.groups, f"preset {preset.name!r}"),
            preset.exclude + model_exclude + exclude,
            preset.unfiltered,
            f"preset {preset.name!r}",
            preset.image_groups if declared is None else declared,
            tuple(preset.groups),
            **options,
        )
    if isinstance(modalities, Mapping):
        if not modalities:
            raise ValueError("modalities: the group map is empty")
        return GroupSpec(
            _regex_assigner(modalities, "modalities"), exclude, DEFAULT_UNFILTERED, "regex map",
            declared or (), tuple(modalities), **undeclared,
        )
    if callable(modalities):
        return GroupSpec(modalities, exclude, DEFAULT_UNFILTERED, "callable", declared or (), None, **undeclared)
    raise TypeError(
        f"modalities must be None, a preset name, a mapping group -> regex or a callable, got {type(modalities)!r}"
    )


def find_targets(
    model: nn.Module, spec: GroupSpec, *, shared_weight_inputs: str = "first_module"
) -> dict[str, Target]:
    """All nn.Linear and nn.MultiheadAttention projection weights not excluded, keyed by their name
    in `model.named_parameters()`.

    A weight applied by several distinct modules (tied layers) is one target; by default only the
    first of them in name order (the module under its first name) feeds its statistics, the others
    are listed in `shared_by` (`shared_weight_inputs="every_module"`: all feed them, see
    `SHARED_WEIGHT_INPUTS`). `exclude` and `unfiltered` match any of its names. A weight that is also
    an embedding table stays dense unless `spec.prune_tied_embeddings`. Raises if a layer gets no
    group, or if an image group names no group.
    """
    if shared_weight_inputs not in SHARED_WEIGHT_INPUTS:
        raise ValueError(f"shared_weight_inputs must be one of {SHARED_WEIGHT_INPUTS}, got {shared_weight_inputs!r}")
    aliases = _parameter_names(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, EMBEDDING_TYPES)}
    targets: dict[str, Target] = {}
    seen_modules: set[int] = set()
    computed: list[str] = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        if isinstance(module, nn.Linear) and _computed_weight(module):
            name = f"{module_name}.weight" if module_name else "weight"
            if not _matches_any(spec.exclude, [name]):
                computed.append(name)
            continue
        for weight in _prunable_weights(module):
            names = aliases.get(id(weight))
            if not names:
                continue
            if id(weight) in embeddings and not spec.prune_tied_embeddings:
                continue
            if _matches_any(spec.exclude, names):
                continue
            name = names[0]
            if name in targets:  # named_modules and named_parameters walk the model in the same order
                shared = targets[name]
                (shared.modules if shared_weight_inputs == "every_module" else shared.shared_by).append(module)
                continue
            group = _assign(spec, names, tuple(weight.shape))
            filter_tokens = group not in spec.image_groups and not _matches_any(spec.unfiltered, names)
            infer = filter_tokens and not spec.image_groups_declared
            targets[name] = Target(name, weight, [module], group, filter_tokens, infer_text_tokens=infer)
    if computed and spec.refuse_computed_weights:
        raise ValueError(
            f"{len(computed)} nn.Linear layer(s) compute their weight from other parameters (weight_norm, another parametrization or "
            f"torch.nn.utils.prune), so no mask can hold on it: {computed[:5]}{' ...' if len(computed) > 5 else ''}. Remove "
            "the reparametrization before pruning (torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') "
            "or torch.nn.utils.remove_weight_norm(module)), or leave them dense with exclude=[regex, ...]"
        )
    if not targets:
        raise ValueError(
            "the model has no prunable nn.Linear / nn.MultiheadAttention weights (after `exclude`; a weight "
            "tied to an nn.Embedding stays dense unless prune_tied_embeddings=True)"
        )
    _check_image_groups(spec, targets)
    return targets


def _computed_weight(module: nn.Module) -> bool:
    """True when the module's `weight` is computed on each call rather than a parameter of its own."""
    from torch.nn.utils import parametrize

    return parametrize.is_parametrized(module, "weight") or not isinstance(module._parameters.get("weight"), nn.Parameter)


def _prunable_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weights of `module` that are pruned as layers (an MHA's out_proj also counts as nn.Linear)."""
    if isinstance(module, nn.MultiheadAttention):
        return attention_weights(module)
    if isinstance(module, nn.Linear):
        return [module.weight]
    return []


def _parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has in `model`, the canonical (`named_parameters()`) one first."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def _assign(spec: GroupSpec, names: list[str], shape: tuple[int, ...]) -> str:
    """The group of the first of `names` that gets one (a shared weight: canonical name first)."""
    for name in names:
        group = spec.assign(name)
        if group is not None:
            return str(group)
    others = f" (also named {names[1:]})" if len(names) > 1 else ""
    raise ValueError(
        f"prunable layer {names[0]!r} {shape}{others} matches no modality group "
        f"({spec.description}); add it to a group or to `exclude`"
    )


def _check_image_groups(spec: GroupSpec, targets: Mapping[str, Target]) -> None:
    """Every declared image group must be a group of the map, or (a callable) of some target."""
    available = list(dict.fromkeys((*(spec.known_groups or ()), *(t.group for t in targets.values()))))
    unknown = [g for g in spec.image_groups if g not in available]
    if unknown:
        raise ValueError(f"image_groups: unknown group(s) {unknown} ({spec.description}); groups: {available}")


def _as_names(groups: Iterable[str] | None) -> tuple[str, ...] | None:
    """`groups` as a tuple of names (a single string is one name); None stays None."""
    if groups is None:
        return None
    if isinstance(groups, str):
        return (groups,)
    names = tuple(groups)
    bad = [g for g in names if not isinstance(g, str)]
    if bad:
        raise TypeError(f"image_groups must be group names (str), got {bad!r}")
    return names


def _matches_any(patterns: Iterable[str], names: Iterable[str]) -> bool:
    names = list(names)
    return any(re.search(p, n) for p in patterns for n in names)


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
