"""The `mflightning` command: prune once from a recipe, fine-tune/evaluate with LightningCLI, check recipes.

    mflightning prune    --config recipes/blip/prune/multiflow.yaml [--pruning.sparsity 0.9 ...]
    mflightning fit      --config recipes/blip/retrieval_coco.yaml  [--pruning.sparsity 0.9 ...]
    mflightning validate --config ...      mflightning test --config ...
    mflightning check    --config <any recipe> [--strict]
    mflightning <subcommand> --config ... --print_config

`prune` builds the model and the calibration data of the recipe, calls `mflightning.prune` once
and writes `masks.safetensors`, `scores.safetensors` (masks + scores, re-thresholdable) and a
sparsity report (`report.txt`, `report.json`) into `output_dir`.

`fit`/`validate`/`test` are LightningCLI subcommands (`model:`, `data:`, `trainer:` sections) plus
a `pruning:` section that configures a `MultiFlowCallback`:
- `masks: <file>` applies a mask file; when `sparsity` is also set and differs from the file's,
  the file's stored scores are re-thresholded at that sparsity (no recalibration), so
  `--pruning.sparsity 0.9` works on a scores file written by `prune`;
- `masks: null` with `sparsity: 0.75` calibrates in `on_fit_start` on the datamodule's
  `calibration_dataloader()` (the data section needs `calibration_json`);
- both null: dense fine-tuning (`--pruning.masks null --pruning.sparsity null`).

Every data path of a recipe is checked before any model or data is built; a missing one stops
the run with an error naming its config key. `check` parses and type-checks a recipe (classes
resolved, arguments validated, nothing instantiated, no data or weights read) and lists its
paths; with `--strict`, a missing input path is an error.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
OWN_SUBCOMMANDS = ("prune", "check")
# Keys whose values are always input paths (str or list of str), matched on the last key component.
PATH_SUFFIXES = ("_json", "image_root", "_root", "ckpt_path")
PATH_KEYS = ("masks", "answer_list")
# Keys that hold either a hub name or a local path: checked only when the value looks local.
MAYBE_PATH_KEYS = ("backbone", "tokenizer", "decoder_from")
# Output locations: never required to exist.
OUTPUT_KEYS = ("output_dir", "save_masks", "default_root_dir", "dirpath", "save_dir")


class ConfigPathError(FileNotFoundError):
    """A recipe names an input path that does not exist (the message names the config key)."""


class RecipeError(ValueError):
    """A recipe's values are inconsistent (e.g. a sparsity out of range)."""


