"""PruningResult: the masks of one pruning run, with what is needed to apply, save, report and re-threshold."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .allocation import compute_masks

FORMAT = "mflightning-masks/1"


@dataclass
class PruningResult:
    """Boolean masks (True = kept) keyed by parameter name, plus their provenance.

    `scores` and `magnitudes` are kept (on CPU) only when the run asked for them; they allow
    `.at(sparsity)` to re-threshold without recalibrating.
    """

    masks: dict[str, Tensor]
    groups: dict[str, str]
    method: str
    target_sparsity: float
    allocation: str
    invert: bool = False
    preset: str | None = None
    calibration: dict = field(default_factory=dict)
    scores: dict[str, Tensor] | None = None
    magnitudes: dict[str, Tensor] | None = None
    version: str = ""

    def __post_init__(self) -> None:
        if not self.version:
            from mflightning import __version__

            self.version = __version__
        missing = set(self.masks) ^ set(self.groups)
        if missing:
            raise ValueError(f"masks and groups name different layers: {sorted(missing)[:5]}")

    # ------------------------------------------------------------------ figures
    @property
    def ratios(self) -> dict[str, float]:
        """Realised sparsity of each layer."""
        return {name: 1.0 - m.float().mean().item() for name, m in self.masks.items()}

    @property
    def sparsity(self) -> float:
        """Realised sparsity over all prunable weights."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def group_sparsity(self) -> dict[str, float]:
        """Realised sparsity per modality group."""
        total: dict[str, int] = {}
        kept: dict[str, int] = {}
        for name, m in self.masks.items():
            g = self.groups[name]
            total[g] = total.get(g, 0) + m.numel()
            kept[g] = kept.get(g, 0) + int(m.sum())
        return {g: 1.0 - kept[g] / total[g] for g in total}

    def report(self) -> str:
        """A per-layer and per-group table of sizes and realised sparsity."""
        width = max(len(n) for n in self.masks) if self.masks else 10
        lines = [
            f"method={self.method} allocation={self.allocation} invert={self.invert} "
            f"target={self.target_sparsity:.4f} realised={self.sparsity:.4f}",
            f"{'layer':<{width}}  {'group':<8} {'shape':>14} {'weights':>11} {'sparsity':>8}",
        ]
        for name, m in self.masks.items():
            shape = "x".join(str(d) for d in m.shape)
            lines.append(
                f"{name:<{width}}  {self.groups[name]:<8} {shape:>14} {m.numel():>11,d} {1 - m.float().mean().item():>8.4f}"
            )
        lines.append("")
        lines.append(f"{'group':<8} {'layers':>6} {'weights':>13} {'sparsity':>8}")
        per_group = self.group_sparsity()
        for g, s in per_group.items():
            names = [n for n in self.masks if self.groups[n] == g]
            numel = sum(self.masks[n].numel() for n in names)
            lines.append(f"{g:<8} {len(names):>6} {numel:>13,d} {s:>8.4f}")
        total = sum(m.numel() for m in self.masks.values())
        lines.append(f"{'total':<8} {len(self.masks):>6} {total:>13,d} {self.sparsity:>8.4f}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ re-threshold
    def at(self, sparsity: float) -> "PruningResult":
        """A new result at another sparsity from the stored scores (no recalibration)."""
        from .engine import check_sparsity

        check_sparsity(sparsity)
        if self.scores is None:
            raise ValueError(
                "this PruningResult holds no scores (a mask-only file?); prune with keep_scores=True "
                "or load a file saved with include_scores=True"
            )
        masks = compute_masks(
            self.scores, sparsity, self.allocation, groups=self.groups, magnitudes=self.magnitudes
        )
        return replace(self, masks=masks, target_sparsity=sparsity)

    # ------------------------------------------------------------------ model
    def masks_for(self, model: nn.Module) -> dict[str, Tensor]:
        """The masks keyed by `model`'s parameter names, checked against their shapes.

        Handles a common prefix between the names the masks were computed on and the model's
        (a mask file of a bare backbone applied to a task module holding it as `backbone`), and
        the preset's `inherit` rules (a layer copy taking the mask of the layer it was copied from).
        """
        params = dict(model.named_parameters())
        mapping = _match_names(list(self.masks), params)
        resolved = {mapping[name]: mask for name, mask in self.masks.items()}
        preset_name = getattr(model, "pruning_preset", None) or self.preset
        if preset_name:
            from .presets import get_preset

            for pattern, replacement in get_preset(preset_name).inherit:
                regex = re.compile(pattern)
                for name in params:
                    if name in resolved or not regex.search(name):
                        continue
                    source = regex.sub(replacement, name)
                    if source in resolved:
                        resolved[name] = resolved[source]
        for name, mask in resolved.items():
            shape = tuple(params[name].shape)
            if tuple(mask.shape) != shape:
                raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)} but the model's parameter has {shape}")
        return resolved

    def apply(self, model: nn.Module) -> dict[str, Tensor]:
        """Zero the pruned weights of `model` in place; returns the masks keyed by its parameter names."""
        resolved = self.masks_for(model)
        apply_masks(model, resolved)
        return resolved

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike, include_scores: bool = False) -> Path:
        """Write a safetensors file: masks (+ scores/magnitudes if asked) and JSON metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"mask/{n}": m.detach().to("cpu", torch.bool).contiguous() for n, m in self.masks.items()}
        if include_scores:
            if self.scores is None:
                raise ValueError("include_scores=True but this result holds no scores")
            tensors.update({f"score/{n}": s.detach().float().cpu().contiguous() for n, s in self.scores.items()})
            if self.magnitudes is not None:
                tensors.update(
                    {f"magnitude/{n}": m.detach().float().cpu().contiguous() for n, m in self.magnitudes.items()}
                )
        metadata = {
            "format": FORMAT,
            "method": self.method,
            "target_sparsity": repr(self.target_sparsity),
            "sparsity": repr(self.sparsity),
            "allocation": self.allocation,
            "invert": json.dumps(self.invert),
            "preset": self.preset or "",
            "groups": json.dumps(self.groups),
            "group_sparsity": json.dumps(self.group_sparsity()),
            "calibration": json.dumps(self.calibration),
            "version": self.version,
        }
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PruningResult":
        """Read a file written by `save`; errors name the file and what is wrong with it."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"mask file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as err:  # safetensors raises several error types for a bad header
            raise ValueError(f"{str(path)!r} is not a readable safetensors mask file: {err}") from err
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not an mflightning mask file (format {metadata.get('format')!r})")
        groups = json.loads(metadata["groups"])
        masks = {k[5:]: v.bool() for k, v in tensors.items() if k.startswith("mask/")}
        scores = {k[6:]: v for k, v in tensors.items() if k.startswith("score/")} or None
        magnitudes = {k[10:]: v for k, v in tensors.items() if k.startswith("magnitude/")} or None
        if set(masks) != set(groups):
            raise ValueError(f"{str(path)!r}: masks and group metadata name different layers")
        return cls(
            masks=masks,
            groups=groups,
            method=metadata["method"],
            target_sparsity=float(metadata["target_sparsity"]),
            allocation=metadata["allocation"],
            invert=json.loads(metadata["invert"]),
            preset=metadata.get("preset") or None,
            calibration=json.loads(metadata.get("calibration", "{}")),
            scores=scores,
            magnitudes=magnitudes,
            version=metadata.get("version", ""),
        )


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Zero, in place, the entries of each named parameter where its mask is False."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            param = params[name]
            param.mul_(mask.to(param.device))


