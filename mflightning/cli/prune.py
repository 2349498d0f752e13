"""`mflightning prune`: build the model and calibration data of a pruning recipe, prune once, write the results.

Writes into `output_dir`: `masks.safetensors`, `scores.safetensors` (masks + scores,
re-thresholdable), `report.txt` (`PruningResult.report()`), `report.json` (`report_dict`) and
the resolved `config.yaml`. Masks are computed on the bare backbone when the model holds one, so
their names do not depend on the task wrapper and they apply to every task module.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .paths import as_dict, require_paths
from .settings import PruningSettings

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")


@dataclass
class PruneOutputs:
    """What `mflightning prune` wrote."""

    output_dir: Path
    masks: Path
    scores: Path
    report_txt: Path
    report_json: Path
    result: Any  # PruningResult


def prune_parser():
    """jsonargparse parser of a pruning recipe: model, data, pruning, output_dir, device, precision."""
    from jsonargparse import ActionConfigFile, ArgumentParser
    from lightning.pytorch import LightningDataModule
    from torch import nn

    parser = ArgumentParser(prog="mflightning prune", description="Prune a model once from a recipe.")
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="recipe file (YAML)")
    parser.add_subclass_arguments(nn.Module, "model", help="the model to prune (e.g. mflightning.pretrain.PretrainModule)")
    parser.add_subclass_arguments(
        LightningDataModule, "data", required=False,
        help="datamodule offering calibration_dataloader() (omit for data-free methods: omp, lamp, random)",
    )
    parser.add_class_arguments(PruningSettings, "pruning", instantiate=False)
    parser.add_argument("--output_dir", type=str, required=True, help="folder for masks, scores and reports")
    parser.add_argument("--device", type=str, default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--precision", type=str, default="32-true",
                        help="calibration precision: 32-true, bf16-mixed or 16-mixed (autocast; stats stay fp32)")
    parser.add_argument("--progress", type=bool, default=True, help="show calibration progress bars")
    parser.add_argument("--seed_everything", type=int, default=0)
    return parser


def prune_settings(config: Mapping[str, Any]) -> PruningSettings:
    """The checked `pruning:` section of a parsed pruning recipe (and its precision), before anything is built."""
    settings = PruningSettings(**config.get("pruning") or {})
    settings.validate()
    if settings.sparsity is None:
        raise RecipeError("pruning.sparsity is required by `mflightning prune` (e.g. --pruning.sparsity 0.75)")
    if settings.masks is not None:
        raise RecipeError("pruning.masks is for fit/validate/test; `mflightning prune` computes masks")
    if config.get("precision") not in PRECISIONS:
        raise RecipeError(f"precision must be 32-true, bf16-mixed or 16-mixed, got {config.get('precision')!r}")
    return settings


def run_prune(args: list[str]) -> PruneOutputs:
    """`mflightning prune`: build model + calibration data, prune once, write masks, scores and reports."""
    import lightning as L

    from mflightning.pruning import prune

    parser = prune_parser()
    config = parser.parse_args(args)
    plain = as_dict(config)
    settings = prune_settings(plain)
    require_paths(plain)
    needs_data = settings.config.spec.data_driven  # activations or gradients (random only needs a seed)
    if needs_data and not plain.get("data"):
        raise RecipeError(f"method {settings.method!r} needs calibration data: add a data: section")

    L.seed_everything(config.seed_everything, verbose=False)
    init = parser.instantiate(config)
    module = init.model
    device = _device(config.device)
    module.to(device)
    calibration = _calibration_loader(init.data) if needs_data else None
    target, forward, loss = _pruning_target(module, config.precision, device)

    started = time.perf_counter()
    result = prune(
        target, settings.config, calibration=calibration, forward=forward, loss=loss, keep_scores=True,
        progress=config.progress,
    )
    seconds = time.perf_counter() - started
    outputs = write_outputs(result, Path(config.output_dir), seconds)
    (outputs.output_dir / "config.yaml").write_text(parser.dump(config))
    print(result.report())
    print(f"\n[mflightning] {settings.method} pruning took {seconds:.1f}s; wrote {outputs.masks}, {outputs.scores}, "
          f"{outputs.report_txt}, {outputs.report_json}")
    return outputs


def _calibration_loader(datamodule):
    """The calibration batches of the recipe's datamodule (an error names a datamodule without them)."""
    if not hasattr(datamodule, "calibration_dataloader"):
        raise RecipeError(f"data: {type(datamodule).__name__} has no calibration_dataloader()")
    return datamodule.calibration_dataloader()


