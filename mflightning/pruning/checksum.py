"""A checksum of a mask/score file's tensors, kept in its safetensors metadata and checked on load.

safetensors checks its header and sizes, not the bytes of the tensor data: bytes overwritten inside
a mask would load as other masks. The checksum covers every tensor's name, dtype, shape and bytes.
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

KEY = "checksum"
ALGORITHM = "sha256"


def tensors_checksum(tensors: Mapping[str, Tensor]) -> str:
    """`sha256:<hex>` over the tensors in name order: name, dtype, shape, then the raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return f"{ALGORITHM}:{digest.hexdigest()}"


def verify_checksum(path: str, metadata: Mapping[str, str], tensors: Mapping[str, Tensor]) -> None:
    """Raise if the file's tensors differ from the checksum it was written with; a file without one gets a note."""
    stored = metadata.get(KEY)
    if stored is None:
        warnings.warn(
            f"{path!r} has no checksum (written by an mflightning from before checksums): its tensors are loaded "
            "unverified; save it again to add one",
            UserWarning,
            stacklevel=3,
        )
        return
    actual = tensors_checksum(tensors)
    if actual != stored:
        raise ValueError(
            f"{path!r} is corrupted: its tensors do not match the checksum written with them "
            f"(stored {stored[:23]}..., computed {actual[:23]}...); the file was changed or damaged after it was "
            "saved, so its masks cannot be trusted: recompute or restore it"
        )
