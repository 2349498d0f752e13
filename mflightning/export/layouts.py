"""The two compressed-tensors sparse layouts, one weight at a time: check, encode, decode.

A weight `<module>.weight` of shape `(rows, cols)` is stored as the tensors compressed-tensors
names after the module (and reads back by those names):

- `sparse-bitmask`: `<module>.shape` (int64 `[2]`), `<module>.compressed` (the kept values, row
  by row, in the weight's dtype), `<module>.bitmask` (uint8 `[rows, ceil(cols / 8)]`, one bit per
  weight, little-endian within a byte) and `<module>.row_offsets` (int64 `[rows]`, where each
  row's values start in `compressed`);
- `sparse-24-bitmask`: `<module>.shape` (int64 `[2, 1]`), `<module>.compressed` (`[rows,
  cols / 2]`: exactly two values of every four consecutive inputs) and `<module>.bitmask`.

Bit packing and unpacking are compressed-tensors' own (`pack_bitmasks`, `unpack_bitmasks`).
"""
from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

import torch
from torch import Tensor

BITMASK = "sparse-bitmask"
BITMASK_24 = "sparse-24-bitmask"
AUTO = "auto"
FORMATS = (BITMASK, BITMASK_24)
# The parts compressed-tensors stores for one compressed weight, per format.
PARTS: dict[str, tuple[str, ...]] = {
    BITMASK: ("shape", "compressed", "bitmask", "row_offsets"),
    BITMASK_24: ("shape", "compressed", "bitmask"),
}
# Every part name of either format: a dense tensor whose name ends with one of these would be
# read back by compressed-tensors as part of a compressed weight.
ALL_PARTS = ("shape", "compressed", "bitmask", "row_offsets")
GROUP = 4  # 2:4 -- at most 2 kept weights in every group of 4 consecutive inputs
KEEP = 2
INSTALL_HINT = "pip install 'mflightning[export]' (or pip install compressed-tensors)"


def compressed_tensors() -> ModuleType:
    """The compressed-tensors package, or an ImportError saying how to install it."""
    try:
        import compressed_tensors as package
    except ImportError as err:
        raise ImportError(f"the compressed export needs the compressed-tensors package: {INSTALL_HINT}") from err
    return package


def check_format(format: str) -> str:
    """`format` when it is one of `FORMATS` or "auto"; else a ValueError naming the choices."""
    if format not in (*FORMATS, AUTO):
        raise ValueError(f"unknown compressed format {format!r}: choose one of {', '.join((*FORMATS, AUTO))}")
    return format


def first_24_violation(mask: Tensor) -> tuple[int, int, int] | None:
    """`(row, first column, kept)` of the first group of 4 consecutive inputs keeping more than 2; None if 2:4.

    The mask must have a column count divisible by 4 (`check_24` says so otherwise).
    """
    rows, cols = mask.shape
    kept = mask.reshape(rows, cols // GROUP, GROUP).sum(-1)
    bad = (kept > KEEP).nonzero()
    if bad.numel() == 0:
        return None
    row, group = (int(i) for i in bad[0])
    return row, group * GROUP, int(kept[row, group])


def is_24(mask: Tensor) -> bool:
    """Whether a 2-D mask is 2:4 along its input dimension (columns divisible by 4, at most 2 kept per group)."""
    return mask.dim() == 2 and mask.shape[1] % GROUP == 0 and first_24_violation(mask) is None


def check_24(name: str, mask: Tensor) -> None:
    """Raise a ValueError naming the layer, row and columns where `mask` is not 2:4 along its inputs."""
    if mask.dim() != 2 or mask.shape[1] % GROUP:
        raise ValueError(
            f"layer {name!r} (shape {tuple(mask.shape)}) cannot be stored as {BITMASK_24}: 2:4 needs a 2-D "
            f"weight whose input dimension is a multiple of {GROUP}; use format={BITMASK!r}"
        )
    violation = first_24_violation(mask)
    if violation is not None:
        row, col, kept = violation
        raise ValueError(
            f"layer {name!r} is not 2:4 sparse: row {row} keeps {kept} of the {GROUP} weights in columns "
            f"{col}-{col + GROUP - 1} (2:4 allows at most {KEEP}); prune it 2:4 or use format={BITMASK!r}"
        )


def two_of_four_positions(mask: Tensor) -> Tensor:
    """Exactly 2 stored positions in every group of 4: the mask's kept ones, topped up with its first pruned ones.

    `sparse-24-bitmask` stores two values per group even where fewer are kept; the extra
    positions hold zeros (the pruned weights are checked to be zero before this is called).
    """
    groups = mask.reshape(-1, GROUP)
    missing = KEEP - groups.sum(1, keepdim=True)
    pruned = ~groups
    fill = pruned & (pruned.cumsum(1) <= missing)
    return (groups | fill).reshape(mask.shape)


def encode(format: str, weight: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """The compressed parts of one 2-D weight (keys: local part names), on CPU, in the weight's dtype.

    `mask` (True = kept) says which positions are stored; pruned positions must already be zero.
    """
    from compressed_tensors.utils import pack_bitmasks

    weight = weight.detach().cpu()
    stored = mask.detach().to("cpu", torch.bool)
    if format == BITMASK_24:
        stored = two_of_four_positions(stored)
    values = weight[stored]
    bitmask = pack_bitmasks(stored.contiguous())
    rows, cols = weight.shape
    if format == BITMASK_24:
        return {
            "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1),
            "compressed": values.reshape(rows, cols // 2).contiguous(),
            "bitmask": bitmask,
        }
    counts = stored.sum(1)
    return {
        "shape": torch.tensor([rows, cols], dtype=torch.int64),
        "compressed": values.contiguous(),
        "bitmask": bitmask,
        "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
    }


def decode(parts: Mapping[str, Tensor], where: str) -> Tensor:
    """The dense weight of one compressed weight's parts (either format); errors name `where`."""
    from compressed_tensors.utils import unpack_bitmasks

    missing = [p for p in ("shape", "compressed", "bitmask") if p not in parts]
    if missing:
        raise ValueError(f"{where}: compressed weight lacks its {', '.join(missing)} tensor(s)")
    shape = [int(s) for s in parts["shape"].flatten().tolist()]
    stored = unpack_bitmasks(parts["bitmask"], shape)
    values = parts["compressed"].reshape(-1)
    if int(stored.sum()) != values.numel():
        raise ValueError(
            f"{where}: the bitmask marks {int(stored.sum())} stored weights but {values.numel()} values are stored"
        )
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[stored] = values.cpu()
    return dense


def nbytes(tensors: Mapping[str, Tensor]) -> int:
    """Bytes the tensors' data take (what they add to a safetensors file, headers aside)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
