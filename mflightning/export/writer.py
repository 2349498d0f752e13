"""Write a pruned model in a compressed-tensors sparse layout (`model.safetensors` + `config.json`) and read it back.

(About 440 lines: the writer, its pre-write checks and its reader are kept in one file because
they must agree on the layout byte for byte; the layouts themselves are in `layouts.py`.)

Only the masked layers are compressed; every other tensor (embeddings, norms, biases, dense
heads) is stored as it is. `config.json` carries compressed-tensors' sparsity config under
`quantization_config.sparsity_config`, the way llm-compressor writes it, plus an
`mflightning_export` section saying what was exported (aliases, mask provenance, dense masked
layers). Reading goes through compressed-tensors: its config classes parse the sparsity config,
`get_nested_weight_mappings` groups a file's tensors into compressed weights, and its
`unpack_bitmasks` rebuilds each mask.
"""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..pruning.files import atomic_save_file
from . import layouts
from .layouts import AUTO, BITMASK, BITMASK_24, FORMATS, PARTS
from .sources import MaskSource, ModelSource, Source, read_source

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
EXPORT_FORMAT = "mflightning-compressed/1"
EXPORT_SECTION = "mflightning_export"
DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
SHOWN = 5


@dataclass
class LayerSize:
    """Bytes of one compressed layer: dense in the exported dtype, and its compressed parts."""

    shape: tuple[int, ...]
    dense_bytes: int
    compressed_bytes: int
    sparsity: float


@dataclass
class ExportReport:
    """What `export_compressed` wrote, with the sizes that say what the compression gained."""

    directory: Path
    weights: Path
    config: Path
    format: str
    sparsity_structure: str
    dtype: str | None
    layers: dict[str, LayerSize]
    dense_masked: dict[str, str] = field(default_factory=dict)  # masked tensor stored dense -> why
    aliases: dict[str, str] = field(default_factory=dict)
    masked_sparsity: float = 0.0
    global_sparsity: float = 0.0
    tensor_bytes: int = 0  # every tensor's data in the file
    dense_tensor_bytes: int = 0  # the same tensors stored dense, in the exported dtype

    @property
    def targets(self) -> list[str]:
        """The compressed modules (the sparsity config's `targets`)."""
        return [name[: -len(".weight")] for name in self.layers]

    @property
    def compressed_bytes(self) -> int:
        return sum(layer.compressed_bytes for layer in self.layers.values())

    @property
    def dense_bytes(self) -> int:
        return sum(layer.dense_bytes for layer in self.layers.values())

    @property
    def layer_ratio(self) -> float:
        """Compressed bytes of the compressed layers over their dense bytes in the same dtype."""
        return self.compressed_bytes / self.dense_bytes if self.dense_bytes else 1.0

    @property
    def file_ratio(self) -> float:
        """All tensor bytes of the file over those tensors stored dense (headers aside)."""
        return self.tensor_bytes / self.dense_tensor_bytes if self.dense_tensor_bytes else 1.0

    def summary(self) -> str:
        """One paragraph: where, which layout, how many layers, and the two size ratios."""
        mb = 1024 ** 2
        lines = [
            f"wrote {self.weights} ({self.format}, {self.sparsity_structure}, dtype {self.dtype or 'as stored'})",
            f"  {len(self.layers)} compressed layers: {self.compressed_bytes / mb:.1f} MiB for "
            f"{self.dense_bytes / mb:.1f} MiB dense ({self.layer_ratio:.4f}x), sparsity {self.masked_sparsity:.4f} "
            "over these layers",
            f"  all tensors: {self.tensor_bytes / mb:.1f} MiB for {self.dense_tensor_bytes / mb:.1f} MiB dense "
            f"({self.file_ratio:.4f}x), global sparsity {self.global_sparsity:.4f} over all floating-point weights",
        ]
        if self.dense_masked:
            shown = ", ".join(f"{n} ({why})" for n, why in list(self.dense_masked.items())[:SHOWN])
            more = f" and {len(self.dense_masked) - SHOWN} more" if len(self.dense_masked) > SHOWN else ""
            lines.append(f"  {len(self.dense_masked)} masked tensor(s) stored dense: {shown}{more}")
        if self.aliases:
            lines.append(f"  {len(self.aliases)} tied name(s) stored once (aliases in the file's metadata)")
        return "\n".join(lines)


