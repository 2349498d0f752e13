"""The `mflightning` command: prune once from a recipe, fine-tune/evaluate with LightningCLI, check recipes.

    mflightning prune    --config recipes/blip/prune/multiflow.yaml [--pruning.sparsity 0.9 ...]
    mflightning fit      --config recipes/blip/retrieval_coco.yaml  [--pruning.sparsity 0.9 ...]
    mflightning validate --config ...      mflightning test --config ...
    mflightning check    --config <any recipe> [--strict]
    mflightning <subcommand> --config ... --print_config

One module per job:
- `settings.py`: `PruningSettings`, the `pruning:` section (how `masks` and `sparsity` combine);
- `paths.py`: every input path of a recipe is checked before any model or data is built; a
  missing one stops the run with an error naming its config key;
- `lightning_cli.py`: `fit`/`validate`/`test`/`predict`, LightningCLI (`model:`, `data:`,
  `trainer:`) plus the `pruning:` section as a `MultiFlowCallback`;
- `prune.py`: `prune` builds the model and the calibration data of the recipe, calls
  `mflightning.prune` once and writes masks, scores and the result's reports into `output_dir`;
- `check.py`: `check` parses and type-checks a recipe (nothing instantiated, no data or weights
  read) and lists its paths; with `--strict`, a missing input path is an error;
- `errors.py`: `RecipeError` and `ConfigPathError`, which `main` prints as one line (exit status 2).
"""
from __future__ import annotations

import sys
from typing import Any

from .check import CheckReport, check_recipe, recipe_kind, run_check
from .errors import ConfigPathError, RecipeError
from .lightning_cli import LIGHTNING_SUBCOMMANDS, lightning_cli
from .paths import PathEntry, recipe_paths, require_paths
from .prune import PruneOutputs, prune_parser, report_dict, run_prune
from .settings import PruningSettings

OWN_SUBCOMMANDS = ("prune", "check", "export")

USAGE = f"""usage: mflightning {{{','.join(OWN_SUBCOMMANDS + LIGHTNING_SUBCOMMANDS)}}} --config RECIPE [overrides]

  prune     prune a model once from a pruning recipe; writes masks, scores and reports
  fit       fine-tune (LightningCLI) with the recipe's pruning: section applied by MultiFlowCallback
  validate  evaluate on the validation split (LightningCLI)
  test      evaluate on the test split (LightningCLI)
  predict   run prediction (LightningCLI)
  check     parse and type-check a recipe without data or weights (--strict: require its input paths)
  export    write a pruned checkpoint in compressed-tensors' sparse layouts or as a transformers model (--help)

Overrides are dotted keys, e.g. --pruning.sparsity 0.9 --data.batch_size 16 --trainer.max_epochs 1;
--print_config prints the resolved recipe and exits.
"""


def cli_main(args: list[str] | None = None) -> Any:
    """The CLI in-process: returns PruneOutputs (prune), CheckReport (check) or the LightningCLI object."""
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return None
    command, rest = args[0], args[1:]
    if command == "prune":
        return run_prune(rest)
    if command == "check":
        return run_check(rest)
    if command == "export":
        from mflightning.export.__main__ import run_export

        try:
            return run_export(rest)
        except (ValueError, FileNotFoundError) as err:  # bad input named by the exporter: one clear line
            raise RecipeError(f"export: {err}") from None
    if command in LIGHTNING_SUBCOMMANDS:
        return lightning_cli(args)
    raise RecipeError(f"unknown subcommand {command!r}\n{USAGE}")


def main(args: list[str] | None = None) -> None:
    """Console entry point: recipe errors are printed as one clear message with exit status 2."""
    try:
        cli_main(args)
    except (ConfigPathError, RecipeError) as err:
        print(f"mflightning: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


__all__ = [
    "CheckReport", "ConfigPathError", "PathEntry", "PruneOutputs", "PruningSettings", "RecipeError",
    "check_recipe", "cli_main", "lightning_cli", "main", "prune_parser", "recipe_kind", "recipe_paths",
    "report_dict", "require_paths", "run_prune",
]