# ---------------------------------------------------------------------------------------- pruning
@dataclass
class PruningSettings:
    """The `pruning:` section of a recipe (see the module docstring for how the fields combine).

    Args:
        sparsity: fraction of the prunable weights to remove, in [0, 1); None with masks=None: dense.
        method: multiflow, omp, lamp, random, wanda, snip or itersnip.
        masks: mask/scores file written by `mflightning prune` (or `PruningResult.save`) to apply.
        allocation: None (the method's own) or modality, magnitude, global, layer, row (ablations).
        invert: keep the lowest scores (sanity-check ablation).
        num_batches: calibration batches to use (None: the whole calibration loader).
        modalities: None (the model's preset), a preset name, or a mapping group -> regex.
        exclude: regexes of parameter names that stay dense.
        seed: seed of the random baseline.
        rounds: IterSNIP rounds.
        save_masks: where `fit` writes the masks it computed (calibration in on_fit_start only).
        save_scores: also store the scores in `save_masks`, so another sparsity can re-threshold it.
        image_groups: groups whose inputs are image tokens, never PAD-filtered (null: the preset's;
            a `modalities` mapping declares none unless listed here).
        prune_tied_embeddings: also prune Linear weights tied to an nn.Embedding (dense by default).
        partial_masks: allow a mask file that covers only some of the model's prunable layers.
        mask_prefix: the prefix the model puts in front of the mask names (null: found automatically).
    """

    sparsity: float | None = None
    method: str = "multiflow"
    masks: str | None = None
    allocation: str | None = None
    invert: bool = False
    num_batches: int | None = None
    modalities: str | dict[str, str] | None = None
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    rounds: int = 10
    save_masks: str | None = None
    save_scores: bool = False
    image_groups: list[str] | None = None
    prune_tied_embeddings: bool = False
    partial_masks: bool = False
    mask_prefix: str | None = None

    @property
    def enabled(self) -> bool:
        return self.sparsity is not None or self.masks is not None

    def validate(self) -> None:
        """Check sparsity, method and allocation without touching any file or model."""
        from mflightning.pruning import check_method, check_sparsity

        try:
            if self.sparsity is not None:
                check_sparsity(self.sparsity)
            check_method(self.method, self.allocation)
        except ValueError as err:
            raise RecipeError(f"pruning section: {err}") from None
        if self.num_batches is not None and self.num_batches < 1:
            raise RecipeError(f"pruning.num_batches must be >= 1 or null, got {self.num_batches}")
        if self.rounds < 1:
            raise RecipeError(f"pruning.rounds must be >= 1, got {self.rounds}")

    def load_masks(self):
        """The PruningResult of `masks`, re-thresholded at `sparsity` when that differs from the file's."""
        from mflightning.pruning import PruningResult

        result = PruningResult.load(self.masks)  # type: ignore[arg-type]
        if self.sparsity is None or abs(self.sparsity - result.target_sparsity) < 1e-12:
            return result
        if result.scores is None:
            raise RecipeError(
                f"pruning.sparsity={self.sparsity} differs from the {result.target_sparsity} of mask file "
                f"{self.masks!r}, which holds no scores to re-threshold; use the scores.safetensors that "
                "`mflightning prune` writes, or set pruning.sparsity to null"
            )
        try:
            return result.at(self.sparsity)
        except ValueError as err:  # e.g. IterSNIP scores, which only hold for their own sparsity
            raise RecipeError(f"pruning.sparsity={self.sparsity} with mask file {self.masks!r}: {err}") from None

    def callback(self):
        """The MultiFlowCallback these settings describe (None when pruning is off)."""
        from mflightning.callback import MultiFlowCallback

        if not self.enabled:
            return None
        common = dict(
            modalities=self.modalities, exclude=tuple(self.exclude), image_groups=self.image_groups,
            prune_tied_embeddings=self.prune_tied_embeddings, partial_masks=self.partial_masks,
            mask_prefix=self.mask_prefix,
        )
        if self.masks is not None:
            return MultiFlowCallback(masks=self.load_masks(), **common)
        return MultiFlowCallback(
            sparsity=self.sparsity, method=self.method, num_batches=self.num_batches, allocation=self.allocation,
            invert=self.invert, save_masks=self.save_masks, save_scores=self.save_scores, seed=self.seed,
            rounds=self.rounds, **common,
        )


# ---------------------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class PathEntry:
    """One input path named by a recipe."""

    key: str
    path: str
    exists: bool


