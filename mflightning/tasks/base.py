"""Shared LightningModule plumbing of the task modules: backbone, tokenizer, calibration, optimiser, results.

``TaskModule`` talks to its backbone only through ``VisionLanguageBackbone``
(``mflightning.models.interface``), so one module class serves BLIP and XVLM. What a backbone
family changes is a class attribute or a constructor argument: ``backbone_type`` (how a path or
config dict becomes a backbone), the optimiser settings (``schedule``, ``warmup_*``, ``betas``,
``no_decay_bias_norm``); the first tokens, unused parts and pretraining losses come from the backbone.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Mapping

import lightning.pytorch as pl
import torch

from mflightning.losses import itc_itm_losses  # noqa: F401  (importable from here as before)
from mflightning.models.blip import BlipBackbone
from mflightning.models.interface import VisionLanguageBackbone, require_backbone, with_first_token
from mflightning.tasks.distributed import rank
from mflightning.tasks.optim import Schedule, check_schedule, configure_adamw, cosine_lambda  # noqa: F401

#: Key of a paired calibration batch holding the row count of each part (written by the data's paired collate).
SEGMENTS = "segments"


def load_tokenizer(tokenizer: Any):
    """A tokenizer object as is, or ``mflightning.data.build_tokenizer(name_or_path)``."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from mflightning.data.tokenizer import build_tokenizer

        return build_tokenizer(tokenizer)
    if not hasattr(tokenizer, "convert_tokens_to_ids"):
        raise TypeError(f"tokenizer must be a name/path or a tokenizer object, got {type(tokenizer).__name__}")
    return tokenizer


def build_backbone(spec: Any, tokenizer: Any, decoder_from: str | None = None, *,
                   backbone_type: type = BlipBackbone) -> VisionLanguageBackbone:
    """A backbone in its fine-tuning layout, checked against the tokenizer: an instance of any
    ``VisionLanguageBackbone`` is prepared by its own class, a name/path/config dict by ``backbone_type``."""
    if isinstance(spec, torch.nn.Module):
        require_backbone(spec)
        backbone_type = type(spec)
    options = {} if decoder_from is None else {"decoder_from": decoder_from}
    return backbone_type.from_spec(spec, tokenizer, **options)


