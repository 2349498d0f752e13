"""How mask names meet a model's parameter names: prefixes, inheritance and coverage.

A mask file computed on a bare backbone applies to a task module that holds it under a prefix;
exactly one prefix mapping must fit (two copies of the backbone are an error naming both). A
preset's `inherit` rules give a layer copy the mask of the layer it was copied from, and
`prunable_layers` lists what a model's masks must cover.

Copies of masked weights (momentum / EMA encoders) take their source's masks by rule: a module
declares `pruning_copies = {"copy_prefix.": "source_prefix."}` (parameter names relative to it;
any submodule may declare, its path is put in front). `declared_copies` collects the rules,
`copy_exclusions` keeps the copies out of scoring and coverage, `copy_sources` maps each copy
parameter to the masked parameter it copies (`MaskKeeper` masks copies with it).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from torch import Tensor, nn

from .targets import find_targets, resolve_modalities


def prunable_layers(model: nn.Module, preset: str | None, exclude: Iterable[str] = ()) -> list[str]:
    """Names of the weights `prune(model, modalities=preset, exclude=exclude)` would mask.

    Only the names matter here, so a layer the preset gives no group still counts as prunable
    (prune() would refuse it, naming it; here it is reported as uncovered instead).
    """
    spec = resolve_modalities(model, preset, tuple(exclude) + copy_exclusions(model))
    any_group = replace(spec, assign=lambda name: spec.assign(name) or "unassigned")
    try:
        return list(find_targets(model, any_group))
    except ValueError as err:
        if "no prunable" in str(err):  # nothing left to cover (no layer, or every one excluded)
            return []
        raise


def _add_inherited(preset_name: str, params: Mapping[str, Tensor], resolved: dict[str, Tensor]) -> None:
    """Give parameters without a mask the mask the preset's `inherit` rules name (a copy takes its source's)."""
    from .presets import get_preset

    for pattern, replacement in get_preset(preset_name).inherit:
        regex = re.compile(pattern)
        for name in params:
            if name in resolved or not regex.search(name):
                continue
            source = regex.sub(replacement, name)
            if source in resolved:
                resolved[name] = resolved[source]


def _match_names(
    names: list[str], params: Mapping[str, Tensor], prefix: str | None = None, where: str = "the masks"
) -> tuple[str, str]:
    """How mask names become the model's parameter names: `(strip, add)`, name -> add + name[len(strip):].

    Exact names win. Otherwise every way of stripping a leading part of the mask names and/or
    adding a prefix is tried; of the mappings that fit all names, those stripping least count (a
    partial file's names may also fit elsewhere by replacing a leading part, by accident), and
    exactly one must remain: a model holding two copies of the masked layers (`teacher.*`,
    `student.*`) is an error naming the candidates, never a silent pick of the first. `prefix`
    settles it: the masks get `prefix` in front (after stripping a leading part of theirs, if only
    that fits).
    """
    if not names:
        return "", prefix or ""
    if prefix is not None:
        if all(prefix + n in params for n in names):
            return "", prefix
        pairs = [pair for pair in _candidate_pairs(names[0], params) if pair[1] == prefix]
    elif all(n in params for n in names):
        return "", ""
    else:
        pairs = _candidate_pairs(names[0], params)
    fitting: dict[tuple[str, ...], tuple[str, str]] = {}
    for strip, add in dict.fromkeys(pairs):
        if all(n.startswith(strip) and add + n[len(strip):] in params for n in names):
            fitting.setdefault(tuple(add + n[len(strip):] for n in names), (strip, add))
    # the mappings that keep most of the mask names: a mapping that replaces a leading part (text_encoder.
    # -> text_decoder.bert.) explains a partial file's names only by accident when one adding a prefix fits
    least = min((len(strip) for strip, _ in fitting.values()), default=0)
    fitting = {resolved: pair for resolved, pair in fitting.items() if len(pair[0]) == least}
    if len(fitting) == 1:
        return next(iter(fitting.values()))
    if len(fitting) > 1:
        shown = [_describe(pair) for pair in fitting.values()]
        raise ValueError(
            f"{where} match the model under {len(fitting)} different name prefixes ({', '.join(shown)}): "
            "it holds several copies of the masked layers; pass prefix= (what the model puts in front "
            "of the mask names, '' for nothing) to say which copy to mask"
        )
    raise ValueError(_mismatch(names, params, prefix, where))


def _mismatch(names: list[str], params: Mapping[str, Tensor], prefix: str | None, where: str) -> str:
    """Why no mapping fits every mask name: the mapping that fits most names and the names left over
    (masks for layers the model lacks), or, when none fits most names, the names themselves."""
    pairs = {("", prefix or "")} | {pair for n in names for pair in _candidate_pairs(n, params)
                                    if prefix is None or pair[1] == prefix}

    def fits(pair: tuple[str, str]) -> list[str]:
        return [n for n in names if n.startswith(pair[0]) and pair[1] + n[len(pair[0]):] in params]

    best = max(sorted(pairs), key=lambda pair: len(fits(pair)))
    fitting = fits(best)
    if 2 * len(fitting) > len(names):  # most names fit: the others are layers the model lacks
        missing = [n for n in names if n not in set(fitting)]
        mapping = "as they are" if best == ("", "") else f"under {_describe(best)}"
        return (f"{where} name {len(missing)} layer(s) the model lacks (first: {missing[:3]}); the other "
                f"{len(fitting)} of {len(names)} match its parameters {mapping}. The masks were computed on another "
                "model (partial_masks= lets masks leave layers of the model uncovered, not name layers it lacks)")
    with_prefix = f" with prefix {prefix!r}" if prefix else ""
    return (f"{where} do not match the model: all {len(names)} mask names{with_prefix} are not parameters of it "
            f"(first: {names[:3]}), and no common name prefix fixes that")


def _candidate_pairs(probe: str, params: Mapping[str, Tensor]) -> list[tuple[str, str]]:
    """(prefix to strip from the mask names, prefix to add) pairs under which `probe` names a parameter."""
    candidates: list[tuple[str, str]] = []
    for pname in params:
        if pname.endswith("." + probe):
            candidates.append(("", pname[: -len(probe)]))
    parts = probe.split(".")
    for i in range(1, len(parts)):
        stripped = ".".join(parts[i:])
        if stripped in params:
            candidates.append((".".join(parts[:i]) + ".", ""))
        for pname in params:
            if pname.endswith("." + stripped) and pname != stripped:
                candidates.append((".".join(parts[:i]) + ".", pname[: -len(stripped)]))
    return candidates


def _describe(pair: tuple[str, str]) -> str:
    strip, add = pair
    return f"{add!r} in place of {strip!r}" if strip else repr(add)


COPIES_ATTRIBUTE = "pruning_copies"


def declared_copies(model: nn.Module) -> dict[str, str]:
    """Copy prefix -> source prefix, as `model` and its submodules declare them (`pruning_copies`).

    A submodule's rules are relative to it: its path is put in front of both prefixes.
    """
    rules: dict[str, str] = {}
    for path, module in model.named_modules():
        declared = module.__dict__.get(COPIES_ATTRIBUTE, getattr(type(module), COPIES_ATTRIBUTE, None))
        if not declared:
            continue
        if not isinstance(declared, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in declared.items()):
            raise TypeError(f"{COPIES_ATTRIBUTE} of {path or type(module).__name__} must map copy prefixes to "
                            f"source prefixes (str -> str), got {declared!r}")
        base = path + "." if path else ""
        for copy, source in declared.items():
            if not copy or copy == source:
                raise ValueError(f"{COPIES_ATTRIBUTE} of {path or type(module).__name__}: copy prefix {copy!r} "
                                 f"must be non-empty and differ from its source {source!r}")
            rules[base + copy] = base + source
    return rules


def copy_exclusions(model: nn.Module) -> tuple[str, ...]:
    """Regexes of the parameters under a declared copy prefix: copies are masked by rule, never scored."""
    return tuple("^" + re.escape(prefix) for prefix in declared_copies(model))


def copy_sources(
    names: Iterable[str], rules: Mapping[str, str], has_mask: Callable[[str], bool], where: str = "the model"
) -> dict[str, str]:
    """Copy parameter name -> the name of the masked parameter it copies, for every name under a
    copy prefix whose source has a mask (the longest matching prefix decides; a source that is itself
    a copy resolves to its own source). A copy prefix that names no parameter is an error."""
    names = list(names)
    ordered = sorted(rules.items(), key=lambda rule: -len(rule[0]))
    unused = [copy for copy, _ in ordered if not any(n.startswith(copy) for n in names)]
    if unused:
        raise ValueError(f"{where} declares copies under {unused} ({COPIES_ATTRIBUTE}) but has no parameter "
                         "with that prefix")
    out: dict[str, str] = {}
    for name in names:
        source, seen = name, set()
        while True:
            rule = next(((c, s) for c, s in ordered if source.startswith(c)), None)
            if rule is None or source in seen:
                break
            seen.add(source)
            source = rule[1] + source[len(rule[0]):]
            if has_mask(source):
                out[name] = source
                break
    return out
