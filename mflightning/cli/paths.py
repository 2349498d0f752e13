"""Recipe path checks: every input path a recipe names is found by its config key and checked before
any model or data is built, so a missing one stops the run with an error naming that key."""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigPathError

# Keys whose values are always input paths (str or list of str), matched on the last key component
# (`json`: the records of a datamodule's `calibration:` section, `data.calibration.json`).
PATH_SUFFIXES = ("_json", "image_root", "_root", "ckpt_path")
PATH_KEYS = ("masks", "answer_list", "json")
# Keys that hold either a hub name or a local path: checked only when the value looks local
# (`checkpoint`: a backbone spec's file, `backbone: {checkpoint: weights/model_base_14M.pth, ...}`;
# `model` / `processor`: ZeroShotRetrievalModule's and ProcessorDataModule's transformers sources).
MAYBE_PATH_KEYS = ("backbone", "tokenizer", "decoder_from", "checkpoint", "model", "processor")
# Output locations: never required to exist.
OUTPUT_KEYS = ("output_dir", "save_masks", "default_root_dir", "dirpath", "save_dir")
# File suffixes that make a `MAYBE_PATH_KEYS` value a local path.
LOCAL_SUFFIXES = (".txt", ".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class PathEntry:
    """One input path named by a recipe."""

    key: str
    path: str
    exists: bool


def as_dict(config: Any) -> dict:
    """A parsed jsonargparse Namespace (or any mapping) as a plain nested dict."""
    return config.as_dict() if hasattr(config, "as_dict") else dict(config)


def looks_local(value: str) -> bool:
    """A hub id is `name` or `org/name`; anything rooted, dotted, deeper or with a file suffix is a local path."""
    if value.startswith(("/", ".", "~")) or os.path.exists(value):
        return True
    if len(Path(value).parts) > 2:
        return True
    return Path(value).suffix in LOCAL_SUFFIXES


def short_key(key: str) -> str:
    """`data.init_args.train_json` -> `data.train_json` (what one writes on the command line)."""
    return key.replace(".init_args.", ".")


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """(dotted key, last component, value) of every leaf of nested dicts."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                yield from _walk(value, dotted)
            else:
                yield dotted, str(key), value


def recipe_paths(config: Mapping[str, Any]) -> list[PathEntry]:
    """Every input path a parsed recipe names, with whether it exists (outputs are left out)."""
    entries = []
    for dotted, last, value in _walk(config):
        if last in OUTPUT_KEYS or value is None:
            continue
        always = last in PATH_KEYS or last.endswith(PATH_SUFFIXES)
        maybe = last in MAYBE_PATH_KEYS
        if not (always or maybe):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if not isinstance(item, (str, os.PathLike)):
                continue
            item = os.fspath(item)
            if maybe and not looks_local(item):
                continue
            entries.append(PathEntry(short_key(dotted), item, os.path.exists(os.path.expanduser(item))))
    return entries


def require_paths(config: Mapping[str, Any]) -> None:
    """Raise ConfigPathError naming every missing input path of the recipe and its config key."""
    missing = [e for e in recipe_paths(config) if not e.exists]
    if missing:
        lines = "\n".join(f"  {e.key}: {e.path!r} does not exist" for e in missing)
        raise ConfigPathError(
            f"the recipe names {len(missing)} missing path(s) (fix the recipe or override them, e.g. "
            f"--{missing[0].key} <path>):\n{lines}"
        )
