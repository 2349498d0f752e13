"""Layer-wise sparsity per modality (like the paper's Figure 4), drawn on matplotlib's Agg canvas (the global backend is left alone)."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from mflightning.pruning import PruningResult

_BLOCK = re.compile(r"\.(?:layers?|blocks?|h)\.(\d+)\.")


def layer_sparsity(result: PruningResult) -> dict[str, list[tuple[str, float]]]:
    """Per modality group: (layer name, realised sparsity) of its prunable layers, in model order."""
    out: dict[str, list[tuple[str, float]]] = {}
    for name, mask in result.masks.items():
        out.setdefault(result.groups[name], []).append((name, 1.0 - mask.float().mean().item()))
    return out


def short_layer_name(name: str) -> str:
    """`vision_model.encoder.layers.1.mlp.fc2.weight` -> `L1 mlp.fc2` (block index and the layer's own name)."""
    match = _BLOCK.search(name)
    tail = name.removesuffix(".weight")
    if match is None:
        return ".".join(tail.split(".")[-2:])
    inner = tail[match.end():]
    origin = "dec " if "decoder" in name[: match.start()] else ""
    return f"{origin}L{match.group(1)} {inner}"


def plot_layer_sparsity(
    results: PruningResult | Mapping[str, PruningResult],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Write a PNG: one panel per modality, sparsity of each prunable layer (x: layers in model order).

    `results` may map a label (e.g. "MultiFlow", "w/o multimodality") to a result, drawing one line
    per label as in Figure 4 of the paper; all results must share the same layers.
    """
    # a Figure drawn on its own Agg canvas: pyplot and the process-wide backend stay as the caller has them
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(results, PruningResult):
        results = {results.method: results}
    if not results:
        raise ValueError("plot_layer_sparsity needs at least one PruningResult")
    per_label = {label: layer_sparsity(r) for label, r in results.items()}
    first = next(iter(per_label.values()))
    for label, groups in per_label.items():
        if {g: [n for n, _ in v] for g, v in groups.items()} != {g: [n for n, _ in v] for g, v in first.items()}:
            raise ValueError(f"result {label!r} prunes other layers than {next(iter(per_label))!r}")
    group_names = list(first)
    width = max(5.0, min(16.0, 0.28 * max(len(v) for v in first.values()) + 3))
    fig = Figure(figsize=(width, 3.2 * len(group_names)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(group_names), 1, squeeze=False)
    for ax, group in zip(axes[:, 0], group_names):
        names = [n for n, _ in first[group]]
        xs = range(len(names))
        for label, groups in per_label.items():
            values = [s for _, s in groups[group]]
            ax.plot(xs, values, marker="o", markersize=3, linewidth=1.2, label=label)
        target = next(iter(results.values())).target_sparsity
        ax.axhline(target, color="gray", linestyle=":", linewidth=1, label=f"target {target:.0%}")
        ax.set_title(f"{group} ({len(names)} layers)")
        ax.set_ylabel("sparsity")
        ax.set_ylim(0.0, 1.02)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([short_layer_name(n) for n in names], rotation=70, ha="right", fontsize=6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title or "Layer-wise sparsity per modality")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


__all__ = ["layer_sparsity", "plot_layer_sparsity", "short_layer_name"]
