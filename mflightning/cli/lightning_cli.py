"""`mflightning fit|validate|test|predict`: LightningCLI with a `pruning:` section and path checks first.

The recipe's `model:`, `data:` and `trainer:` sections are LightningCLI's; `pruning:` is a
`PruningSettings` turned into a `MultiFlowCallback` appended to the trainer's callbacks.
"""
from __future__ import annotations

import sys
from typing import Any

from .paths import as_dict, require_paths
from .settings import PruningSettings, require_calibration_data

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class _ParsedOnly(Exception):
    """Raised in check-only mode right after a recipe parsed, before anything is instantiated."""

    def __init__(self, config: dict):
        super().__init__("parsed")
        self.config = config


def _lightning_cli_class():
    """The LightningCLI subclass (built on first use: importing Lightning is slow)."""
    from lightning.pytorch.cli import LightningCLI

    class MultiFlowCLI(LightningCLI):
        """LightningCLI with a `pruning:` section turned into a MultiFlowCallback, and path checks first."""

        def __init__(self, *args: Any, check_only: bool = False, **kwargs: Any) -> None:
            self.check_only = check_only
            self.pruning_callback = None
            super().__init__(*args, **kwargs)

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_class_arguments(PruningSettings, "pruning", instantiate=False)

        def before_instantiate_classes(self) -> None:
            config = as_dict(self.config[self.subcommand] if self.subcommand else self.config)
            settings = PruningSettings(**config.get("pruning") or {})
            settings.validate()
            require_calibration_data(config)
            if self.check_only:
                raise _ParsedOnly(config)
            require_paths(config)
            self.pruning_settings = settings

        def instantiate_trainer(self, **kwargs: Any):
            callbacks = list(self._get(self.config_init, "trainer", default={}).get("callbacks") or [])
            callback = self.pruning_settings.callback()
            if callback is not None:
                self.pruning_callback = callback
                callbacks.append(callback)
            return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    return MultiFlowCLI


def lightning_cli(args: list[str], check_only: bool = False):
    """Run a LightningCLI subcommand (fit/validate/test/predict) in-process; returns the CLI object."""
    cli_class = _lightning_cli_class()
    argv = sys.argv
    sys.argv = [argv[0] if argv else "mflightning"]  # LightningCLI warns when args and sys.argv both hold arguments
    try:
        return cli_class(
            args=list(args),
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf"} if _has_omegaconf() else None,
            check_only=check_only,
            seed_everything_default=0,
        )
    finally:
        sys.argv = argv


def parsed_lightning_recipe(args: list[str]) -> dict:
    """The resolved config of a fit recipe (classes resolved, arguments type-checked), instantiating nothing."""
    try:
        lightning_cli(["fit", *args], check_only=True)
    except _ParsedOnly as parsed:
        return parsed.config
    raise AssertionError("check_only did not stop the LightningCLI")  # pragma: no cover


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True
