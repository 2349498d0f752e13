"""State-dict helpers shared by the backbones' checkpoint IO and the compressed export."""
from __future__ import annotations

from collections.abc import Mapping

import torch
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


def fold_aliases(state: Mapping[str, Tensor], aliases: Mapping[str, str], source: str) -> dict[str, Tensor]:
    """A file's tensors with each tied alias of the model (alias -> first name) loaded under the first name.

    A file may hold a tied tensor only under a name the model sees as its alias: the MULTIFLOW code's
    BLIP and XVLM LM heads keep their bias only as ``cls.predictions.decoder.bias``, the upstream files
    also as ``cls.predictions.bias``. The value then goes to the first name, so it is loaded rather than
    skipped as a duplicate; a file holding both names with different values is an error naming them.
    """
    folded = dict(state)
    conflicts = []
    for alias, first in aliases.items():
        if alias not in folded:
            continue
        value = folded.pop(alias)
        if first not in state:
            folded[first] = value
        elif state[first].shape != value.shape or not torch.equal(state[first], value):
            conflicts.append(f"{alias} vs {first}")
    if conflicts:
        raise ValueError(f"{source}: the file holds different values under two names of one tied tensor of the "
                         f"model: {conflicts[:6]}")
    return folded


def resize_position_embeddings(pos: Tensor, num_patches: int, *, where: str = "position embeddings") -> Tensor:
    """Position embeddings ``(1, 1+P, D)`` or ``(1+P, D)`` resized to ``1 + num_patches`` entries.

    As the original BLIP / XVLM loaders do: the CLS entry is kept, the P patch entries form a
    square grid (rows first) that is resized with bicubic interpolation (``align_corners=False``)
    in float32 and flattened back after CLS. The input's shape layout and dtype are kept.
    """
    import math

    import torch
    import torch.nn.functional as F

    if pos.dim() not in (2, 3) or (pos.dim() == 3 and pos.size(0) != 1):
        raise ValueError(f"{where}: expected shape (1, 1+P, D) or (1+P, D), got {tuple(pos.shape)}")
    table = pos if pos.dim() == 2 else pos[0]
    old = table.size(0) - 1
    old_side, new_side = math.isqrt(old), math.isqrt(num_patches)
    if old_side * old_side != old or old < 1:
        raise ValueError(f"{where}: {old} patch entries (after CLS) do not form a square grid")
    if new_side * new_side != num_patches or num_patches < 1:
        raise ValueError(f"{where}: target of {num_patches} patches is not a square grid")
    if old == num_patches:
        return pos
    width = table.size(1)
    grid = table[1:].float().reshape(1, old_side, old_side, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(num_patches, width).to(table.dtype)
    out = torch.cat([table[:1], patches], dim=0)
    return out if pos.dim() == 2 else out.unsqueeze(0)


def checkpoint_spec(spec: Mapping, known: tuple[str, ...], family: str) -> tuple[str, dict]:
    """A recipe's ``{"checkpoint": path, ...}`` backbone spec as (path, ``from_pretrained`` keywords).

    Keys other than ``checkpoint`` and `known` are an error naming them (a typo must not be dropped).
    """
    options = dict(spec)
    unknown = sorted(set(options) - {"checkpoint", *known})
    if unknown:
        raise ValueError(f"unknown keys {unknown} in the {family} checkpoint spec; known: "
                         + ", ".join(("checkpoint", *known)))
    return options.pop("checkpoint"), options
