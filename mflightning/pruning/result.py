"""PruningResult: the masks of one pruning run, with what is needed to apply, save, report and re-threshold.

(About 400 lines, on purpose: one dataclass whose methods are a result's whole API, figures,
report, re-threshold, apply and the file format, kept together so the format and its reader
cannot drift apart. Name matching and coverage live in `naming.py`.)
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .allocation import compute_masks, parse_pattern, pattern_masks
from .checksum import KEY as CHECKSUM_KEY, tensors_checksum, verify_checksum
from .files import atomic_save_file
from .config import check_sparsity
from .weights import carried_at, check_carried_weights, write_weights
from .naming import _add_inherited, _match_names, copy_sources, declared_copies, prunable_layers  # noqa: F401  (prunable_layers re-exported)

FORMAT = "mflightning-masks/1"
# How many names an error or a warning lists before giving only the count.
SHOWN = 5


@dataclass
class PruningResult:
    """Boolean masks (True = kept) keyed by parameter name, plus their provenance.

    `scores` and `magnitudes` are kept (on CPU) only when the run asked for them; they allow
    `.at(sparsity)` to re-threshold without recalibrating.

    Every sparsity figure counts the masked weights only. `exclude` holds the run's own `exclude`
    regexes (on the pruned model's names; a preset's exclusions come with `preset`), and
    `dense_layers` the prunable weights the run left dense (name -> number of weights; None when
    unknown, e.g. a file written before it was recorded), so the figures can say what they leave out.
    `source` is the file the result was loaded from, for error messages.
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
    exclude: tuple[str, ...] = ()
    dense_layers: dict[str, int] | None = None
    source: str | None = field(default=None, compare=False)
    pattern: str | None = None  # "N:M" when every row keeps N of each M consecutive inputs
    # new values of the masked weights, from methods that update the kept ones (SparseGPT, CHITA):
    # `apply` writes them, files hold them, `at` refuses to re-threshold (see `weights.py`)
    weights: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if not self.version:
            self.version = package_version()
        missing = set(self.masks) ^ set(self.groups)
        if missing:
            raise ValueError(f"masks and groups name different layers: {sorted(missing)[:5]}")
        check_carried_weights(self)

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

    @property
    def num_layers(self) -> int:
        """How many layers the sparsity figures count (the masked ones)."""
        return len(self.masks)

    @property
    def num_weights(self) -> int:
        """How many weights the sparsity figures count (those of the masked layers)."""
        return sum(m.numel() for m in self.masks.values())

    def coverage(self) -> str:
        """What the sparsity figures count and what they leave out, in words."""
        counted = f"over {self.num_layers} masked layers / {self.num_weights:,d} weights"
        if self.dense_layers is None:
            return counted + " (the masked layers only; layers left dense were not recorded)"
        if not self.dense_layers:
            return counted + " (every prunable layer of the pruned model)"
        dense = sum(self.dense_layers.values())
        return (
            f"{counted}; {len(self.dense_layers)} prunable layer(s) / {dense:,d} weights left dense "
            f"(exclude) are not counted"
        )

    def summary(self) -> str:
        """One line: method, allocation, target and realised sparsity, and what the figure counts."""
        return (
            f"method={self.method} {f'pattern={self.pattern}' if self.pattern else f'allocation={self.allocation}'} "
            f"invert={self.invert} "
            f"target={self.target_sparsity:.4f} realised={self.sparsity:.4f} {self.coverage()}"
        )

    def report(self) -> str:
        """A per-layer and per-group table of sizes and realised sparsity, under the summary line."""
        width = max(len(n) for n in self.masks) if self.masks else 10
        lines = [
            self.summary(),
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
        lines.append(f"{'total':<8} {self.num_layers:>6} {self.num_weights:>13,d} {self.sparsity:>8.4f}")
        if self.dense_layers:
            shown = ", ".join(list(self.dense_layers)[:SHOWN])
            more = f" and {len(self.dense_layers) - SHOWN} more" if len(self.dense_layers) > SHOWN else ""
            lines.append(f"{'dense':<8} {len(self.dense_layers):>6} {sum(self.dense_layers.values()):>13,d}"
                         f"   not counted: {shown}{more}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ re-threshold
    def at(self, sparsity: float | None = None, *, pattern: str | None = None) -> "PruningResult":
        """A new result at another sparsity, or another N:M `pattern`, from the stored scores (no recalibration).

        Masks made with a pattern keep it: their sparsity is the pattern's, so another sparsity
        is refused unless a new `pattern` is given.

        IterSNIP refuses any sparsity but its own: its scores are those of the last of rounds whose
        schedule was set by the original sparsity. The weights earlier rounds zeroed score 0 and
        ties are pruned, so any threshold prunes at least what those rounds did (a lower sparsity is
        not reachable), and a higher one would not be IterSNIP's schedule either.
        """
        if pattern is not None:
            n, m = parse_pattern(pattern)
            sparsity = 1.0 - n / m
        elif sparsity is None:
            raise ValueError("at() needs a sparsity or a pattern")
        sparsity = check_sparsity(sparsity)
        if self.weights is not None:  # solved for its own sparsity: the same one or an error
            return carried_at(self, sparsity, pattern)
        if self.pattern is not None and pattern is None and not math.isclose(sparsity, self.target_sparsity, abs_tol=1e-12):
            raise ValueError(
                f"{self._where()} follow the N:M pattern {self.pattern!r}, whose sparsity is fixed at "
                f"{self.target_sparsity:g}; pass pattern='N:M' for another pattern"
            )
        if self.method == "itersnip" and not math.isclose(sparsity, self.target_sparsity, rel_tol=0.0, abs_tol=1e-12):
            raise ValueError(
                f"{self._where()}: IterSNIP masks cannot be re-thresholded from sparsity {self.target_sparsity} "
                f"to {sparsity}: its scores depend on the round schedule of the original sparsity; re-run "
                f"prune(method='itersnip', sparsity={sparsity})"
            )
        if self.scores is None:
            raise ValueError(
                "this PruningResult holds no scores (a mask-only file?); prune with keep_scores=True "
                "or load a file saved with include_scores=True"
            )
        pattern = pattern or self.pattern
        if pattern is not None:
            masks = pattern_masks(self.scores, pattern)
        else:
            masks = compute_masks(self.scores, sparsity, self.allocation, groups=self.groups, magnitudes=self.magnitudes)
        return replace(self, masks=masks, target_sparsity=sparsity, pattern=pattern and "%d:%d" % parse_pattern(pattern))

    # ------------------------------------------------------------------ model
    def masks_for(
        self,
        model: nn.Module,
        *,
        prefix: str | None = None,
        exclude: Iterable[str] = (),
        partial: bool = False,
    ) -> dict[str, Tensor]:
        """The masks keyed by `model`'s parameter names, checked against their shapes and coverage.

        Handles a common prefix between the names the masks were computed on and the model's
        (a mask file of a bare backbone applied to a task module holding it as `backbone`), and
        the preset's `inherit` rules (a layer copy taking the mask of the layer it was copied from).

        Args:
            prefix: what the model puts in front of the mask names ("" for nothing); needed when the
                model holds several copies of the masked layers (`teacher.*`, `student.*`). None
                finds it: the exact names when they all exist, else the one prefix that fits.
            exclude: regexes of the model's layers kept dense on purpose (besides the preset's and
                the pruning run's own exclusions), so the coverage check does not ask for them.
            partial: allow masks that cover only some of the model's prunable layers; by default
                that is an error, since the uncovered layers stay dense and every sparsity figure
                would silently count the masked layers only.
        """
        params = dict(model.named_parameters())
        copies = tuple(declared_copies(model))  # masked by rule from their sources: never a place for the masks
        if copies and prefix and prefix.startswith(copies):
            raise ValueError(f"prefix {prefix!r} names a declared copy ({', '.join(copies)}): its masks follow from "
                             "its source; give the source's prefix")
        candidates = {n: p for n, p in params.items() if not n.startswith(copies)} if copies else params
        strip, add = _match_names(list(self.masks), candidates, prefix, self._where())
        resolved = {add + name[len(strip):]: mask for name, mask in self.masks.items()}
        preset_name = getattr(model, "pruning_preset", None) or self.preset
        if preset_name:
            _add_inherited(preset_name, params, resolved)
        for name, mask in resolved.items():
            shape = tuple(params[name].shape)
            if tuple(mask.shape) != shape:
                raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)} but the model's parameter has {shape}")
        if not partial:
            self._check_coverage(model, resolved, preset_name, tuple(exclude), strip, add)
        return resolved

    def apply(
        self,
        model: nn.Module,
        *,
        prefix: str | None = None,
        exclude: Iterable[str] = (),
        partial: bool = False,
    ) -> dict[str, Tensor]:
        """Zero the pruned weights of `model` in place; returns the masks keyed by its parameter names.

        A result that carries updated weights (SparseGPT, CHITA) writes them first. The copies
        `model` declares (`pruning_copies`, e.g. momentum encoders) are zeroed with their sources'
        masks too (and take their updated weights; they are not in the returned masks). `prefix`,
        `exclude` and `partial` are those of `masks_for`.
        """
        resolved = self.masks_for(model, prefix=prefix, exclude=exclude, partial=partial)
        self.write_weights(model, prefix=prefix, exclude=exclude, partial=partial)
        apply_masks(model, resolved)
        rules = declared_copies(model)
        if rules:
            names = [n for n, _ in model.named_parameters()]
            sources = copy_sources(names, rules, lambda n: n in resolved, where=type(model).__name__)
            apply_masks(model, {copy: resolved[source] for copy, source in sources.items()})
        return resolved

    def write_weights(
        self, model: nn.Module, *, prefix: str | None = None, exclude: Iterable[str] = (), partial: bool = False
    ) -> None:
        """Write the carried weights (SparseGPT, CHITA) into `model`, and into the copies it declares; no-op without."""
        carried = self.weights_for(model, prefix=prefix, exclude=exclude, partial=partial)
        if carried is None:
            return
        rules = declared_copies(model)
        if rules:
            names = [n for n, _ in model.named_parameters()]
            sources = copy_sources(names, rules, lambda n: n in carried, where=type(model).__name__)
            carried.update({copy: carried[source] for copy, source in sources.items()})
        write_weights(model, carried)

    def weights_for(
        self, model: nn.Module, *, prefix: str | None = None, exclude: Iterable[str] = (), partial: bool = False
    ) -> dict[str, Tensor] | None:
        """The carried weights keyed by `model`'s parameter names (as `masks_for` names the masks); None if none."""
        if self.weights is None:
            return None
        # named exactly as the masks are: the same resolution with the weights in the masks' place
        as_masks = replace(self, masks=self.weights, weights=None, scores=None, magnitudes=None, method="weights")
        return as_masks.masks_for(model, prefix=prefix, exclude=exclude, partial=partial)

    def _check_coverage(
        self,
        model: nn.Module,
        resolved: Mapping[str, Tensor],
        preset: str | None,
        exclude: tuple[str, ...],
        strip: str,
        add: str,
    ) -> None:
        """Raise, naming them, if prunable layers of `model` get no mask.

        The prunable layers are those `prune(model, modalities=preset, exclude=exclude)` would
        mask, less the pruning run's own exclusions: its `exclude` regexes are matched against the
        model's names and against those names taken back to the masks' naming (prefix undone).
        """
        own = [re.compile(p) for p in self.exclude]

        def excluded_by_the_run(name: str) -> bool:
            names = [name]
            if name.startswith(add):
                names.append(strip + name[len(add):])
            return any(p.search(n) for p in own for n in names)

        prunable = prunable_layers(model, preset, exclude)
        uncovered = [n for n in prunable if n not in resolved and not excluded_by_the_run(n)]
        if not uncovered:
            return
        shown = uncovered[:SHOWN]
        more = f" and {len(uncovered) - SHOWN} more" if len(uncovered) > SHOWN else ""
        raise ValueError(
            f"{self._where()} cover only part of the model: {len(uncovered)} of its {len(prunable)} prunable "
            f"layers get no mask ({shown}{more}), so they would stay dense and be left out of every sparsity "
            "figure; pass exclude=[regex, ...] for layers kept dense on purpose, or partial=True to apply "
            "these masks anyway"
        )

    def _where(self) -> str:
        """How errors name these masks: by their file when loaded from one."""
        return f"the masks of {self.source!r}" if self.source else "the masks"

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike, include_scores: bool = False) -> Path:
        """Write a safetensors file: masks (+ scores/magnitudes if asked; + the solved weights of
        SparseGPT / CHITA, always, which have no scores) and JSON metadata.

        The file is written under a temporary name in the same folder and then renamed over
        `path` (`os.replace`, atomic), so an interrupted save never leaves a truncated file where a
        good one was, nor a temporary file behind.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"mask/{n}": m.detach().to("cpu", torch.bool).contiguous() for n, m in self.masks.items()}
        if self.weights is not None:  # always: masks of a weight-updating method are meaningless without them
            tensors.update({f"weight/{n}": w.detach().cpu().contiguous() for n, w in self.weights.items()})
        if include_scores and not (self.scores is None and self.weights is not None):  # solved weights: no scores
            if self.scores is None:
                raise ValueError("include_scores=True but this result holds no scores")
            tensors.update({f"score/{n}": s.detach().float().cpu().contiguous() for n, s in self.scores.items()})
            if self.magnitudes is not None:
                tensors.update(
                    # OMP's scores are its magnitudes (one tensor): safetensors needs separate storage
                    {f"magnitude/{n}": _own_storage(m, self.scores.get(n)) for n, m in self.magnitudes.items()}
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
            "pattern": self.pattern or "",
            "exclude": json.dumps(list(self.exclude)),
            "counted": json.dumps({"layers": self.num_layers, "weights": self.num_weights}),
        }
        if self.dense_layers is not None:
            metadata["dense_layers"] = json.dumps(self.dense_layers)
        metadata[CHECKSUM_KEY] = tensors_checksum(tensors)  # checked by `load`: corrupted bytes are caught
        atomic_save_file(tensors, path, metadata, sync=True)
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
        verify_checksum(str(path), metadata, tensors)
        groups = json.loads(metadata["groups"])
        masks = {k[5:]: v.bool() for k, v in tensors.items() if k.startswith("mask/")}
        scores = {k[6:]: v for k, v in tensors.items() if k.startswith("score/")} or None
        magnitudes = {k[10:]: v for k, v in tensors.items() if k.startswith("magnitude/")} or None
        weights = {k[7:]: v for k, v in tensors.items() if k.startswith("weight/")} or None
        if set(masks) != set(groups):
            raise ValueError(f"{str(path)!r}: masks and group metadata name different layers")
        dense_layers = metadata.get("dense_layers")
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
            pattern=metadata.get("pattern") or None,
            exclude=tuple(json.loads(metadata.get("exclude", "[]"))),
            dense_layers=None if dense_layers is None else json.loads(dense_layers),
            source=str(path),
            weights=weights,
        )


def _own_storage(tensor: Tensor, other: Tensor | None) -> Tensor:
    """`tensor` as a contiguous fp32 CPU tensor that shares no memory with `other`."""
    out = tensor.detach().float().cpu().contiguous()
    if other is not None and out.data_ptr() == other.detach().float().cpu().contiguous().data_ptr():
        out = out.clone()
    return out


def package_version() -> str:
    """The installed mflightning version, written into mask files (read from the package metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mflightning")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Zero, in place, the entries of each named parameter where its mask is False.

    A parameter that is an inference tensor (the model was built under `torch.inference_mode()`)
    can only be written inside inference mode, so it is zeroed there.
    """
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            param = params[name]
            if param.is_inference() and not torch.is_inference_mode_enabled():
                with torch.inference_mode():
                    param.mul_(mask.to(param.device))
            else:
                param.mul_(mask.to(param.device))
