"""Writing safetensors files atomically, with the permissions any new file gets (the umask's)."""
from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor


def umask_mode() -> int:
    """The mode a new file gets here: 0o666 less the process umask (safetensors itself writes 0o600)."""
    current = os.umask(0)
    os.umask(current)
    return 0o666 & ~current


def atomic_save_file(tensors: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str], sync: bool = False) -> None:
    """safetensors `save_file` under a hidden temporary name in the same folder, then renamed over `path`.

    An interrupted save never leaves a truncated file where a good one was, nor a temporary file
    behind; the file gets the umask's permissions like any other new file; `sync`: on disk before
    it replaces the old one.
    """
    from safetensors.torch import save_file

    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        save_file(dict(tensors), str(temporary), metadata=dict(metadata))
        os.chmod(temporary, umask_mode())
        if sync:
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