class EvaluationLoop:
    """Validation and test collect per-batch outputs with ``_eval_step(batch)`` and score the whole
    (gathered) set once at epoch end with ``_evaluate(stage)``; a task defines those two."""

    _eval_outputs: list

    def on_validation_epoch_start(self) -> None:
        self._eval_outputs = []

    def on_test_epoch_start(self) -> None:
        self._eval_outputs = []

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    def _eval_step(self, batch: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _evaluate(self, stage: str) -> None:
        raise NotImplementedError


def split_segments(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The parts of a paired calibration batch (key ``segments``: the row count of each part, in order),
    each with the batch's tensors sliced to its rows; a batch without ``segments`` is one part."""
    sizes = batch.get(SEGMENTS)
    if sizes is None:
        return [dict(batch)]
    sizes = [int(n) for n in sizes]
    rows = next(v.size(0) for v in batch.values() if isinstance(v, torch.Tensor))
    if sum(sizes) != rows or min(sizes) < 1:
        raise ValueError(f"batch[{SEGMENTS!r}] = {sizes} does not split its {rows} rows")
    parts, start = [], 0
    for size in sizes:
        parts.append({k: v[start:start + size] if isinstance(v, torch.Tensor) else v
                      for k, v in batch.items() if k != SEGMENTS})
        start += size
    return parts


class TaskModule(pl.LightningModule):
    """Base of the task modules: holds ``self.backbone`` and ``self.tokenizer``, calibration and optimiser.

    Args:
        backbone: a checkpoint (BLIP: hub name or local dir; XVLM: ``save_pretrained`` dir or
            state-dict file), a config dict (vocabulary and special token ids default to the
            tokenizer's), or a backbone instance (any ``VisionLanguageBackbone``). Names and dicts
            are read by ``backbone_type`` (``BlipBackbone`` here; the XVLM modules: ``XVLMBackbone``).
        tokenizer: tokenizer name/path for ``mflightning.data.build_tokenizer`` or a tokenizer object.
        lr, weight_decay, betas: AdamW settings; ``no_decay_bias_norm`` exempts biases/LayerNorms/scalars.
        warmup_steps, warmup_ratio: linear warmup over that many optimizer steps, or that fraction of them.
        min_lr, schedule: then ``"cosine"`` or ``"linear"`` decay to ``min_lr`` at the last optimizer step.
        output_dir: where results files go (default: the trainer's log dir).
        decoder_from: BLIP only: checkpoint giving the decoder when ``backbone`` names a retrieval checkpoint.
    """

    #: Reads ``backbone`` when it is a name, path or config dict (``from_spec``).
    backbone_type: ClassVar[type] = BlipBackbone
    #: The task the module trains (``"retrieval"``, ``"captioning"``, ``"vqa"``); None freezes nothing.
    task: ClassVar[str | None] = None
    backbone: VisionLanguageBackbone

    def __init__(
        self,
        backbone: Any = None,
        tokenizer: Any = "bert-base-uncased",
        lr: float = 1e-5,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        no_decay_bias_norm: bool = False,
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        output_dir: str | None = None,
        decoder_from: str | None = None,
        schedule: Schedule = "cosine",
        warmup_ratio: float = 0.0,
    ):
        super().__init__()
        ignore = [name for name, value in (("backbone", backbone), ("tokenizer", tokenizer))
                  if not isinstance(value, (str, os.PathLike, Mapping, type(None)))]
        self.save_hyperparameters(ignore=ignore)
        check_schedule(schedule, warmup_steps, warmup_ratio)
        self.tokenizer = load_tokenizer(tokenizer)
        self.backbone = build_backbone(backbone, self.tokenizer, decoder_from, backbone_type=self.backbone_type)
        # The pruning preset travels with the backbone (prune() and MultiFlowCallback read it here).
        self.pruning_preset = self.backbone.pruning_preset
        self.prepare_backbone()  # parts a task adds (the VQA decoder) exist before freezing decides
        self.freeze_unused_parts()
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.no_decay_bias_norm = no_decay_bias_norm
        self.warmup_steps = warmup_steps
        self.warmup_ratio = warmup_ratio
        self.min_lr = min_lr
        self.schedule = schedule
        self.output_dir = output_dir
        self.eval_results: dict[str, dict[str, float]] = {}
        self.results_paths: dict[str, Path] = {}

    @property
    def unused_parts(self) -> tuple[str, ...]:
        """Backbone parts (parameter-name prefixes) this task never runs in training, as the backbone names them."""
        return self.backbone.unused_parts(self.task) if self.task is not None else ()

    def prepare_backbone(self) -> None:
        """Add what this task needs on the backbone (nothing here; VQA adds its answer decoder)."""

    def freeze_unused_parts(self) -> None:
        """Set ``requires_grad=False`` on the backbone parameters under ``unused_parts``: plain DDP then
        finds no parameter without a gradient and the optimizer holds no state for them."""
        parts = self.unused_parts
        for name, param in self.backbone.named_parameters():
            if any(name == part or name.startswith(part + ".") for part in parts):
                param.requires_grad_(False)

    # ----------------------------------------------------------------- token ids
    @property
    def enc_token_id(self) -> int:
        """First token of image-grounded texts: the backbone's (BLIP: [ENC]) or, if it names none, [CLS]."""
        token = self.backbone.enc_token_id
        return int(self.tokenizer.cls_token_id if token is None else token)

    @property
    def dec_token_id(self) -> int:
        """First token of decoded texts (answers, captions): the backbone's (BLIP: [DEC]) or [CLS]."""
        token = self.backbone.dec_token_id
        return int(self.tokenizer.cls_token_id if token is None else token)

    def grounded_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Texts for ``encode_grounded`` / ``match_logits``: first token the backbone's ``enc_token_id``."""
        return with_first_token(input_ids, self.backbone.enc_token_id)

    def decoder_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Texts for ``decode`` / ``caption_logits``: first token the backbone's ``dec_token_id``."""
        return with_first_token(input_ids, self.backbone.dec_token_id)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def sep_token_id(self) -> int:
        return int(self.tokenizer.sep_token_id)

    # ----------------------------------------------------------------- pruning hooks
    def calibration_step(self, batch: Mapping[str, Any]) -> None:
        """Run every prunable layer on a calibration batch (the backbone's forward: BLIP image encoder,
        grounded encoder and decoder; XVLM image, text and fusion encoders and the decoder, if any)."""
        _require(batch, ("image", "input_ids", "attention_mask"), "calibration batch")
        self.backbone(batch["image"], batch["input_ids"], batch["attention_mask"])

    def pruning_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """SNIP's loss on a calibration batch: the sum of the backbone's ``pruning_loss_terms`` among its
        pretraining losses (BLIP ITC + ITM + LM, XVLM ITC + ITM + MLM, as the MULTIFLOW code). A paired batch
        (``segments``: the sizes of its parts, e.g. 32 CC3M + 32 VG rows) gets the mean of its parts' losses,
        each part with its own in-batch negatives, as the authors backpropagate half of each part's loss."""
        parts = split_segments(batch)
        terms = self.backbone.pruning_loss_terms
        total = 0
        for part in parts:
            losses = self.pretraining_losses(part)
            total = total + sum(losses[term] for term in terms)
        return total / len(parts)

    def pretraining_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The backbone's pretraining losses by name on one image-caption batch; captions whose batch has no
        ``image_idx`` each describe their own image."""
        _require(batch, ("image", "input_ids", "attention_mask"), "image-caption batch")
        image_idx = batch.get("image_idx")
        if image_idx is None:
            image_idx = torch.arange(batch["image"].size(0), device=batch["image"].device)
        return self.backbone.pretraining_losses(batch["image"], batch["input_ids"], batch["attention_mask"],
                                                image_idx, self.tokenizer)

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        return configure_adamw(
            self.named_parameters(), self.trainer.estimated_stepping_batches, lr=self.lr,
            weight_decay=self.weight_decay, betas=self.betas, no_decay_bias_norm=self.no_decay_bias_norm,
            schedule=self.schedule, warmup_steps=self.warmup_steps, warmup_ratio=self.warmup_ratio,
            min_lr=self.min_lr,
        )

    # ----------------------------------------------------------------- results
    def results_dir(self) -> Path:
        """``output_dir``, else the trainer's log dir, else its default root dir."""
        if self.output_dir:
            return Path(self.output_dir)
        trainer = self.trainer
        return Path(trainer.log_dir or trainer.default_root_dir)

    def write_results(self, stage: str, kind: str, records: list[dict]) -> Path | None:
        """Write ``records`` as JSON on rank 0 (not during the sanity check); returns the path."""
        if self.trainer.sanity_checking:
            return None
        suffix = f"_epoch{self.current_epoch}" if stage == "val" else ""
        path = self.results_dir() / f"{stage}_{kind}{suffix}.json"
        if rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(records, indent=1))
        self.results_paths[stage] = path
        return path

    def log_metrics(self, stage: str, metrics: Mapping[str, float]) -> None:
        """Log ``{stage}/{name}`` (identical on every process) and keep them in ``eval_results``."""
        self.eval_results[stage] = dict(metrics)
        self.log_dict({f"{stage}/{k}": float(v) for k, v in metrics.items()}, sync_dist=True)


#: The BLIP task base by its former name (``mflightning.pretrain.PretrainModule`` subclasses it).
BlipTaskModule = TaskModule


def _require(batch: Mapping[str, Any], keys: tuple[str, ...], what: str) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(f"{what} must be a dict, got {type(batch).__name__}")
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{what} lacks {missing} (has {sorted(batch)})")
