"""Shared LightningModule plumbing for the BLIP downstream tasks: backbone, tokenizer, optimiser."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from torch import nn

from mflightning.models.blip import PRESET_NAME, BlipBackbone, as_blip_config, itc_loss, sample_hard_negatives
from mflightning.models.blip import shifted_lm_loss, with_first_token
from mflightning.tasks.distributed import rank

BackboneSpec = "str | dict | BlipBackbone"


def load_tokenizer(tokenizer: Any):
    """A tokenizer object as is, or ``mflightning.data.build_tokenizer(name_or_path)``."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from mflightning.data.tokenizer import build_tokenizer

        return build_tokenizer(tokenizer)
    if not hasattr(tokenizer, "convert_tokens_to_ids"):
        raise TypeError(f"tokenizer must be a name/path or a tokenizer object, got {type(tokenizer).__name__}")
    return tokenizer


def build_backbone(spec: Any, tokenizer: Any, decoder_from: str | None = None) -> BlipBackbone:
    """Backbone from a hub name / local dir, a config dict (token ids and vocab filled from the tokenizer)
    or an existing ``BlipBackbone``; always untied (encoder and decoder train as separate copies)."""
    if isinstance(spec, BlipBackbone):
        backbone = spec
    elif isinstance(spec, (str, os.PathLike)):
        backbone = BlipBackbone.from_pretrained(spec, decoder_from=decoder_from)
    elif isinstance(spec, Mapping):
        config = dict(spec)
        text = dict(config.get("text_config") or {})
        text.setdefault("vocab_size", len(tokenizer))
        text.setdefault("bos_token_id", tokenizer.convert_tokens_to_ids("[DEC]"))
        text.setdefault("pad_token_id", tokenizer.pad_token_id)
        text.setdefault("sep_token_id", tokenizer.sep_token_id)
        text.setdefault("eos_token_id", tokenizer.sep_token_id)
        config["text_config"] = text
        blip_config = as_blip_config({k: v for k, v in config.items() if k != "enc_token_id"})
        blip_config.enc_token_id = config.get("enc_token_id", tokenizer.convert_tokens_to_ids("[ENC]"))
        backbone = BlipBackbone.from_config(blip_config)
    elif spec is None:
        raise ValueError("backbone is required: a BLIP checkpoint name/path or a config dict")
    else:
        raise TypeError(f"backbone must be a name/path, a config dict or a BlipBackbone, got {type(spec).__name__}")
    backbone.untie_decoder_()
    backbone.check_tokenizer(tokenizer)
    return backbone


