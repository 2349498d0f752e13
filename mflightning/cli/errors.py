"""The two errors the `mflightning` command reports as one line with exit status 2 (see `main`)."""
from __future__ import annotations


class ConfigPathError(FileNotFoundError):
    """A recipe names an input path that does not exist (the message names the config key)."""


class RecipeError(ValueError):
    """A recipe's values are inconsistent (e.g. a sparsity out of range)."""
