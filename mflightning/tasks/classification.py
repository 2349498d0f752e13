"""Image classification on a (pruned) vision transformer: the paper's vision-only transfer (Sec. A.2).

A backbone of `mflightning.models.vit_families` (transformers ViT/DeiT/Dinov2, timm or torchvision
VisionTransformer) reads image features (the CLS token, or timm's pooled features) and a fresh dense
linear `head` maps them to classes, as the authors' ``ViTForImageClassification(num_labels=...)``.
Defaults are the authors' ``image_classification.py``: Adam (AdamW with no weight decay, the same update)
at lr 1e-5, betas (0.9, 0.999), 10% linear warmup then cosine decay to 0, per optimizer step.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from mflightning.models.vit_families import VisionFamily, images_of, load_vision_backbone
from mflightning.tasks.optim import Schedule, check_schedule, configure_adamw


def vision_tower(backbone: nn.Module, probe_size: int = 32) -> VisionFamily:
    """Classify with the image encoder of a vision-language backbone (BLIP, XVLM): features are the CLS token of
    ``encode_image``. One probe forward/backward on a blank image finds the feature width and the parameters the
    features use; the others (text encoder, decoder, projections) are frozen, so plain DDP sees no unused
    parameter. The masks of the whole backbone still apply (its preset is kept), so one mask file serves this
    task and the vision-language ones."""
    was_training = backbone.training
    backbone.train()
    features = backbone.encode_image(torch.zeros(1, 3, probe_size, probe_size))[:, 0]
    grads = torch.autograd.grad(features.sum(), [p for p in backbone.parameters() if p.requires_grad],
                                allow_unused=True)
    used = iter(g is not None for g in grads)
    for param in backbone.parameters():
        if param.requires_grad and not next(used):
            param.requires_grad_(False)
    backbone.train(was_training)
    width = int(features.shape[-1])
    return VisionFamily(
        backbone.pruning_preset, "mflightning.", (type(backbone).__name__,),
        run=lambda m, images: m.encode_image(images), features=lambda m, images: m.encode_image(images)[:, 0],
        feature_dim=lambda m: width, encoder=lambda m: m,
    )


def with_dense_head(preset: str) -> str:
    """`preset`, or when it does not keep the module's classifier ``head`` dense, ``<preset>+head``: the same
    preset with ``^head\\.`` excluded (registered once), so masks of the backbone cover the module."""
    from mflightning.pruning.presets import get_preset, register_preset

    base = get_preset(preset)
    if any(re.search(pattern, "head.weight") for pattern in base.exclude):
        return preset
    register_preset(
        f"{preset}+head", groups=base.groups, exclude=(*base.exclude, r"^head\."), unfiltered=base.unfiltered,
        description=f"{base.description}; a classifier `head` dense", inherit=base.inherit,
        image_groups=base.image_groups, exclude_for=base.exclude_for, adapter=base.adapter,
    )
    return f"{preset}+head"


class ImageClassificationModule(pl.LightningModule):
    """A vision transformer + a dense linear head, trained with cross-entropy; top-1/top-5 accuracy.

    Args:
        backbone: a model instance (a *ForImageClassification gives its encoder), a transformers hub
            name or directory (``facebook/dino-vitb16``), ``timm:<name>``, ``torchvision:<name>``, a
            config dict ``{"family": "vit"|"dinov2"|"timm"|"torchvision", ...}`` for a random encoder, or a
            vision-language backbone (BLIP, XVLM: its image encoder, `vision_tower`).
        num_classes: classes of the head.
        lr, weight_decay, betas: AdamW settings (weight_decay 0: Adam, as the authors).
        warmup_ratio, warmup_steps: linear warmup over that fraction of the optimizer steps, or that many.
        schedule, min_lr: ``"cosine"`` or ``"linear"`` decay to ``min_lr`` at the last step.
        label_smoothing: of the cross-entropy (0: none, as the authors).
        top_k: accuracies logged as ``{stage}/top{k}`` (those with k above num_classes are left out).
    """

    def __init__(
        self,
        backbone: Any,
        num_classes: int,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.1,
        warmup_steps: int = 0,
        schedule: Schedule = "cosine",
        min_lr: float = 0.0,
        label_smoothing: float = 0.0,
        top_k: tuple[int, ...] = (1, 5),
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        check_schedule(schedule, warmup_steps, warmup_ratio)
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else [])
        if hasattr(backbone, "encode_image") and hasattr(backbone, "pruning_preset"):  # a VisionLanguageBackbone
            self.backbone, self.family = backbone, vision_tower(backbone)
        else:
            self.backbone, self.family = load_vision_backbone(backbone)
        # The preset travels with the module: prune() and MultiFlowCallback read it (the head stays dense).
        self.pruning_preset = with_dense_head(self.family.preset)
        self.head = nn.Linear(self.family.feature_dim(self.backbone), num_classes)
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_ratio, self.warmup_steps, self.schedule, self.min_lr = warmup_ratio, warmup_steps, schedule, min_lr
        self.label_smoothing = label_smoothing
        metrics = MetricCollection({f"top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
                                    for k in sorted(set(top_k)) if 1 <= k <= num_classes})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.eval_results: dict[str, dict[str, float]] = {}  # stage -> {"top1": ..., "top5": ...}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) image features of the backbone."""
        return self.family.features(self.backbone, images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits."""
        return self.head(self.features(images))

    def _labelled(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = images_of(batch), None
        if isinstance(batch, Mapping):
            labels = batch.get("label")
        elif isinstance(batch, (tuple, list)) and len(batch) > 1:
            labels = batch[1]
        if labels is None:
            raise KeyError("a classification batch needs labels ('label' of a dict, or (images, labels))")
        return images, labels

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = self._labelled(batch)
        loss = F.cross_entropy(self(images), labels, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: Any, metrics: MetricCollection, stage: str) -> None:
        images, labels = self._labelled(batch)
        logits = self(images)
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), sync_dist=True, batch_size=len(labels))
        metrics.update(logits, labels)
        self.log_dict(metrics, batch_size=len(labels))  # computed (and summed over processes) at epoch end

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_validation_epoch_end(self) -> None:
        self._keep_results("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._keep_results("test", self.test_metrics)

    def _keep_results(self, stage: str, metrics: MetricCollection) -> None:
        """The epoch's accuracies (fractions, summed over processes) in ``eval_results[stage]``, as the other tasks."""
        if not self.trainer.sanity_checking:
            self.eval_results[stage] = {name.split("/", 1)[1]: float(v) for name, v in metrics.compute().items()}

    # ----------------------------------------------------------------- pruning hooks
    def calibration_step(self, batch: Any) -> torch.Tensor:
        """Run every prunable layer (the backbone) on calibration images; labels, if any, are ignored."""
        return self.features(images_of(batch))

    def pruning_loss(self, batch: Any) -> torch.Tensor:
        """Cross-entropy of the head on labelled calibration images (SNIP, IterSNIP), as the authors on ImageNet."""
        images, labels = self._labelled(batch)
        return F.cross_entropy(self(images), labels)

    def configure_optimizers(self):
        return configure_adamw(
            self.named_parameters(), self.trainer.estimated_stepping_batches, lr=self.lr,
            weight_decay=self.weight_decay, betas=self.betas, no_decay_bias_norm=False, schedule=self.schedule,
            warmup_steps=self.warmup_steps, warmup_ratio=self.warmup_ratio, min_lr=self.min_lr,
        )