def _match_names(names: list[str], params: Mapping[str, Tensor]) -> dict[str, str]:
    """Map mask names onto the model's parameter names, allowing one common prefix added or stripped."""
    if all(n in params for n in names):
        return {n: n for n in names}
    candidates: list[tuple[str, str]] = []  # (prefix to strip from the mask name, prefix to add)
    probe = names[0]
    for pname in params:
        if pname.endswith("." + probe):
            candidates.append(("", pname[: -len(probe)]))
    parts = probe.split(".")
    for i in range(1, len(parts)):
        stripped = ".".join(parts[i:])
        if stripped in params:
            candidates.append((".".join(parts[:i]) + ".", ""))
        for pname in params:
            if pname.endswith("." + stripped) and pname != stripped:
                candidates.append((".".join(parts[:i]) + ".", pname[: -len(stripped)]))
    for strip, add in dict.fromkeys(candidates):
        mapped = {}
        for n in names:
            if not n.startswith(strip) or (add + n[len(strip):]) not in params:
                break
            mapped[n] = add + n[len(strip):]
        else:
            return mapped
    missing = [n for n in names if n not in params]
    raise ValueError(
        f"masks do not match the model: {len(missing)} of {len(names)} mask names are not parameters of it "
        f"(first: {missing[:3]}), and no common name prefix fixes that"
    )
