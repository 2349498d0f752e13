"""`mflightning check`: parse and type-check a recipe (classes resolved, arguments validated, nothing
instantiated, no data or weights read) and list its input paths; `--strict` requires them."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import ConfigPathError, RecipeError
from .lightning_cli import parsed_lightning_recipe
from .paths import PathEntry, as_dict, recipe_paths, require_paths
from .prune import prune_parser, prune_settings


@dataclass
class CheckReport:
    """What `mflightning check` found: the recipe kind, its input paths and which are missing."""

    recipe: str
    kind: str  # "prune" or "lightning"
    paths: list[PathEntry]

    @property
    def missing(self) -> list[PathEntry]:
        return [p for p in self.paths if not p.exists]

    def text(self) -> str:
        lines = [f"{self.recipe}: valid {self.kind} recipe ({len(self.paths)} input path(s), {len(self.missing)} missing)"]
        lines += [f"  {'ok     ' if p.exists else 'MISSING'} {p.key}: {p.path}" for p in self.paths]
        return "\n".join(lines)


def recipe_kind(recipe: str | os.PathLike) -> str:
    """`lightning` for a recipe with a trainer: section, `prune` for one with output_dir:."""
    path = Path(recipe)
    if not path.is_file():
        raise ConfigPathError(f"recipe {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {str(path)!r} is not a YAML mapping")
    if "trainer" in data:
        return "lightning"
    if "output_dir" in data or "pruning" in data:
        return "prune"
    raise RecipeError(f"recipe {str(path)!r} has neither a trainer: section (fit/test recipe) nor output_dir: (prune)")


def check_recipe(recipe: str | os.PathLike, overrides: list[str] = (), strict: bool = False) -> CheckReport:
    """Parse and type-check a recipe without instantiating anything; list (and with strict, require) its paths."""
    kind = recipe_kind(recipe)
    args = ["--config", os.fspath(recipe), *overrides]
    if kind == "prune":
        config = as_dict(prune_parser().parse_args(args))
        prune_settings(config)
    else:
        config = parsed_lightning_recipe(args)
    report = CheckReport(os.fspath(recipe), kind, recipe_paths(config))
    if strict:
        require_paths(config)
    return report


def run_check(args: list[str]) -> CheckReport:
    """`mflightning check --config RECIPE [--strict] [overrides]`: print and return the CheckReport."""
    strict = "--strict" in args
    rest = [a for a in args if a != "--strict"]
    if len(rest) < 2 or rest[0] not in ("-c", "--config"):
        raise RecipeError("usage: mflightning check --config RECIPE [--strict] [overrides]")
    report = check_recipe(rest[1], rest[2:], strict=strict)
    print(report.text())
    return report