def cosine_lambda(total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """LR multiplier per optimizer step: linear warmup, then cosine from 1 to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


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


class BlipTaskModule(pl.LightningModule):
    """Base of the task modules: holds ``self.backbone`` and ``self.tokenizer``, calibration and optimiser.

    Args:
        backbone: BLIP checkpoint (hub name or local dir), a config dict (``text_config`` /
            ``vision_config``; vocabulary and special token ids default to the tokenizer's), or a
            ``BlipBackbone``.
        tokenizer: tokenizer name/path for ``mflightning.data.build_tokenizer`` or a tokenizer object.
        lr, weight_decay, betas: AdamW settings; ``no_decay_bias_norm`` exempts biases/LayerNorms.
        warmup_steps, min_lr: linear warmup, then cosine to ``min_lr`` over all optimizer steps.
        output_dir: where results files go (default: the trainer's log dir).
        decoder_from: checkpoint giving the decoder when ``backbone`` names a retrieval checkpoint.
    """

    pruning_preset = PRESET_NAME
    # Backbone parts (parameter-name prefixes) this task never runs in training: frozen, so plain
    # DDP finds no parameter without a gradient and the optimizer holds no state for them.
    unused_parts: tuple[str, ...] = ()

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
    ):
        super().__init__()
        ignore = [name for name, value in (("backbone", backbone), ("tokenizer", tokenizer))
                  if not isinstance(value, (str, os.PathLike, Mapping, type(None)))]
        self.save_hyperparameters(ignore=ignore)
        self.tokenizer = load_tokenizer(tokenizer)
        self.backbone = build_backbone(backbone, self.tokenizer, decoder_from)
        self.freeze_unused_parts()
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.no_decay_bias_norm = no_decay_bias_norm
        self.warmup_steps = warmup_steps
        self.min_lr = min_lr
        self.output_dir = output_dir
        self.eval_results: dict[str, dict[str, float]] = {}
        self.results_paths: dict[str, Path] = {}

    def freeze_unused_parts(self) -> None:
        """Set ``requires_grad=False`` on the backbone parameters under ``unused_parts``."""
        for name, param in self.backbone.named_parameters():
            if any(name == part or name.startswith(part + ".") for part in self.unused_parts):
                param.requires_grad_(False)

    # ----------------------------------------------------------------- token ids
    @property
    def enc_token_id(self) -> int:
        return self.backbone.enc_token_id

    @property
    def dec_token_id(self) -> int:
        return self.backbone.dec_token_id

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def sep_token_id(self) -> int:
        return int(self.tokenizer.sep_token_id)

    # ----------------------------------------------------------------- pruning hooks
    def calibration_step(self, batch: Mapping[str, Any]) -> None:
        """Run image encoder, grounded text encoder ([ENC]) and decoder ([DEC]) on a calibration batch."""
        _require(batch, ("image", "input_ids", "attention_mask"), "calibration batch")
        self.backbone(batch["image"], batch["input_ids"], batch["attention_mask"])

    def pruning_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """BLIP pretraining loss ITC + ITM + LM on a calibration batch (for gradient-based baselines)."""
        return sum(self.pretraining_losses(batch).values())

    def pretraining_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """BLIP's three pretraining losses (itc, itm, lm) of one image-caption batch."""
        _require(batch, ("image", "input_ids", "attention_mask"), "image-caption batch")
        image_embeds = self.backbone.encode_image(batch["image"])
        image_idx = batch.get("image_idx")
        if image_idx is None:
            image_idx = torch.arange(batch["image"].size(0), device=batch["image"].device)
        itc, itm = itc_itm_losses(self.backbone, image_embeds, batch["input_ids"], batch["attention_mask"], image_idx)
        dec_ids = with_first_token(batch["input_ids"], self.dec_token_id)
        labels = dec_ids.masked_fill(batch["attention_mask"] == 0, -100)
        logits = self.backbone.decode(dec_ids, batch["attention_mask"], image_embeds)
        return {"itc": itc, "itm": itm, "lm": shifted_lm_loss(logits, labels, label_smoothing=0.1)}

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if self.no_decay_bias_norm and (param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name):
                no_decay.append(param)
            else:
                decay.append(param)
        groups = [{"params": decay, "weight_decay": self.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the cosine schedule needs a finite number of steps: set max_epochs or max_steps")
        ratio = self.min_lr / self.lr if self.lr > 0 else 0.0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(int(total), self.warmup_steps, ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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


def itc_itm_losses(
    backbone: BlipBackbone, image_embeds: torch.Tensor, input_ids: torch.Tensor,
    attention_mask: torch.Tensor, image_idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC over the batch (captions of one image are positives) and ITM with hard negatives.

    Hard negatives are sampled from the ITC similarities (softmax), never from the same image:
    one negative image per caption and one negative caption per image.
    """
    image_feat = backbone.image_features(image_embeds)
    text_feat = backbone.text_features(backbone.encode_text(input_ids, attention_mask))
    with torch.no_grad():
        backbone.temp.clamp_(0.001, 0.5)
    itc = itc_loss(image_feat, text_feat, backbone.temp, image_idx, image_idx)

    enc_ids = with_first_token(input_ids, backbone.enc_token_id)
    with torch.no_grad():
        sim = image_feat @ text_feat.t() / backbone.temp
        same = image_idx.view(-1, 1) == image_idx.view(1, -1)
        txt_rows, neg_image = sample_hard_negatives(sim.t(), same)  # a negative image per caption
        img_rows, neg_text = sample_hard_negatives(sim, same)  # a negative caption per image
    text_ids = torch.cat([enc_ids, enc_ids[txt_rows], enc_ids[neg_text]])
    text_mask = torch.cat([attention_mask, attention_mask[txt_rows], attention_mask[neg_text]])
    images = torch.cat([image_embeds, image_embeds[neg_image], image_embeds[img_rows]])
    logits = backbone.itm_logits(backbone.encode_grounded(text_ids, text_mask, images))
    labels = torch.cat([
        torch.ones(input_ids.size(0), dtype=torch.long),
        torch.zeros(txt_rows.numel() + img_rows.numel(), dtype=torch.long),
    ]).to(logits.device)
    return itc, nn.functional.cross_entropy(logits, labels)


def _require(batch: Mapping[str, Any], keys: tuple[str, ...], what: str) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(f"{what} must be a dict, got {type(batch).__name__}")
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{what} lacks {missing} (has {sorted(batch)})")
