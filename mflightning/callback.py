"""MultiFlowCallback: prune once when fitting starts and keep the pruned weights at zero.

The callback is thin glue between Lightning and `mflightning.pruning`: it finds calibration
data, shards it over processes, applies the masks, and keeps pruned weights at exactly zero
through fine-tuning by zeroing their gradients before every optimizer step (so clipping and
optimizer state see a sparse gradient) and their values after every real optimizer step (so
weight decay and momentum cannot revive them). No mask is multiplied in the forward pass and
no copy of the weights is kept; the only extra memory is one bool per prunable weight.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from .pruning import PruningResult, check_method, check_sparsity, prune
from .pruning.presets import GroupMap


class MultiFlowCallback(Callback):
    """Prune `pl_module` with MultiFlow (or a baseline) in `on_fit_start` and keep it sparse.

    Args:
        sparsity: fraction of the prunable weights to remove, in [0, 1).
        method: `multiflow` (default) or a baseline: `omp`, `lamp`, `random`, `wanda`, `snip`, `itersnip`.
        calibration: any iterable of batches (DataLoader, list); None uses the datamodule's
            `calibration_dataloader()`.
        num_batches: use only the first N calibration batches (None: all).
        modalities: None (the module's `pruning_preset`, else one group), a preset name, a mapping
            group -> regex, or a callable name -> group.
        exclude: regexes of parameter names that stay dense.
        token_mask: `fn(batch) -> (B, L)` mask of real tokens; default `batch["attention_mask"]`.
        allocation: None (the method's own), `modality`, `magnitude`, `global`, `layer` or `row`.
        invert: keep the lowest scores (sanity-check ablation).
        masks: a mask file path or a PruningResult to apply instead of calibrating.
        save_masks: path to write the computed masks (rank 0 only).
        forward: `fn(model, batch)` for calibration when the module has no `calibration_step`.
        loss: `fn(model, batch) -> scalar` for gradient methods; default `pl_module.pruning_loss(batch)`.
        seed: seed of the random baseline.
        rounds: IterSNIP rounds.
    """

    def __init__(
        self,
        sparsity: float | None = None,
        method: str = "multiflow",
        calibration: Iterable[Any] | None = None,
        num_batches: int | None = None,
        modalities: GroupMap = None,
        exclude: Iterable[str] = (),
        token_mask: Callable[[Any], Tensor | None] | None = None,
        allocation: str | None = None,
        invert: bool = False,
        masks: str | os.PathLike | PruningResult | None = None,
        save_masks: str | os.PathLike | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        loss: Callable[[nn.Module, Any], Tensor] | None = None,
        seed: int = 0,
        rounds: int = 10,
    ) -> None:
        if masks is None:
            if sparsity is None:
                raise ValueError("MultiFlowCallback needs a sparsity (or masks= to apply existing masks)")
            check_sparsity(sparsity)
            check_method(method, allocation)
        elif not isinstance(masks, (str, os.PathLike, PruningResult)):
            raise TypeError(f"masks must be a path or a PruningResult, got {type(masks)!r}")
        elif isinstance(masks, (str, os.PathLike)) and not Path(masks).is_file():
            raise FileNotFoundError(f"mask file {str(masks)!r} does not exist")
        self.sparsity = sparsity
        self.method = method
        self.calibration = calibration
        self.num_batches = num_batches
        self.modalities = modalities
        self.exclude = tuple(exclude)
        self.token_mask = token_mask
        self.allocation = allocation
        self.invert = invert
        self.masks = masks
        self.save_masks = save_masks
        self.forward = forward
        self.loss = loss
        self.seed = seed
        self.rounds = rounds
        self.result: PruningResult | None = None  # set when this callback pruned or loaded a result
        self._kept: dict[str, Tensor] = {}  # parameter name -> bool, True = kept (on the param's device)
        self._groups: dict[str, str] = {}
        self._restored: dict[str, Any] | None = None  # state from a checkpoint, applied in on_fit_start
        self._handles: list[Any] = []
        self._by_optimizer: dict[int, list[tuple[nn.Parameter, Tensor]]] = {}
        self._params: dict[str, nn.Parameter] = {}

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Apply restored or given masks, or calibrate and prune; then watch every optimizer."""
        self._ensure_pruned(trainer, pl_module)
        self._watch_optimizers(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """`trainer.validate` without fitting still evaluates the pruned model."""
        self._ensure_pruned(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """`trainer.test` without fitting still evaluates the pruned model."""
        self._ensure_pruned(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """`trainer.predict` without fitting still runs the pruned model."""
        self._ensure_pruned(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Zero the gradients of pruned weights, before gradient clipping and the step."""
        for param, kept in self._pairs(optimizer):
            if param.grad is not None:
                # multiplying by the bool mask is ~4x faster than masked_fill_ on CPU; a non-finite
                # gradient at a pruned entry turns into NaN, which AMP's scaler skips like any inf
                param.grad.mul_(kept)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stop watching the optimizers."""
        self._unwatch()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Also stop watching when fitting ends in an exception."""
        self._unwatch()

    def state_dict(self) -> dict[str, Any]:
        """Masks (True = kept, on CPU) and groups, so a resumed run needs no recalibration."""
        if not self._kept:
            return {}
        return {
            "masks": {name: kept.cpu() for name, kept in self._kept.items()},
            "groups": dict(self._groups),
            "method": self.result.method if self.result else self.method,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's masks until `on_fit_start` applies them."""
        if state_dict.get("masks"):
            self._restored = state_dict

    # ------------------------------------------------------------------ queries
    @property
    def kept_masks(self) -> dict[str, Tensor]:
        """Parameter name -> bool tensor, True where the weight is kept."""
        return self._kept

    def measured_sparsity(self, pl_module: nn.Module) -> dict[str, float]:
        """Fraction of exact zeros in the masked weights, overall and per group (reads the weights)."""
        params = dict(pl_module.named_parameters())
        zeros: dict[str, int] = {}
        total: dict[str, int] = {}
        for name in self._kept:
            group = self._groups.get(name, "all")
            w = params[name].detach()
            zeros[group] = zeros.get(group, 0) + int((w == 0).sum())
            total[group] = total.get(group, 0) + w.numel()
        figures = {group: zeros[group] / total[group] for group in total}
        figures["total"] = sum(zeros.values()) / max(1, sum(total.values()))
        return figures

    # ------------------------------------------------------------------ internals
    def _ensure_pruned(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._kept:
            return
        # validate/test hooks run under inference mode; masks must stay usable by a later fit
        with torch.inference_mode(False):
            self._prune_or_restore(trainer, pl_module)

    def _prune_or_restore(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._restored is not None:
            masks = {name: m.bool() for name, m in self._restored["masks"].items()}
            params = dict(pl_module.named_parameters())
            for name, mask in masks.items():
                if name not in params or params[name].shape != mask.shape:
                    raise ValueError(f"checkpoint mask {name!r} does not match the model's parameters")
            self._groups = dict(self._restored.get("groups", {}))
            source = "checkpoint"
        elif self.masks is not None:
            self.result = self.masks if isinstance(self.masks, PruningResult) else PruningResult.load(self.masks)
            if self.sparsity is not None and abs(self.sparsity - self.result.target_sparsity) > 1e-9:
                rank_zero_warn(
                    f"[mflightning] masks= given: applying their sparsity {self.result.target_sparsity} "
                    f"({self.result.method}), not sparsity={self.sparsity}"
                )
            masks = self.result.masks_for(pl_module)
            self._groups = _groups_for(self.result, masks)
            source = f"mask file {self.masks}" if not isinstance(self.masks, PruningResult) else "given result"
        else:
            self.result = self._calibrate_and_prune(trainer, pl_module)
            masks = self.result.masks_for(pl_module)
            self._groups = _groups_for(self.result, masks)
            source = f"{self.result.method} calibration"
            if self.save_masks is not None and trainer.is_global_zero:
                self.result.save(self.save_masks)
                rank_zero_info(f"[mflightning] masks written to {self.save_masks}")
        params = self._params = dict(pl_module.named_parameters())
        self._kept = {name: mask.to(params[name].device) for name, mask in masks.items()}
        self._zero_weights(self._kept.items(), params)
        self._report(trainer, pl_module, source)

    def _calibrate_and_prune(self, trainer: Trainer, pl_module: LightningModule) -> PruningResult:
        calibration = self.calibration
        if calibration is None:
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is not None and hasattr(datamodule, "calibration_dataloader"):
                calibration = datamodule.calibration_dataloader()
        if hasattr(pl_module, "calibration_step"):
            forward = lambda model, batch: model.calibration_step(batch)  # noqa: E731
        else:
            forward = self.forward
        loss = self.loss
        if loss is None and hasattr(pl_module, "pruning_loss"):
            loss = lambda model, batch: model.pruning_loss(batch)  # noqa: E731
        precision = trainer.precision_plugin

        def in_precision(fn):
            if fn is None:
                return None

            def wrapped(model, batch):
                with precision.forward_context():
                    return fn(model, batch)

            return wrapped

        from .pruning.stats import default_forward

        world = trainer.world_size
        return prune(
            pl_module,
            sparsity=self.sparsity,  # type: ignore[arg-type]
            method=self.method,
            calibration=calibration,
            forward=in_precision(forward or default_forward),
            modalities=self.modalities,
            exclude=self.exclude,
            token_mask=self.token_mask,
            num_batches=self.num_batches,
            allocation=self.allocation,
            invert=self.invert,
            loss=in_precision(loss),
            seed=self.seed,
            rounds=self.rounds,
            keep_scores=False,
            progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
            shard=(trainer.global_rank, world) if world > 1 else None,
            reduce=_all_reduce_sum if world > 1 else None,
            transfer=lambda batch: trainer.strategy.batch_to_device(batch),
        )

    def _watch_optimizers(self, trainer: Trainer) -> None:
        self._unwatch()
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def _unwatch(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._by_optimizer = {}

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Runs after every real optimizer step (a step skipped by the AMP scaler never calls it)."""
        with torch.no_grad():
            for param, kept in self._pairs(optimizer):
                param.mul_(kept)

    def _pairs(self, optimizer: Any) -> list[tuple[nn.Parameter, Tensor]]:
        """(parameter, kept mask) for the masked parameters this optimizer updates (cached)."""
        optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap LightningOptimizer
        key = id(optimizer)
        if key not in self._by_optimizer:
            by_id = {id(p): p for group in optimizer.param_groups for p in group["params"]}
            params = self._params
            self._by_optimizer[key] = [
                (params[name], kept) for name, kept in self._kept.items() if id(params[name]) in by_id
            ]
        return self._by_optimizer[key]

    @staticmethod
    def _zero_weights(items: Iterable[tuple[str, Tensor]], params: Mapping[str, nn.Parameter]) -> None:
        with torch.no_grad():
            for name, kept in items:
                params[name].mul_(kept)

    def _report(self, trainer: Trainer, pl_module: LightningModule, source: str) -> None:
        figures = self.measured_sparsity(pl_module)
        metrics = {"pruning/sparsity": figures["total"]}
        metrics.update({f"pruning/sparsity_{g}": v for g, v in figures.items() if g != "total"})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        numel: dict[str, int] = {}
        for name, kept in self._kept.items():
            group = self._groups.get(name, "all")
            numel[group] = numel.get(group, 0) + kept.numel()
        lines = [f"[mflightning] pruned from {source}: {len(self._kept)} layers, sparsity {figures['total']:.4f}"]
        lines += [f"  {g:<10} {numel[g]:>13,d} weights  sparsity {figures[g]:.4f}" for g in numel]
        rank_zero_info("\n".join(lines))


def _groups_for(result: PruningResult, masks: Mapping[str, Tensor]) -> dict[str, str]:
    """Groups keyed by the model's names; an inherited layer shares its source's mask tensor, hence its group."""
    group_of_mask = {id(mask): result.groups[name] for name, mask in result.masks.items()}
    return {name: group_of_mask[id(mask)] for name, mask in masks.items()}


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor
