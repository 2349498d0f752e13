"""State-dict helpers shared by the backbones' checkpoint IO and the compressed export."""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


def dedupe_aliases(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Each storage once, under its first name, and alias -> first name for the other names of it.

    Two names are one tensor (tied weights, e.g. an LM head and its word embeddings) when they
    share data pointer, shape, strides, dtype and device; empty tensors are never aliases (they
    may all point nowhere).
    """
    first: dict[tuple, str] = {}
    unique: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device)
        if tensor.numel() and key in first:
            aliases[name] = first[key]
            continue
        first.setdefault(key, name)
        unique[name] = tensor
    return unique, aliases
