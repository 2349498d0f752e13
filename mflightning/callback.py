"""MultiFlowCallback: prune once when fitting starts and keep the pruned weights at zero.

(About 560 lines, mostly documentation: every Lightning hook and argument is documented here;
the exact parts live in `pruning/` — masks in `engine.py`, upkeep in `upkeep.py`.)

The callback is thin glue between Lightning and `mflightning.pruning`: it finds calibration data,
shards it over processes (reductions go through the Trainer's strategy), decides where the masks
come from (a checkpoint, a given file or result, or calibration) and hands them to a
`MaskKeeper`, which keeps pruned weights at exactly zero through fine-tuning: gradients are zeroed
before every optimizer step (so clipping and optimizer state see a sparse gradient) and values
after every real optimizer step (so weight decay and momentum cannot revive them). No mask is
multiplied in the forward pass and no copy of the weights is kept: the only extra memory is one
bool per local prunable weight.

Copies of the masked weights take their sources' masks by rule (`MaskKeeper`): the copies the module
declares (`pruning_copies = {"backbone_m.": "backbone."}`, e.g. RetrievalModule's momentum encoders;
never scored) and whole-module copies other callbacks hold (Lightning's `WeightAveraging` /
`EMAWeightAveraging` deep-copy the module in `setup`, before pruning). They are zeroed once pruned and
at train end; in between an average of zeros stays zero, so none revives a pruned weight.

Supported strategies: one device, DDP (every start method), and FSDP2 through
`ModelParallelStrategy` (`fully_shard` in `configure_model`; masks are sharded like their
parameters). Others stop in `setup` with an error naming the strategy.
"""
from __future__ import annotations

import os
import tempfile
import uuid
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    XLAStrategy,
)
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from .pruning import PruningConfig, PruningResult, prune
from .pruning.batches import default_forward
from .pruning.presets import calibration_adapter, recognise_preset
from .pruning.upkeep import MaskKeeper, pack_mask, unpack_mask

SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)
# subclasses of the supported ones whose parameter layout the masks cannot follow (or nobody verified):
# DeepSpeed ZeRO partitions flat buffers, FSDP1 flattens parameters, XLA was never run
REFUSED_STRATEGIES = (DeepSpeedStrategy, FSDPStrategy, XLAStrategy, SingleDeviceXLAStrategy)


