"""`PruningSettings`: the `pruning:` section of a recipe, shared by `prune` and the LightningCLI subcommands.

- `masks: <file>` applies a mask file; when `sparsity` is also set and differs from the file's,
  the file's stored scores are re-thresholded at that sparsity (no recalibration), so
  `--pruning.sparsity 0.9` works on a scores file written by `prune`;
- `masks: null` with `sparsity: 0.75` calibrates in `on_fit_start` on the datamodule's
  `calibration_dataloader()` (the data section needs `calibration.json`, or a CalibrationDataModule);
- both null: dense fine-tuning (`--pruning.masks null --pruning.sparsity null`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import RecipeError


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