def _pruning_target(module, precision: str, device):
    """(model to prune, forward, loss): the bare backbone when the module holds one, with the module's
    `calibration_step` and `pruning_loss` (when it has them) under the recipe's precision."""
    import torch

    target = module.backbone if isinstance(getattr(module, "backbone", None), torch.nn.Module) else module
    forward = None
    if hasattr(module, "calibration_step"):
        forward = lambda _model, batch: module.calibration_step(batch)  # noqa: E731
    loss = None
    if hasattr(module, "pruning_loss"):
        loss = lambda _model, batch: module.pruning_loss(batch)  # noqa: E731
    if target is not module:
        target.pruning_preset = getattr(target, "pruning_preset", None) or getattr(module, "pruning_preset", None)
    return target, _autocast(forward, precision, device), _autocast(loss, precision, device)


def write_outputs(result, out: Path, seconds: float | None = None) -> PruneOutputs:
    """Write the masks, the re-thresholdable scores and both reports of `result` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    outputs = PruneOutputs(
        output_dir=out,
        masks=result.save(out / "masks.safetensors"),
        # a weight-updating method (SparseGPT, CHITA) has no scores: its file holds masks and solved weights
        scores=result.save(out / "scores.safetensors", include_scores=result.scores is not None),
        report_txt=out / "report.txt",
        report_json=out / "report.json",
        result=result,
    )
    outputs.report_txt.write_text(result.report() + "\n")
    outputs.report_json.write_text(json.dumps(report_dict(result, seconds), indent=1) + "\n")
    return outputs


def report_dict(result, seconds: float | None = None) -> dict:
    """The sparsity report as JSON: the result's settings, summary and coverage, per-group and per-layer figures.

    Every sparsity figure is the result's own (`sparsity`, `group_sparsity()`, `ratios`), so the
    JSON says what `report.txt` says.
    """
    ratios = result.ratios
    layers = {
        name: {"group": result.groups[name], "shape": list(mask.shape), "weights": mask.numel(),
               "sparsity": ratios[name]}
        for name, mask in result.masks.items()
    }
    groups = {
        group: {"layers": sum(1 for layer in layers.values() if layer["group"] == group),
                "weights": sum(layer["weights"] for layer in layers.values() if layer["group"] == group),
                "sparsity": sparsity}
        for group, sparsity in result.group_sparsity().items()
    }
    return {
        "method": result.method,
        "allocation": result.allocation,
        "invert": result.invert,
        "preset": result.preset,
        "target_sparsity": result.target_sparsity,
        "sparsity": result.sparsity,
        "summary": result.summary(),
        "counted": result.coverage(),  # what the sparsity figures count (masked layers only)
        "dense_layers": result.dense_layers,
        "calibration": result.calibration,
        "seconds": None if seconds is None else round(seconds, 2),
        "groups": groups,
        "layers": layers,
    }


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device {name!r} asked for, but CUDA is not available")
    return device


def _autocast(fn, precision: str, device):
    """Wrap fn(model, batch) in torch.autocast for a mixed precision (calibration statistics stay fp32)."""
    import torch

    if fn is None or precision in ("32-true", "32"):
        return fn
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16

    def wrapped(model, batch):
        with torch.autocast(device_type=device.type, dtype=dtype):
            return fn(model, batch)

    return wrapped