class MultiFlowCallback(Callback):
    """Prune `pl_module` with MultiFlow (or a baseline) in `on_fit_start` and keep it sparse.

    What to prune is a `PruningConfig`: pass `config=` and/or its fields as keywords (`sparsity`,
    `method`, `allocation`, `invert`, `modalities`, `exclude`, `image_groups`,
    `prune_tied_embeddings`, `num_batches`, `seed`, `rounds`; see `PruningConfig`). A task head
    stays dense with `exclude=[r"^head\\."]`.

    Args:
        sparsity: fraction of the prunable weights to remove, in [0, 1). With `masks=`, a sparsity
            that differs from the file's re-thresholds the file's stored scores (an error when it
            holds none); None applies the masks as they are.
        config: the pruning settings (keywords override its fields).
        calibration: any iterable of batches (DataLoader, list); None uses the datamodule's
            `calibration_dataloader()`.
        masks: a mask file path or a PruningResult to apply instead of calibrating.
        save_masks: path to write the computed masks (rank 0 only; written atomically).
        save_scores: also store the scores in `save_masks`, so the file can be re-thresholded.
        forward: `fn(model, batch)` for calibration when the module has no `calibration_step`.
        loss: `fn(model, batch) -> scalar` for gradient methods; default `pl_module.pruning_loss(batch)`.
        token_mask: `fn(batch) -> (B, L)` mask of real tokens; default `batch["attention_mask"]`.
        partial_masks: allow a mask file that leaves some prunable layers of the module uncovered.
        mask_prefix: put this prefix in front of the mask names (when the module holds several
            copies of the masked model, e.g. `"student."`); None: found automatically.
    """

    def __init__(
        self,
        sparsity: float | None = None,
        *,
        config: PruningConfig | None = None,
        calibration: Iterable[Any] | None = None,
        masks: str | os.PathLike | PruningResult | None = None,
        save_masks: str | os.PathLike | None = None,
        save_scores: bool = False,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        loss: Callable[[nn.Module, Any], Tensor] | None = None,
        token_mask: Callable[[Any], Tensor | None] | None = None,
        partial_masks: bool = False,
        mask_prefix: str | None = None,
        **settings: Any,
    ) -> None:
        if sparsity is not None:
            settings["sparsity"] = sparsity
        self.config = PruningConfig.build(config, **settings)  # validated here, once
        if masks is None:
            if self.config.sparsity is None:
                raise ValueError("MultiFlowCallback needs a sparsity (or masks= to apply existing masks)")
        elif not isinstance(masks, (str, os.PathLike, PruningResult)):
            raise TypeError(f"masks must be a path or a PruningResult, got {type(masks)!r}")
        elif isinstance(masks, (str, os.PathLike)) and not Path(masks).is_file():
            raise FileNotFoundError(f"mask file {str(masks)!r} does not exist")
        self.calibration = calibration
        self.masks = masks
        self.save_masks = save_masks
        self.save_scores = save_scores
        self.forward = forward
        self.loss = loss
        self.token_mask = token_mask
        self.partial_masks = partial_masks
        self.mask_prefix = mask_prefix
        self.result: PruningResult | None = None  # the result applied to the current module
        self._keeper: MaskKeeper | None = None
        self._module: weakref.ref | None = None  # the module the keeper's masks belong to
        self._restored: dict[str, Any] | None = None  # state from a checkpoint, applied when pruning
        self._restored_sparsity: float | None = None  # the restored masks' own sparsity and method
        self._restored_method: str | None = None
        self._handles: list[Any] = []
        self._reduce: Callable[[Tensor], Tensor] | None = None  # sums sparsity counts over shards (FSDP2)
        # masks carried between processes (ddp_spawn workers and the launching process): see `_carry`
        self._owner_pid = os.getpid()
        self._carried_file = str(Path(tempfile.gettempdir()) / f"mflightning-masks-{os.getpid()}-{uuid.uuid4().hex}.pt")
        self._carried: dict[str, Any] | None = None
        self._logged_step = -1  # the last step whose sparsity was logged

    @property
    def sparsity(self) -> float | None:
        """The configured target sparsity."""
        return self.config.sparsity

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Stop early, naming the strategy, when masks could not be kept exact under it."""
        strategy = trainer.strategy
        if isinstance(strategy, REFUSED_STRATEGIES) or not isinstance(strategy, SUPPORTED_STRATEGIES):
            raise RuntimeError(
                f"MultiFlowCallback does not support the {type(strategy).__name__} strategy: use one device, "
                "DDP (strategy='ddp') or FSDP2 (ModelParallelStrategy with fully_shard in configure_model)"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Apply restored or given masks, or calibrate and prune; then watch every optimizer.

        Strategies that restore a checkpoint only after `on_fit_start` (FSDP2) prune at the first of
        `on_validation_start` / `on_train_start` instead, so a resumed run finds its masks restored.
        """
        if not trainer.strategy.restore_checkpoint_after_setup:
            self._ensure_pruned(trainer, pl_module)
        self._watch_optimizers(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Prune now if `on_fit_start` waited for the checkpoint to be restored."""
        self._ensure_pruned(trainer, pl_module)

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
        if self._keeper is not None:
            self._keeper.zero_gradients(optimizer)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Log the measured sparsity every `log_every_n_steps` optimizer steps, as Lightning logs metrics
        (one read of the masked weights: a kept weight that training drove to exactly zero shows)."""
        step = trainer.global_step
        if self._keeper is None or not trainer.loggers or step == self._logged_step:
            return
        if step % max(1, trainer.log_every_n_steps) == 0:
            self._logged_step = step
            self._log_figures(trainer, self._keeper.measured_sparsity(self._reduce))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Re-zero the weights and their copies: an averaging callback copies its weights back into the
        module now (before or after this hook, whatever the callback order)."""
        if self._keeper is not None:
            self._keeper.zero_weights()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stop watching the optimizers. In a process the launching one spawned (`ddp_spawn`), hand the
        masks back to it (a file rank 0 writes), so it knows them and a second fit keeps them."""
        self._unwatch()
        if os.getpid() != self._owner_pid and self._keeper is not None:
            carried = self._carry()  # gathers sharded masks: every rank runs this
            if trainer.is_global_zero:
                partial = f"{self._carried_file}.{os.getpid()}.tmp"
                torch.save(carried, partial)
                os.replace(partial, self._carried_file)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Also stop watching when fitting ends in an exception."""
        self._unwatch()

    def state_dict(self) -> dict[str, Any]:
        """Full masks, bit-packed (1 bit per weight), groups and sparsity: a resume needs no recalibration.

        Sharded masks are gathered, so under FSDP2 every rank must call this (Lightning does).
        """
        if self._keeper is None:
            return {}
        full = self._keeper.full_masks()
        return {
            "packed_masks": {name: pack_mask(mask) for name, mask in full.items()},
            "mask_shapes": {name: list(mask.shape) for name, mask in full.items()},
            "groups": dict(self._keeper.groups),
            "method": self.result.method if self.result else self._restored_method or self.config.method,
            # what the kept masks were made at (a resume keeps the checkpoint's, whatever sparsity= says)
            "target_sparsity": self.result.target_sparsity if self.result else self._restored_sparsity,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's masks until pruning time applies them (bit-packed, or bool from older files)."""
        if state_dict.get("packed_masks"):
            self._restored = {**state_dict, "masks": _unpacked(state_dict)}
        elif state_dict.get("masks"):  # checkpoints written before masks were bit-packed
            self._restored = state_dict

    # ------------------------------------------------------------------ queries
    @property
    def kept_masks(self) -> dict[str, Tensor]:
        """Parameter name -> bool tensor, True where the weight is kept (this process's shard under FSDP2;
        after a `ddp_spawn` fit, in the launching process, the full masks its workers handed back)."""
        self._adopt_carried()
        if self._keeper is None and self._carried is not None:
            return _unpacked(self._carried["state"])
        return self._keeper.masks if self._keeper is not None else {}

    @property
    def keeper(self) -> MaskKeeper | None:
        """The MaskKeeper of the current module (None before pruning)."""
        return self._keeper

    def measured_sparsity(self, pl_module: nn.Module | None = None, reduce: Callable[[Tensor], Tensor] | None = None
                          ) -> dict[str, float]:
        """Fraction of exact zeros over the masked weights, per group and `total` (reads the weights).

        The figures count only the layers that have a mask (`kept_masks`), over every process's shard:
        under FSDP2 the counts are summed over ranks (a collective: call it on every rank), so each
        rank gets the global figure. `pl_module` is accepted for compatibility; the masked module is
        the one pruned last.
        """
        self._adopt_carried()
        if self._keeper is None:  # after a ddp_spawn fit: the figures its workers measured at the end
            return dict(self._carried["figures"]) if self._carried is not None else {"total": 0.0}
        return self._keeper.measured_sparsity(reduce or self._reduce)

    # ------------------------------------------------------------------ internals
    def _ensure_pruned(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Prune `pl_module` unless its masks are in place; a checkpoint just loaded (`ckpt_path=`) always
        applies, to whichever module it was loaded into, and only once: its masks never reach a later module."""
        self._adopt_carried()
        current = self._module() if self._module is not None else None
        same = self._keeper is not None and current is pl_module
        if same and self._restored is None:
            return
        carried, self._carried = self._carried, None  # used at most once, by the module that carries it
        if self._keeper is None and carried is not None and self._restored is None:
            masks = _unpacked(carried["state"])
            if self._module_carries(trainer, pl_module, masks):  # the module a ddp_spawn fit returned
                self._restored = {**carried["state"], "masks": masks}
                with torch.inference_mode(False):
                    self._prune_or_restore(trainer, pl_module, source="the previous fit (in another process)")
                self.result = carried["result"]
                self._module = weakref.ref(pl_module)
                return
            rank_zero_info("[mflightning] new module: pruning it afresh (the previous fit's masks are dropped)")
        if same:  # fit/validate/test(ckpt_path=X) on the module already pruned: X's masks replace the current ones
            self._warn_if_checkpoint_replaces_masks()
        elif self._keeper is not None:  # a second fit on another module: nothing of the first may leak
            how = "applying the checkpoint's masks" if self._restored is not None else "pruning it afresh"
            rank_zero_info(f"[mflightning] new module: {how} (the previous module's masks are dropped)")
        self._keeper = None
        self.result = None
        # validate/test hooks run under inference mode; masks must stay usable by a later fit
        with torch.inference_mode(False):
            self._prune_or_restore(trainer, pl_module)
        self._module = weakref.ref(pl_module)

    def _warn_if_checkpoint_replaces_masks(self) -> None:
        """Warn when the loaded checkpoint's masks differ from those this callback applied to the module."""
        assert self._keeper is not None and self._restored is not None
        current = self._keeper.full_masks()  # gathers shards: every rank runs this hook
        restored = self._restored["masks"]
        changed = sum(int((current[n] != restored[n].bool()).sum()) if n in restored and
                      tuple(restored[n].shape) == tuple(current[n].shape) else current[n].numel() for n in current)
        changed += sum(restored[n].numel() for n in restored if n not in current)
        if changed:
            before = self.result.target_sparsity if self.result is not None else self._restored_sparsity
            rank_zero_warn(
                f"[mflightning] the checkpoint's masks (sparsity {self._restored.get('target_sparsity')}) replace "
                f"the masks this callback applied to the module (sparsity {before}): {changed:,d} mask entries "
                "change; the checkpoint's apply, whatever this callback's settings say"
            )

    def _prune_or_restore(self, trainer: Trainer, pl_module: LightningModule, source: str = "checkpoint") -> None:
        if self._restored is not None:
            restored, self._restored = self._restored, None  # used once: a later fit starts afresh
            masks = {name: m.bool() for name, m in restored["masks"].items()}
            params = dict(pl_module.named_parameters())
            for name, mask in masks.items():
                if name not in params or tuple(params[name].shape) != tuple(mask.shape):
                    raise ValueError(
                        f"checkpoint mask {name!r} {tuple(mask.shape)} does not match the model's parameters "
                        f"({'no such parameter' if name not in params else tuple(params[name].shape)})"
                    )
            groups = dict(restored.get("groups", {}))
            saved = restored.get("target_sparsity")
            if self.sparsity is not None and saved is not None and abs(self.sparsity - saved) > 1e-9:
                rank_zero_warn(
                    f"[mflightning] resuming: the checkpoint's masks (sparsity {saved}) apply, not sparsity="
                    f"{self.sparsity}; start a new fit without ckpt_path to prune at another sparsity"
                )
            self._restored_sparsity, self._restored_method = saved, restored.get("method")
        elif self.masks is not None:
            self.result = self._given_result()
            masks = self._masks_for(self.result, pl_module)
            groups = _groups_for(self.result, masks)
            source = f"mask file {self.masks}" if not isinstance(self.masks, PruningResult) else "given result"
        else:
            self.result = self._calibrate_and_prune(trainer, pl_module)
            masks = self._masks_for(self.result, pl_module)
            groups = _groups_for(self.result, masks)
            source = f"{self.result.method} calibration"
            if self.save_masks is not None and trainer.is_global_zero:
                self.result.save(self.save_masks, include_scores=self.save_scores)
                rank_zero_info(f"[mflightning] masks written to {self.save_masks}")
        if source != "checkpoint":  # SparseGPT / CHITA: their solved kept weights, on every rank before any step
            self.result.write_weights(pl_module, partial=self.partial_masks, prefix=self.mask_prefix,
                                      exclude=self.config.exclude)
        self._keeper = MaskKeeper(pl_module, masks, groups)  # + the copies the module declares (pruning_copies)
        for label, copy in self._copies_held_elsewhere(trainer, pl_module):
            self._keeper.follow(copy, label=label + ":")
        self._keeper.zero_weights()
        strategy = trainer.strategy
        self._reduce = (lambda t: strategy.reduce(t, reduce_op="sum")) if _sharded(self._keeper) else None
        self._report(trainer, source)

    def _copies_held_elsewhere(self, trainer: Trainer, pl_module: LightningModule) -> list[tuple[str, nn.Module]]:
        """Averaged copies of the module other callbacks hold: a torch `AveragedModel` (Lightning's
        `WeightAveraging` / `EMAWeightAveraging`, `StochasticWeightAveraging`'s `_average_model`), or a
        module a callback names in `pruning_copies_of_module` (attribute names). They were copied before
        pruning (in `setup`), so they are dense. A look-alike module a callback merely holds (a teacher of
        the same architecture) is never touched: only these are followed, and their names and shapes
        must match the pruned module's (else an error naming the callback)."""
        from lightning.pytorch.callbacks import StochasticWeightAveraging
        from torch.optim.swa_utils import AveragedModel

        assert self._keeper is not None
        shapes = {name: tuple(p.shape) for name, p in self._keeper.params.items()}
        found: list[tuple[str, nn.Module]] = []
        for callback in trainer.callbacks:
            if callback is self:
                continue
            declared = set(getattr(callback, "pruning_copies_of_module", ()) or ())
            if isinstance(callback, StochasticWeightAveraging):
                declared.add("_average_model")  # a deep copy of the module, averaged in place
            for attr, value in vars(callback).items():
                if isinstance(value, AveragedModel):
                    value = value.module
                elif attr not in declared:
                    continue
                if not isinstance(value, nn.Module) or value is pl_module:
                    continue
                named = dict(value.named_parameters())
                wrong = [n for n, shape in shapes.items() if n not in named or tuple(named[n].shape) != shape]
                if wrong:
                    raise ValueError(f"{type(callback).__name__}.{attr} holds a copy of the module whose parameters "
                                     f"do not match the pruned ones (e.g. {wrong[:3]}): its pruned weights cannot "
                                     "be kept at zero")
                found.append((f"{type(callback).__name__}.{attr}", value))
        return found

    def _given_result(self) -> PruningResult:
        """The `masks=` result, re-thresholded at `sparsity` when that differs from its own."""
        result = self.masks if isinstance(self.masks, PruningResult) else PruningResult.load(self.masks)
        if self.sparsity is None or abs(self.sparsity - result.target_sparsity) < 1e-9:
            return result
        if result.scores is None:
            raise ValueError(
                f"sparsity={self.sparsity} differs from the {result.target_sparsity} of masks={self.masks!s}, "
                "which holds no scores to re-threshold: save it with scores (save_scores=True, or the "
                "scores.safetensors of `mflightning prune`), or leave sparsity=None"
            )
        rank_zero_info(f"[mflightning] re-thresholding the stored scores at sparsity {self.sparsity}")
        return result.at(self.sparsity)

    def _masks_for(self, result: PruningResult, pl_module: nn.Module) -> dict[str, Tensor]:
        return result.masks_for(
            pl_module, partial=self.partial_masks, prefix=self.mask_prefix, exclude=self.config.exclude
        )

    def _calibrate_and_prune(self, trainer: Trainer, pl_module: LightningModule) -> PruningResult:
        calibration = self.calibration
        if calibration is None:
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is not None and hasattr(datamodule, "calibration_dataloader"):
                calibration = datamodule.calibration_dataloader()
        if hasattr(pl_module, "calibration_step"):
            forward = _named(lambda model, batch: model.calibration_step(batch), "pl_module.calibration_step(batch)")
        elif self.forward is not None:
            forward = _named(self.forward, f"forward={_qualname(self.forward)}")
        elif (preset_forward := _preset_forward(pl_module, self.config))[0] is not None:
            forward = _named(preset_forward[0], f"the {preset_forward[1]!r} preset's calibration forward")
        else:
            forward = _named(default_forward, "pl_module(**batch) / pl_module(batch)")
        loss = self.loss
        if loss is None and hasattr(pl_module, "pruning_loss"):
            loss = _named(lambda model, batch: model.pruning_loss(batch), "pl_module.pruning_loss(batch)")
        precision = trainer.precision_plugin

        def in_precision(fn):
            if fn is None:
                return None

            def wrapped(model, batch):
                with precision.forward_context():
                    return fn(model, batch)

            return _named(wrapped, _qualname(fn))

        world = trainer.world_size
        strategy = trainer.strategy
        return prune(
            pl_module,
            self.config,
            calibration=calibration,
            forward=in_precision(forward),
            token_mask=self.token_mask,
            loss=in_precision(loss),
            keep_scores=self.save_scores,
            progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
            shard=(trainer.global_rank, world) if world > 1 else None,
            reduce=(lambda t: strategy.reduce(t, reduce_op="sum")) if world > 1 else None,
            # as training batches: the precision plugin's dtype (bf16-true, 16-true, 64-true), then the device
            transfer=lambda batch: strategy.batch_to_device(precision.convert_input(batch)),
        )

    def _watch_optimizers(self, trainer: Trainer) -> None:
        self._unwatch()
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def _unwatch(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Runs after every real optimizer step (a step skipped by the AMP scaler never calls it)."""
        if self._keeper is not None:
            self._keeper.zero_weights(optimizer)

    def _report(self, trainer: Trainer, source: str) -> None:
        keeper = self._keeper
        assert keeper is not None
        figures = keeper.measured_sparsity(self._reduce)
        self._logged_step = trainer.global_step
        self._log_figures(trainer, figures)
        numel = keeper.numel()
        lines = [
            f"[mflightning] pruned from {source}: sparsity {figures['total']:.4f} over the {len(keeper.masks)} "
            f"masked layers ({sum(numel.values()):,d} weights; other parameters stay dense and are not counted)"
        ]
        lines += [f"  {g:<10} {numel[g]:>13,d} weights  sparsity {figures[g]:.4f}" for g in numel]
        if keeper.copies:
            lines.append(f"  copies of masked weights ({len(keeper.copies)}, e.g. momentum or EMA encoders) "
                         "take their sources' masks")
        rank_zero_info("\n".join(lines))

    @staticmethod
    def _log_figures(trainer: Trainer, figures: dict[str, float]) -> None:
        metrics = {"pruning/sparsity": figures["total"]}
        metrics.update({f"pruning/sparsity_{g}": v for g, v in figures.items() if g != "total"})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ masks carried between processes
    def _carry(self) -> dict[str, Any]:
        """What another process needs to know the masks: the checkpoint state, the figures, the result."""
        return {"state": self.state_dict(), "figures": self.measured_sparsity(), "result": self.result}

    def _adopt_carried(self) -> None:
        """Take the masks a ddp_spawn worker handed back (in the launching process, or in a worker that has
        no masks yet: a forked one inherits the launching process's memory, not its later reads)."""
        if os.getpid() != self._owner_pid and self._keeper is not None:
            return
        path = Path(self._carried_file)
        if not path.is_file():
            return
        carried = torch.load(path, weights_only=False)
        if os.getpid() == self._owner_pid:
            path.unlink(missing_ok=True)
        self._keeper, self._module, self._reduce = None, None, None
        self._carried, self.result = carried, carried["result"]

    def _module_carries(self, trainer: Trainer, pl_module: LightningModule, masks: dict[str, Tensor]) -> bool:
        """Whether `pl_module` is the module the carried masks were made for: it has their parameters and is
        exactly zero wherever they prune (a fresh module, or one pruned otherwise, is not)."""
        from .pruning.upkeep import local, shard_like

        params = dict(pl_module.named_parameters())
        wrong = sum(name not in params or tuple(params[name].shape) != tuple(kept.shape)
                    for name, kept in masks.items())
        if not wrong:
            for name, kept in masks.items():
                weight = local(params[name].detach())
                wrong += int((weight[~shard_like(kept, params[name])] != 0).any())
        if trainer.world_size > 1:  # every rank decides alike
            wrong = int(trainer.strategy.reduce(torch.tensor(float(wrong), device=trainer.strategy.root_device),
                                                reduce_op="sum").item())
        return wrong == 0

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for another process (ddp_spawn): masks travel as carried masks, bound to no module."""
        self._adopt_carried()
        state = dict(self.__dict__)
        if self._keeper is not None and not _sharded(self._keeper):
            state["_carried"] = self._carry()
        state.update(_keeper=None, _module=None, _handles=[], _reduce=None)
        return state


def _preset_forward(pl_module: nn.Module, config: PruningConfig) -> tuple[Callable | None, str | None]:
    """The calibration forward of the module's preset (named, or recognised: e.g. a transformers CLIP held
    by the module) and the preset's name; (None, name) when the preset has none."""
    preset = config.modalities if isinstance(config.modalities, str) else None
    if config.modalities is None:
        preset = recognise_preset(pl_module)
    adapter = calibration_adapter(pl_module, preset)
    return (adapter.forward if adapter is not None else None), preset


def _unpacked(state: dict[str, Any]) -> dict[str, Tensor]:
    """The bool masks of a `state_dict()` (bit-packed)."""
    shapes = state["mask_shapes"]
    return {name: unpack_mask(packed, shapes[name]) for name, packed in state["packed_masks"].items()}


def _groups_for(result: PruningResult, masks: dict[str, Tensor]) -> dict[str, str]:
    """Groups keyed by the model's names; an inherited layer shares its source's mask tensor, hence its group."""
    group_of_mask = {id(mask): result.groups[name] for name, mask in result.masks.items()}
    return {name: group_of_mask[id(mask)] for name, mask in masks.items()}


def _sharded(keeper: MaskKeeper) -> bool:
    from .pruning.upkeep import is_dtensor

    return any(is_dtensor(p) for p in keeper.params.values())


def _named(fn: Callable, name: str) -> Callable:
    """`fn` wrapped under a `__qualname__` that calibration errors quote (which forward failed)."""

    def call(model: nn.Module, batch: Any) -> Any:
        return fn(model, batch)

    call.__qualname__ = call.__name__ = name
    return call


def _qualname(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