def _looks_local(value: str) -> bool:
    """A hub id is `name` or `org/name`; anything rooted, dotted, deeper or with a file suffix is a local path."""
    if value.startswith(("/", ".", "~")) or os.path.exists(value):
        return True
    if len(Path(value).parts) > 2:
        return True
    return Path(value).suffix in (".txt", ".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _short_key(key: str) -> str:
    """`data.init_args.train_json` -> `data.train_json` (what one writes on the command line)."""
    return key.replace(".init_args.", ".")


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """(dotted key, last component, value) of every leaf of nested dicts."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                yield from _walk(value, dotted)
            else:
                yield dotted, str(key), value


def recipe_paths(config: Mapping[str, Any]) -> list[PathEntry]:
    """Every input path a parsed recipe names, with whether it exists (outputs are left out)."""
    entries = []
    for dotted, last, value in _walk(config):
        if last in OUTPUT_KEYS or value is None:
            continue
        always = last in PATH_KEYS or last.endswith(PATH_SUFFIXES)
        maybe = last in MAYBE_PATH_KEYS
        if not (always or maybe):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if not isinstance(item, (str, os.PathLike)):
                continue
            item = os.fspath(item)
            if maybe and not _looks_local(item):
                continue
            entries.append(PathEntry(_short_key(dotted), item, os.path.exists(os.path.expanduser(item))))
    return entries


def require_paths(config: Mapping[str, Any]) -> None:
    """Raise ConfigPathError naming every missing input path of the recipe and its config key."""
    missing = [e for e in recipe_paths(config) if not e.exists]
    if missing:
        lines = "\n".join(f"  {e.key}: {e.path!r} does not exist" for e in missing)
        raise ConfigPathError(
            f"the recipe names {len(missing)} missing path(s) (fix the recipe or override them, e.g. "
            f"--{missing[0].key} <path>):\n{lines}"
        )


def _as_dict(config: Any) -> dict:
    return config.as_dict() if hasattr(config, "as_dict") else dict(config)


# ---------------------------------------------------------------------------------------- LightningCLI
def _lightning_cli_class():
    from lightning.pytorch.cli import LightningCLI

    class MultiFlowCLI(LightningCLI):
        """LightningCLI with a `pruning:` section turned into a MultiFlowCallback, and path checks first."""

        def __init__(self, *args: Any, check_only: bool = False, **kwargs: Any) -> None:
            self.check_only = check_only
            self.pruning_callback = None
            super().__init__(*args, **kwargs)

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_class_arguments(PruningSettings, "pruning", instantiate=False)

        def before_instantiate_classes(self) -> None:
            config = _as_dict(self.config[self.subcommand] if self.subcommand else self.config)
            settings = PruningSettings(**config.get("pruning") or {})
            settings.validate()
            if self.check_only:
                raise _ParsedOnly(config)
            require_paths(config)
            self.pruning_settings = settings

        def instantiate_trainer(self, **kwargs: Any):
            callbacks = list(self._get(self.config_init, "trainer", default={}).get("callbacks") or [])
            callback = self.pruning_settings.callback()
            if callback is not None:
                self.pruning_callback = callback
                callbacks.append(callback)
            return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    return MultiFlowCLI


class _ParsedOnly(Exception):
    """Raised by `check` right after a LightningCLI recipe parsed, before anything is instantiated."""

    def __init__(self, config: dict):
        super().__init__("parsed")
        self.config = config


def lightning_cli(args: list[str], check_only: bool = False):
    """Run a LightningCLI subcommand (fit/validate/test/predict) in-process; returns the CLI object."""
    cli_class = _lightning_cli_class()
    argv = sys.argv
    sys.argv = [argv[0] if argv else "mflightning"]  # LightningCLI warns when args and sys.argv both hold arguments
    try:
        return cli_class(
            args=list(args),
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf"} if _has_omegaconf() else None,
            check_only=check_only,
            seed_everything_default=0,
        )
    finally:
        sys.argv = argv


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------- prune
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


def _prune_config_checks(config: Mapping[str, Any]) -> PruningSettings:
    settings = PruningSettings(**config.get("pruning") or {})
    settings.validate()
    if settings.sparsity is None:
        raise RecipeError("pruning.sparsity is required by `mflightning prune` (e.g. --pruning.sparsity 0.75)")
    if settings.masks is not None:
        raise RecipeError("pruning.masks is for fit/validate/test; `mflightning prune` computes masks")
    if config.get("precision") not in ("32-true", "32", "bf16-mixed", "16-mixed"):
        raise RecipeError(f"precision must be 32-true, bf16-mixed or 16-mixed, got {config.get('precision')!r}")
    return settings


def run_prune(args: list[str]) -> PruneOutputs:
    """`mflightning prune`: build model + calibration data, prune once, write masks, scores and reports."""
    import lightning as L
    import torch

    from mflightning.pruning import METHODS, prune

    parser = prune_parser()
    config = parser.parse_args(args)
    plain = _as_dict(config)
    settings = _prune_config_checks(plain)
    require_paths(plain)
    needs = METHODS[settings.method].needs
    if needs is not None and not plain.get("data"):
        raise RecipeError(f"method {settings.method!r} needs calibration data: add a data: section")

    L.seed_everything(config.seed_everything, verbose=False)
    init = parser.instantiate(config)
    module = init.model
    device = _device(config.device)
    module.to(device)
    calibration = None
    if needs is not None:
        datamodule = init.data
        if not hasattr(datamodule, "calibration_dataloader"):
            raise RecipeError(f"data: {type(datamodule).__name__} has no calibration_dataloader()")
        calibration = datamodule.calibration_dataloader()

    # Prune the bare backbone when the module holds one, so mask names do not depend on the task wrapper.
    target = module.backbone if isinstance(getattr(module, "backbone", None), torch.nn.Module) else module
    forward = None
    if hasattr(module, "calibration_step"):
        forward = lambda _model, batch: module.calibration_step(batch)  # noqa: E731
    loss = None
    if hasattr(module, "pruning_loss"):
        loss = lambda _model, batch: module.pruning_loss(batch)  # noqa: E731
    forward, loss = _autocast(forward, config.precision, device), _autocast(loss, config.precision, device)
    if target is not module:
        target.pruning_preset = getattr(target, "pruning_preset", None) or getattr(module, "pruning_preset", None)

    started = time.perf_counter()
    result = prune(
        target, sparsity=settings.sparsity, method=settings.method, calibration=calibration, forward=forward,
        modalities=settings.modalities, exclude=settings.exclude, num_batches=settings.num_batches,
        allocation=settings.allocation, invert=settings.invert, loss=loss, seed=settings.seed,
        rounds=settings.rounds, keep_scores=True, progress=config.progress, image_groups=settings.image_groups,
        prune_tied_embeddings=settings.prune_tied_embeddings,
    )
    seconds = time.perf_counter() - started
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs = PruneOutputs(
        output_dir=out,
        masks=result.save(out / "masks.safetensors"),
        scores=result.save(out / "scores.safetensors", include_scores=True),
        report_txt=out / "report.txt",
        report_json=out / "report.json",
        result=result,
    )
    outputs.report_txt.write_text(result.report() + "\n")
    outputs.report_json.write_text(json.dumps(report_dict(result, seconds), indent=1) + "\n")
    (out / "config.yaml").write_text(parser.dump(config))
    print(result.report())
    print(f"\n[mflightning] {settings.method} pruning took {seconds:.1f}s; wrote {outputs.masks}, {outputs.scores}, "
          f"{outputs.report_txt}, {outputs.report_json}")
    return outputs


def report_dict(result, seconds: float | None = None) -> dict:
    """The sparsity report as JSON: settings, per-group and per-layer sizes and realised sparsity."""
    groups: dict[str, dict[str, Any]] = {}
    for name, mask in result.masks.items():
        entry = groups.setdefault(result.groups[name], {"layers": 0, "weights": 0, "kept": 0})
        entry["layers"] += 1
        entry["weights"] += mask.numel()
        entry["kept"] += int(mask.sum())
    for entry in groups.values():
        entry["sparsity"] = 1.0 - entry.pop("kept") / entry["weights"]
    return {
        "method": result.method,
        "allocation": result.allocation,
        "invert": result.invert,
        "preset": result.preset,
        "target_sparsity": result.target_sparsity,
        "sparsity": result.sparsity,
        "counted": result.coverage(),  # what the sparsity figures count (masked layers only)
        "dense_layers": result.dense_layers,
        "calibration": result.calibration,
        "seconds": None if seconds is None else round(seconds, 2),
        "groups": groups,
        "layers": {
            name: {"group": result.groups[name], "shape": list(mask.shape), "weights": mask.numel(),
                   "sparsity": 1.0 - mask.float().mean().item()}
            for name, mask in result.masks.items()
        },
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


# ---------------------------------------------------------------------------------------- check
@dataclass
class CheckReport:
    """What `mflightning check` found: the recipe kind, its input paths and which are missing."""

    recipe: str
    kind: str  # "prune" or "lightning"
    paths: list[PathEntry]

    @property
    def missing(self) -> list[PathEntry]:
        return [p for p in self.paths if not p.exists]

    def text(self) -> str:
        lines = [f"{self.recipe}: valid {self.kind} recipe ({len(self.paths)} input path(s), {len(self.missing)} missing)"]
        lines += [f"  {'ok     ' if p.exists else 'MISSING'} {p.key}: {p.path}" for p in self.paths]
        return "\n".join(lines)


def recipe_kind(recipe: str | os.PathLike) -> str:
    """`lightning` for a recipe with a trainer: section, `prune` for one with output_dir:."""
    path = Path(recipe)
    if not path.is_file():
        raise ConfigPathError(f"recipe {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {str(path)!r} is not a YAML mapping")
    if "trainer" in data:
        return "lightning"
    if "output_dir" in data or "pruning" in data:
        return "prune"
    raise RecipeError(f"recipe {str(path)!r} has neither a trainer: section (fit/test recipe) nor output_dir: (prune)")


def check_recipe(recipe: str | os.PathLike, overrides: list[str] = (), strict: bool = False) -> CheckReport:
    """Parse and type-check a recipe without instantiating anything; list (and with strict, require) its paths."""
    kind = recipe_kind(recipe)
    args = ["--config", os.fspath(recipe), *overrides]
    if kind == "prune":
        parser = prune_parser()
        config = _as_dict(parser.parse_args(args))
        _prune_config_checks(config)
    else:
        try:
            lightning_cli(["fit", *args], check_only=True)
        except _ParsedOnly as parsed:
            config = parsed.config
        else:  # pragma: no cover - check_only always stops before instantiation
            raise AssertionError("check_only did not stop the LightningCLI")
    report = CheckReport(os.fspath(recipe), kind, recipe_paths(config))
    if strict:
        require_paths(config)
    return report


# ---------------------------------------------------------------------------------------- entry points
USAGE = f"""usage: mflightning {{{','.join(OWN_SUBCOMMANDS + LIGHTNING_SUBCOMMANDS)}}} --config RECIPE [overrides]

  prune     prune a model once from a pruning recipe; writes masks, scores and reports
  fit       fine-tune (LightningCLI) with the recipe's pruning: section applied by MultiFlowCallback
  validate  evaluate on the validation split (LightningCLI)
  test      evaluate on the test split (LightningCLI)
  predict   run prediction (LightningCLI)
  check     parse and type-check a recipe without data or weights (--strict: require its input paths)

Overrides are dotted keys, e.g. --pruning.sparsity 0.9 --data.batch_size 16 --trainer.max_epochs 1;
--print_config prints the resolved recipe and exits.
"""


def cli_main(args: list[str] | None = None) -> Any:
    """The CLI in-process: returns PruneOutputs (prune), CheckReport (check) or the LightningCLI object."""
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return None
    command, rest = args[0], args[1:]
    if command == "prune":
        return run_prune(rest)
    if command == "check":
        strict = "--strict" in rest
        rest = [a for a in rest if a != "--strict"]
        if len(rest) < 2 or rest[0] not in ("-c", "--config"):
            raise RecipeError("usage: mflightning check --config RECIPE [--strict] [overrides]")
        report = check_recipe(rest[1], rest[2:], strict=strict)
        print(report.text())
        return report
    if command in LIGHTNING_SUBCOMMANDS:
        return lightning_cli(args)
    raise RecipeError(f"unknown subcommand {command!r}\n{USAGE}")


def main(args: list[str] | None = None) -> None:
    """Console entry point: recipe errors are printed as one clear message with exit status 2."""
    try:
        cli_main(args)
    except (ConfigPathError, RecipeError) as err:
        print(f"mflightning: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


__all__ = [
    "CheckReport", "ConfigPathError", "PathEntry", "PruneOutputs", "PruningSettings", "RecipeError",
    "check_recipe", "cli_main", "lightning_cli", "main", "prune_parser", "recipe_paths", "report_dict",
    "require_paths", "run_prune",
]