def export_compressed(
    source: ModelSource,
    masks: MaskSource,
    out_dir: str | os.PathLike,
    *,
    format: str = AUTO,
    dtype: torch.dtype | str | None = None,
    prefix: str | None = None,
    partial: bool = False,
    weights_only: bool = True,
    model_config: Mapping[str, Any] | None = None,
) -> ExportReport:
    """Write `out_dir/model.safetensors` (masked layers compressed) and `out_dir/config.json`; returns a report.

    Args:
        source: an nn.Module (task LightningModule, backbone...), a state dict, a `save_pretrained`
            folder (its config.json is carried over), or a checkpoint file (Lightning `.ckpt` /
            torch file with a `state_dict`, or a `.safetensors` state dict).
        masks: a PruningResult, a mask file, a name -> bool mask dict (True = kept), or None for a
            Lightning checkpoint whose MultiFlowCallback state holds the masks. Only these layers
            are compressed; their pruned weights must be exactly zero (else a ValueError names the
            layer: nothing is zeroed here, and nothing is written).
        format: "sparse-bitmask" (any sparsity), "sparse-24-bitmask" (every masked layer 2:4
            along its inputs, else an error naming the first violation) or "auto" (2:4 when every
            masked layer is, else bitmask).
        dtype: cast every floating-point tensor to it ("bf16", "fp16", "fp32" or a torch dtype)
            after the zero check; None keeps each tensor's dtype.
        prefix, partial: as in `PruningResult.masks_for` (partial applies to module sources).
        weights_only: `torch.load`'s flag for a checkpoint file; False unpickles anything (trusted files only).
        model_config: the model config to write into config.json; default the module's
            `config.to_dict()` when it has one. An existing config.json in `out_dir` is updated
            (its quantization_config replaced), as compressed-tensors' `update_config` does.

    Masked tensors that compressed-tensors cannot name as `<module>.weight` (not 2-D, or a
    parameter like `in_proj_weight`) and masked layers with nothing pruned stay dense and are
    listed in the report. Tied names are stored once; `load_compressed` restores them. Pruned
    weights are not stored, so they come back as +0.0 (a pruned -0.0 loses its sign bit only);
    every kept weight and every dense tensor comes back bit for bit.
    """
    layouts.compressed_tensors()
    format = layouts.check_format(format)
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir() and _same_dir(source, out_dir):
        raise ValueError(
            f"out_dir {str(out_dir)!r} is the source folder: the export would overwrite its model.safetensors"
        )
    target_dtype = parse_dtype(dtype)
    src = read_source(source, masks, prefix=prefix, partial=partial, weights_only=weights_only)
    compress, dense_masked = _split_masked(src)
    for name in compress:  # before any cast: a tiny non-zero must not round to zero unnoticed
        check_zeros(name, src.state[name], src.masks[name], src.description)
    structure = "2:4" if compress and all(layouts.is_24(src.masks[n]) for n in compress) else "unstructured"
    if format == AUTO:
        format = BITMASK_24 if structure == "2:4" else BITMASK
    if format == BITMASK_24:
        for name in compress:
            layouts.check_24(name, src.masks[name])
    tensors, sizes = _encode_all(src, compress, format, target_dtype)
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_NAME
    report = ExportReport(
        directory=directory, weights=weights, config=directory / CONFIG_NAME, format=format,
        sparsity_structure=structure, dtype=_dtype_name(target_dtype), layers=sizes,
        dense_masked=dense_masked, aliases=dict(src.aliases),
        masked_sparsity=_sparsity(src.masks, compress), global_sparsity=_global_sparsity(src),
        tensor_bytes=layouts.nbytes(tensors), dense_tensor_bytes=_dense_bytes(src, target_dtype),
    )
    section = _export_section(src, report)
    _atomic_save(tensors, weights, {"format": "pt", EXPORT_SECTION: json.dumps(section)})
    _write_config(report.config, report, section, model_config if model_config is not None else src.model_config)
    return report


