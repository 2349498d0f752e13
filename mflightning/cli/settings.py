"""`PruningSettings`: the `pruning:` section of a recipe, shared by `prune` and the LightningCLI subcommands.

- `masks: <file>` applies a mask file; when `sparsity` is also set and differs from the file's,
  the file's stored scores are re-thresholded at that sparsity (no recalibration), so
  `--pruning.sparsity 0.9` works on a scores file written by `prune`;
- `masks: null` with `sparsity: 0.75` calibrates in `on_fit_start` on the datamodule's
  `calibration_dataloader()` (the data section needs `calibration.json`, or a CalibrationDataModule);
- both null: dense fine-tuning (`--pruning.masks null --pruning.sparsity null`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from mflightning.pruning.config import PruningConfig

from .errors import RecipeError


@dataclass
class PruningSettings(PruningConfig):
    """The `pruning:` section of a recipe: every `PruningConfig` field (what to prune, validated once,
    as a `RecipeError`), plus where masks come from and go (see the module docstring).

    Args:
        masks: mask/scores file written by `mflightning prune` (or `PruningResult.save`) to apply.
        save_masks: where `fit` writes the masks it computed (calibration in on_fit_start only).
        save_scores: also store the scores in `save_masks`, so another sparsity can re-threshold it.
        partial_masks: allow a mask file that covers only some of the model's prunable layers.
        mask_prefix: the prefix the model puts in front of the mask names (null: found automatically).

    `sparsity` None with `masks` None means dense fine-tuning.
    """

    masks: str | None = None
    save_masks: str | None = None
    save_scores: bool = False
    partial_masks: bool = False
    mask_prefix: str | None = None

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except (TypeError, ValueError) as err:
            raise RecipeError(f"pruning section: {err}") from None

    @property
    def enabled(self) -> bool:
        return self.sparsity is not None or self.masks is not None

    @property
    def config(self) -> PruningConfig:
        """The `PruningConfig` part of these settings."""
        return PruningConfig(**{f.name: getattr(self, f.name) for f in fields(PruningConfig)})

    def validate(self) -> None:
        """Settings are checked when built; this re-checks them after a field was changed in place."""
        self.__post_init__()

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
        common = dict(config=self.config, partial_masks=self.partial_masks, mask_prefix=self.mask_prefix)
        if self.masks is not None:
            return MultiFlowCallback(masks=self.load_masks(), **common)
        return MultiFlowCallback(save_masks=self.save_masks, save_scores=self.save_scores, **common)


def require_calibration_data(config: Mapping[str, Any]) -> None:
    """A recipe whose `pruning:` calibrates (sparsity set, no masks) must give its datamodule calibration data.

    Only datamodules with a `calibration:` section (or `calibration_json`) are checked; a missing
    `data.calibration.json` is a RecipeError naming it, before anything is built.
    """
    pruning = config.get("pruning") or {}
    if pruning.get("masks") is not None or pruning.get("sparsity") is None:
        return
    data = config.get("data")
    if not isinstance(data, Mapping):
        return
    args = data.get("init_args", data)
    if not isinstance(args, Mapping):
        return
    if "calibration_json" in args:
        key, value = "data.calibration_json", args["calibration_json"]
    elif "calibration" in args:
        calibration = args["calibration"]
        key, value = "data.calibration.json", calibration.get("json") if isinstance(calibration, Mapping) else calibration
    else:
        return
    if value is None:
        raise RecipeError(
            f"pruning.sparsity is {pruning['sparsity']} and pruning.masks is null, so the run calibrates on the "
            f"datamodule's calibration_dataloader(), but {key} is not set: give it (--{key} <image-caption records>, "
            "with its image_root), or a mask file (--pruning.masks), or --pruning.sparsity null for a dense run"
        )
