"""File sizes of the compressed export at BLIP-base shapes: unstructured OMP at several sparsities, and 2:4.

The model is `BlipBackbone` with transformers' default `BlipConfig` (BLIP-base: ViT-B/16 at 384 px,
12 vision layers, a 12-layer BERT-base text encoder with cross-attention, a decoder sharing the
encoder's cross-attention and FFN as in BLIP pretraining, word embeddings 30524 x 768, the tied
LM head) with random weights: sizes depend on shapes and masks, not on values. Every Linear
weight is drawn from N(0, 0.02), so global OMP prunes each layer about equally. Masks are
computed in fp32 (bf16 magnitudes would tie at the threshold) and the export casts to `dtype`.

For each setting the bench writes the dense safetensors file (same tensors, same dtype, tied
names once) and the compressed folder, reads the folder back through `load_compressed` and checks
the masked layers are bit-exact, then reports: the compressed layers' bytes over their dense bytes
(`layer_ratio`), the floor of the bitmask layout (kept values + 1 bit per weight), and the whole
file over the dense file (`file_ratio`: embeddings, norms, biases and dense heads included).
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .layouts import BITMASK, BITMASK_24
from .sources import dedupe_aliases
from .writer import WEIGHTS_NAME, ExportReport, export_compressed, load_compressed

SPARSITIES = (0.63, 0.75, 0.9)
TARGET = 0.32  # the target for the compressed layers at 75% (bf16)
MIB = 1024 ** 2


@dataclass
class SizeRow:
    """One setting of the bench: the masks, the layout and what the files weigh."""

    setting: str
    format: str
    sparsity: float  # realised, over the masked layers
    layers: int
    dense_bytes: int
    compressed_bytes: int
    floor: float
    dense_file_bytes: int
    file_bytes: int
    export_s: float
    load_s: float
    by_shape: dict[str, float] = field(default_factory=dict)

    @property
    def layer_ratio(self) -> float:
        return self.compressed_bytes / self.dense_bytes

    @property
    def file_ratio(self) -> float:
        return self.file_bytes / self.dense_file_bytes


def blip_base_backbone(num_layers: int = 12, seed: int = 0) -> nn.Module:
    """A BLIP-base `BlipBackbone` (tied decoder) with N(0, 0.02) Linear weights; `num_layers` per tower."""
    from transformers import BlipConfig

    from ..models.blip import BlipBackbone

    config = BlipConfig(text_config={"num_hidden_layers": num_layers}, vision_config={"num_hidden_layers": num_layers})
    torch.manual_seed(seed)
    model = BlipBackbone(config, tie_decoder=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
    return model.eval()


def bench_sizes(
    workdir: str | os.PathLike | None = None,
    *,
    sparsities: Iterable[float] = SPARSITIES,
    two_four: bool = True,
    num_layers: int = 12,
    dtype: torch.dtype = torch.bfloat16,
    log: Callable[[str], None] = print,
) -> list[SizeRow]:
    """Export one BLIP-base backbone at each sparsity (OMP, global) and 2:4; one SizeRow per setting.

    Files go to `workdir` (a temporary folder, removed after, when None): about 0.45 GiB dense
    plus each compressed folder.
    """
    from ..pruning import apply_masks, prune

    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="mflightning-export-bench-") as temporary:
            return bench_sizes(temporary, sparsities=sparsities, two_four=two_four, num_layers=num_layers,
                               dtype=dtype, log=log)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = blip_base_backbone(num_layers)
    log(f"built BLIP-base backbone ({num_layers} layers per tower) in {time.perf_counter() - started:.0f} s")
    dense_file = write_dense(model, workdir / "dense" / WEIGHTS_NAME, dtype)
    params = dict(model.named_parameters())
    originals: dict[str, Tensor] = {}
    rows = []
    settings: list[tuple[str, float | None]] = [(f"OMP {s:.0%}", float(s)) for s in sparsities]
    if two_four:
        settings.append(("2:4 (magnitude)", None))
    for label, sparsity in settings:
        if sparsity is None:  # magnitude 2:4: the 2 largest |w| of every 4 consecutive inputs
            masks = dict(prune(model, pattern="2:4", method="omp").masks)
            format, folder = BITMASK_24, "two-four"
        else:
            masks = dict(prune(model, sparsity=sparsity, method="omp").masks)
            format, folder = BITMASK, f"omp-{sparsity:.2f}"
        for name in masks:  # the weights as built, put back after each setting
            originals.setdefault(name, params[name].detach().clone())
        apply_masks(model, masks)
        rows.append(_measure(model, masks, label, format, workdir / folder, dtype, dense_file))
        log(_line(rows[-1]))
        _restore(params, originals)
    return rows


def write_dense(model: nn.Module, path: Path, dtype: torch.dtype) -> int:
    """Write the model's tensors dense (tied names once, floating ones in `dtype`) as safetensors; its size."""
    from safetensors.torch import save_file

    unique, _ = dedupe_aliases(model.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: (t.to(dtype) if t.is_floating_point() else t).contiguous() for n, t in unique.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path.stat().st_size


def _measure(model: nn.Module, masks: Mapping[str, Tensor], label: str, format: str, directory: Path,
             dtype: torch.dtype, dense_file: int) -> SizeRow:
    """Export, read back (checking the masked layers bit-exact), and the sizes of one setting."""
    started = time.perf_counter()
    report = export_compressed(model, masks, directory, format=format, dtype=dtype)
    export_s = time.perf_counter() - started
    started = time.perf_counter()
    loaded = load_compressed(directory)
    load_s = time.perf_counter() - started
    params = dict(model.named_parameters())
    for name in report.layers:
        if not torch.equal(loaded[name], params[name].detach().to(dtype)):
            raise AssertionError(f"{directory}: {name} did not come back bit-exact")
    element = torch.empty((), dtype=dtype).element_size()
    kept = 1.0 - report.masked_sparsity if format == BITMASK else 0.5
    return SizeRow(
        setting=label, format=report.format, sparsity=report.masked_sparsity, layers=len(report.layers),
        dense_bytes=report.dense_bytes, compressed_bytes=report.compressed_bytes,
        floor=kept + 1.0 / (8 * element), dense_file_bytes=dense_file,
        file_bytes=(directory / WEIGHTS_NAME).stat().st_size, export_s=export_s, load_s=load_s,
        by_shape=_by_shape(report),
    )


def _by_shape(report: ExportReport) -> dict[str, float]:
    """Compressed over dense bytes per weight shape (out x in)."""
    dense: dict[str, int] = {}
    compressed: dict[str, int] = {}
    for layer in report.layers.values():
        key = "x".join(str(d) for d in layer.shape)
        dense[key] = dense.get(key, 0) + layer.dense_bytes
        compressed[key] = compressed.get(key, 0) + layer.compressed_bytes
    return {key: compressed[key] / dense[key] for key in sorted(dense)}


def _restore(params: Mapping[str, nn.Parameter], originals: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for name, value in originals.items():
            params[name].copy_(value)


def _line(row: SizeRow) -> str:
    return (f"{row.setting}: {row.format}, sparsity {row.sparsity:.4f}, layers {row.layer_ratio:.4f}x "
            f"(floor {row.floor:.4f}), file {row.file_ratio:.4f}x, export {row.export_s:.0f} s, "
            f"load {row.load_s:.0f} s")


def markdown_table(rows: list[SizeRow]) -> str:
    """The size table (and the per-shape ratios) in Markdown."""
    lines = [
        "| setting | format | realised sparsity | compressed layers | layers dense MiB | layers compressed MiB "
        "| layer ratio | floor | dense file MiB | compressed file MiB | file ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.setting} | `{r.format}` | {r.sparsity:.4f} | {r.layers} | {r.dense_bytes / MIB:.1f} "
            f"| {r.compressed_bytes / MIB:.1f} | **{r.layer_ratio:.4f}x** | {r.floor:.4f} "
            f"| {r.dense_file_bytes / MIB:.1f} "
            f"| {r.file_bytes / MIB:.1f} | **{r.file_ratio:.4f}x** |"
        )
    shapes = sorted({s for r in rows for s in r.by_shape}, key=lambda s: tuple(int(d) for d in s.split("x")))
    lines += ["", "| setting | " + " | ".join(shapes) + " |", "|---|" + "---:|" * len(shapes)]
    for r in rows:
        lines.append(f"| {r.setting} | " + " | ".join(f"{r.by_shape.get(s, float('nan')):.4f}" for s in shapes) + " |")
    return "\n".join(lines)


def machine() -> str:
    """The machine in one line: CPU, cores, Python, torch and compressed-tensors versions."""
    import compressed_tensors

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}, "
            f"compressed-tensors {compressed_tensors.__version__}")


def verdict(rows: list[SizeRow]) -> str:
    """Whether the 75% target (compressed layers at most 0.32x dense) is met, in one line."""
    at75 = [r for r in rows if r.format == BITMASK and abs(r.sparsity - 0.75) < 0.01]
    if not at75:
        return "no 75% row: target not measured"
    row = at75[0]
    met = "met" if row.layer_ratio <= TARGET else "NOT met"
    return f"75% target ({TARGET}x): {met} at {row.layer_ratio:.4f}x (floor {row.floor:.4f})"