def load_compressed(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The dense state dict of a folder (or its `model.safetensors`) written in a compressed-tensors sparse layout.

    The sparsity config in `config.json` is parsed by compressed-tensors' own config classes and
    the tensors are grouped and unpacked by its own helpers; tied names recorded at export get
    their tensor back. Reads any sparse-bitmask / sparse-24-bitmask folder, not only those this
    module wrote (shards listed in `model.safetensors.index.json` are found by compressed-tensors'
    mapping; only single files are tested).
    """
    from compressed_tensors.utils import get_nested_weight_mappings
    from safetensors import safe_open

    layouts.compressed_tensors()
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    config = read_sparsity_config(directory)
    format = config.format
    if format not in FORMATS:
        raise ValueError(f"{directory / CONFIG_NAME}: sparsity format {format!r} is not one of {', '.join(FORMATS)}")
    nested, others = get_nested_weight_mappings(str(directory), PARTS[format], return_unmatched_params=True)
    handles: dict[str, Any] = {}

    def read(name: str, file: str) -> Tensor:
        if file not in handles:
            handles[file] = safe_open(file, framework="pt", device="cpu")
        return handles[file].get_tensor(name)

    state: dict[str, Tensor] = {}
    for module, files in nested.items():
        parts = {part: read(f"{module}.{part}", file) for part, file in files.items()}
        state[f"{module}.weight"] = layouts.decode(parts, f"{directory}: {module}")
    for name, file in others.items():
        state[name] = read(name, file)
    sections = [json.loads((h.metadata() or {}).get(EXPORT_SECTION, "{}")) for h in handles.values()]
    if any(sections):  # written here: the config's targets must be exactly the compressed weights found
        _check_targets(config.targets or [], nested, directory)
    for section in sections:
        for alias, stored in section.get("aliases", {}).items():
            if stored in state:
                state[alias] = state[stored]
    return {name: tensor.to(device) for name, tensor in state.items()}


def read_sparsity_config(directory: str | os.PathLike):
    """compressed-tensors' SparsityCompressionConfig of a folder's `config.json` (errors name the file)."""
    from compressed_tensors.base import QUANTIZATION_CONFIG_NAME, SPARSITY_CONFIG_NAME
    from compressed_tensors.config import SparsityCompressionConfig

    file = Path(directory) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{str(file)!r} does not exist: not a compressed-tensors model folder")
    config = json.loads(file.read_text())
    sparsity = (config.get(QUANTIZATION_CONFIG_NAME) or {}).get(SPARSITY_CONFIG_NAME) or {}
    if not sparsity.get("format"):
        raise ValueError(f"{str(file)!r} has no {QUANTIZATION_CONFIG_NAME}.{SPARSITY_CONFIG_NAME}.format")
    if sparsity["format"] not in FORMATS:
        # checked before compressed-tensors sees it: its registry imports "module:name" strings, so a config's
        # format would otherwise choose code to import and call; here it is data, matched against two names
        raise ValueError(f"{str(file)!r}: sparsity format {sparsity['format']!r} is not one of {', '.join(FORMATS)}; "
                         "nothing named in a config is imported or run")
    try:
        return SparsityCompressionConfig.load_from_registry(sparsity["format"], **sparsity)
    except Exception as err:  # the registry raises KeyError/ValueError for an unknown name
        raise ValueError(f"{str(file)!r}: compressed-tensors cannot parse sparsity config {sparsity}: {err}") from err


def check_zeros(name: str, weight: Tensor, mask: Tensor, where: str = "the model") -> None:
    """Raise a ValueError naming the layer, the count and the first index/value where a pruned weight is not zero."""
    mask = mask.to(weight.device)
    alive = (weight != 0) & ~mask  # NaN counts as not zero
    count = int(alive.sum())
    if not count:
        return
    index = tuple(int(i) for i in alive.nonzero()[0])
    raise ValueError(
        f"{where}: layer {name!r} has {count} non-zero weight(s) where its mask prunes (first at {index}: "
        f"{weight[index].item()!r}); the masks were not applied to these weights (PruningResult.apply zeroes "
        "them) or belong to other weights. Nothing was written."
    )


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch floating dtype from a dtype or its name ("bf16", "fp16", "fp32"...); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype} is not a floating-point dtype")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def _split_masked(src: Source) -> tuple[list[str], dict[str, str]]:
    """Masked tensors to compress (in state order), and those kept dense with the reason."""
    compress: list[str] = []
    dense: dict[str, str] = {}
    for name, tensor in src.state.items():
        if name not in src.masks:
            continue
        mask = src.masks[name]
        if not name.endswith(".weight"):
            dense[name] = "compressed-tensors names compressed weights <module>.weight only"
        elif tensor.dim() != 2 or not tensor.is_floating_point():
            dense[name] = f"not a 2-D floating-point weight ({tensor.dim()}-D {tensor.dtype})"
        elif bool(mask.all()):
            dense[name] = "nothing pruned"
        else:
            compress.append(name)
    return compress, dense


def _encode_all(src: Source, compress: list[str], format: str, dtype: torch.dtype | None
                ) -> tuple[dict[str, Tensor], dict[str, LayerSize]]:
    """The file's tensors (compressed parts + dense tensors) and the size of each compressed layer."""
    out: dict[str, Tensor] = {}
    sizes: dict[str, LayerSize] = {}
    compressed = set(compress)
    for name, tensor in src.state.items():
        tensor = _cast(tensor, dtype).cpu()
        if name not in compressed:
            _check_dense_name(name, src.description)
            out[name] = tensor.contiguous()
            continue
        module = name[: -len(".weight")]
        parts = layouts.encode(format, tensor, src.masks[name])
        for part, value in parts.items():
            key = f"{module}.{part}"
            if key in src.state:
                raise ValueError(
                    f"{src.description}: compressed part {key!r} of {name!r} collides with a tensor of that name"
                )
            out[key] = value
        mask = src.masks[name]
        sizes[name] = LayerSize(
            shape=tuple(tensor.shape), dense_bytes=tensor.numel() * tensor.element_size(),
            compressed_bytes=layouts.nbytes(parts), sparsity=1.0 - mask.float().mean().item(),
        )
    return out, sizes


def _check_dense_name(name: str, where: str) -> None:
    """A dense tensor named like a compressed part would be read back as one: refuse it, naming it."""
    if name.rsplit(".", 1)[-1] in layouts.ALL_PARTS and "." in name:
        raise ValueError(
            f"{where}: tensor {name!r} ends with a compressed-tensors part name ({', '.join(layouts.ALL_PARTS)}); "
            "compressed-tensors would read it as part of a compressed weight"
        )


def _check_targets(targets: list[str], nested: Mapping[str, Any], directory: Path) -> None:
    """The sparsity config's `targets` (module names, as written here) must be the compressed weights the file holds."""
    found, listed = set(nested), set(targets)
    if found == listed:
        return
    raise ValueError(
        f"{directory}: the sparsity config and the weights disagree: targets without a compressed weight "
        f"{sorted(listed - found)[:SHOWN]}, compressed weights not in targets {sorted(found - listed)[:SHOWN]}"
    )


def _same_dir(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _sparsity(masks: Mapping[str, Tensor], names: list[str]) -> float:
    total = sum(masks[n].numel() for n in names)
    kept = sum(int(masks[n].sum()) for n in names)
    return 1.0 - kept / total if total else 0.0


def _global_sparsity(src: Source) -> float:
    """Pruned weights over every floating-point weight exported (compressed-tensors' `global_sparsity`)."""
    total = sum(t.numel() for t in src.state.values() if t.is_floating_point())
    pruned = sum(int((~m).sum()) for n, m in src.masks.items() if src.state[n].is_floating_point())
    return pruned / total if total else 0.0


def _dense_bytes(src: Source, dtype: torch.dtype | None) -> int:
    """Bytes of every exported tensor stored dense, in the exported dtype."""
    size = 0
    for tensor in src.state.values():
        element = torch.empty((), dtype=dtype).element_size() if dtype is not None and tensor.is_floating_point() \
            else tensor.element_size()
        size += tensor.numel() * element
    return size


def _export_section(src: Source, report: ExportReport) -> dict[str, Any]:
    """What config.json and the file's metadata say about this export (for people and for `load_compressed`)."""
    return {
        "format": EXPORT_FORMAT,
        "version": _package_version(),
        "source": src.description,
        "masks": src.mask_info,
        "dtype": report.dtype,
        "masked_sparsity": report.masked_sparsity,
        "compressed_layers": len(report.layers),
        "dense_masked": report.dense_masked,
        "aliases": report.aliases,
    }


def _write_config(file: Path, report: ExportReport, section: dict[str, Any], model_config: Mapping[str, Any] | None
                  ) -> None:
    """config.json: the model config (or the file already there) with compressed-tensors' quantization_config."""
    import compressed_tensors
    from compressed_tensors.base import (COMPRESSION_VERSION_NAME, QUANTIZATION_CONFIG_NAME, QUANTIZATION_METHOD_NAME,
                                         SPARSITY_CONFIG_NAME, TRANSFORM_CONFIG_NAME)
    from compressed_tensors.config import SparsityCompressionConfig

    sparsity = SparsityCompressionConfig.load_from_registry(
        report.format, targets=report.targets, ignore=[], global_sparsity=report.global_sparsity,
        sparsity_structure=report.sparsity_structure,
    )
    if file.is_file():
        config = json.loads(file.read_text())
    else:
        config = dict(model_config or {})
    config[QUANTIZATION_CONFIG_NAME] = {
        COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        QUANTIZATION_METHOD_NAME: "compressed-tensors",
        SPARSITY_CONFIG_NAME: sparsity.model_dump(),
        TRANSFORM_CONFIG_NAME: {},
    }
    config[EXPORT_SECTION] = section
    _atomic_write_text(file, json.dumps(config, indent=2, sort_keys=True, default=str))


def _atomic_save(tensors: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """safetensors `save_file` under a temporary name in the same folder, then renamed over `path`."""
    atomic_save_file(tensors, path, metadata)


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _package_version() -> str:
    from ..pruning.result import package_version

    return package_version()
