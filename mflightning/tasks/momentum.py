"""Momentum encoders and feature queues for contrastive training (BLIP's retrieval fine-tuning).

- ``ema_copy(backbone, parts)``: a copy of the backbone holding only ``parts`` (the ITC encoders and
  projections), so the backbone's own ``encode_image`` / ``image_features`` ... run on it. Its
  parameters never train; ``momentum_update_`` moves them towards the online ones,
  ``p_m = m * p_m + (1 - m) * p``. A pruned weight (0 online, 0 in the copy) stays exactly 0.
- ``FeatureQueue``: a ring buffer of image features, text features and image ids, filled with the
  global batch (every process enqueues the same gathered rows, so every process holds the same
  queue); only filled slots are read. ``fill_`` starts it full from saved features (the authors load
  their pretraining file's queue), with no image ids (never positives).
- ``start_from_checkpoint_``: momentum encoders and queue as a pretraining file holds them (BLIP's
  ``model_base*.pth``, which the authors' retrieval fine-tuning loads), through the backbone's
  ``load_momentum_``.
- ``ramped_alpha``: the distillation weight, ramped up over the first epoch as the authors do.

Everything is module state (parameters, buffers), so checkpoints save and restore it.
"""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn


def ema_copy(backbone: nn.Module, parts: Iterable[str]) -> nn.Module:
    """A copy of ``backbone`` (same class) holding only its top-level children/parameters ``parts``.

    The other children, parameters and buffers are left out of the copy (set to None), so it costs
    only the parts' memory. The copy's parameters do not require gradients.
    """
    parts = tuple(parts)
    own = {**backbone._modules, **backbone._parameters, **backbone._buffers}
    missing = [p for p in parts if own.get(p) is None]
    if missing:
        raise ValueError(f"momentum parts {missing} are not children or parameters of {type(backbone).__name__} "
                         f"(it has {sorted(k for k, v in own.items() if v is not None)})")
    # deepcopy's memo maps what is left out to None: nothing of it is copied
    memo = {id(value): None for name, value in own.items() if name not in parts and value is not None}
    copied = copy.deepcopy(backbone, memo)
    for part in parts:
        original, twin = getattr(backbone, part), getattr(copied, part)
        if isinstance(original, nn.Module) and (
                [n for n, _ in original.named_parameters()] != [n for n, _ in twin.named_parameters()]):
            raise ValueError(f"momentum part {part!r} shares modules with a part left out of the copy "
                             "(tied weights); add that part to the momentum parts")
    for param in copied.parameters():
        param.requires_grad_(False)
    return copied


#: ``"ema"``: ``p_m = m * p_m + (1 - m) * p``; ``"swapped"``: ``p_m = m * p + (1 - m) * p_m`` (the MultiFlow
#: authors' ``_external_momentum_update`` in ``models/blip/blip_retrieval.py``).
MomentumRule = Literal["ema", "swapped"]
MOMENTUM_RULES = ("ema", "swapped")


@torch.no_grad()
def momentum_update_(target: nn.Module, source: nn.Module, momentum: float, rule: MomentumRule = "ema") -> None:
    """``p_m = momentum * p_m + (1 - momentum) * p`` for every parameter of ``target``, ``p`` being the
    parameter of the same name in ``source`` (exact zeros stay zero: ``m * 0 + (1 - m) * 0 == 0``);
    ``rule="swapped"`` exchanges the weights: ``p_m = momentum * p + (1 - momentum) * p_m``."""
    if rule not in MOMENTUM_RULES:
        raise ValueError(f"momentum rule must be one of {MOMENTUM_RULES}, got {rule!r}")
    params = dict(source.named_parameters())
    unmatched = [name for name, _ in target.named_parameters() if name not in params]
    if unmatched:  # e.g. the backbone was re-parametrised after the copy was made: the copy would freeze
        raise ValueError(f"momentum update: {len(unmatched)} momentum parameters have no online parameter of the "
                         f"same name (e.g. {unmatched[:3]})")
    pairs = [(p_m, params[name]) for name, p_m in target.named_parameters()]
    if not pairs:
        return
    targets, sources = [p for p, _ in pairs], [p.detach() for _, p in pairs]
    kept = momentum if rule == "ema" else 1.0 - momentum  # the weight of the momentum parameter itself
    torch._foreach_mul_(targets, kept)
    torch._foreach_add_(targets, sources, alpha=1.0 - kept)


def checkpoint_file(spec: Any) -> str | None:
    """The file a backbone spec loads (a path, or a ``{"checkpoint": path, ...}`` dict); None otherwise."""
    if isinstance(spec, (str, os.PathLike)):
        return str(spec)
    if isinstance(spec, Mapping) and isinstance(spec.get("checkpoint"), (str, os.PathLike)):
        return str(spec["checkpoint"])
    return None


def start_from_checkpoint_(backbone: nn.Module, backbone_m: nn.Module | None, queue: "FeatureQueue | None",
                           spec: Any) -> None:
    """Load ``backbone_m`` and fill ``queue`` (if any) from the file the backbone ``spec`` names, as the
    authors' retrieval does with BLIP's pretraining file; errors name what is missing."""
    path = checkpoint_file(spec)
    if path is None:
        raise ValueError("momentum_from_checkpoint=True needs the backbone given as a checkpoint file "
                         f"(backbone: <path> or {{checkpoint: <path>}}), got {type(spec).__name__}")
    if backbone_m is None:
        raise ValueError("momentum_from_checkpoint=True needs momentum encoders: set momentum (e.g. 0.995)")
    loader = getattr(type(backbone), "load_momentum_", None)
    if loader is None:
        raise ValueError(f"momentum_from_checkpoint=True: {type(backbone).__name__} cannot read momentum encoders "
                         f"from {path} (no load_momentum_)")
    queues = loader(backbone_m, path)
    if queue is not None:
        queue.fill_(queues["image_queue"], queues["text_queue"], source=f"{path} (image_queue/text_queue)")


def ramped_alpha(alpha: float, epoch: int, batch_idx: int, batches_per_epoch: float) -> float:
    """BLIP's distillation weight: ``alpha * min(1, batch_idx / batches_per_epoch)`` in the first epoch,
    ``alpha`` after it (and throughout when the epoch length is unknown)."""
    if epoch > 0 or not math.isfinite(batches_per_epoch) or batches_per_epoch <= 0:
        return float(alpha)
    return float(alpha) * min(1.0, batch_idx / batches_per_epoch)


class FeatureQueue(nn.Module):
    """A ring buffer of ``size`` (image feature, text feature, image id) rows, as buffers.

    ``enqueue`` writes rows at the pointer and moves it on, wrapping around (any batch size works;
    a batch longer than the queue keeps its last ``size`` rows). Until it is full, only the rows
    written so far are read (``image_feat`` ... return the filled part), so empty slots are never
    negatives (the authors start from random features instead).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"a feature queue needs size >= 1 and dim >= 1, got {size}, {dim}")
        self.size = int(size)
        self.register_buffer("image_queue", torch.zeros(size, dim))
        self.register_buffer("text_queue", torch.zeros(size, dim))
        self.register_buffer("idx_queue", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def _filled(self) -> int:
        return int(self.filled)

    @property
    def image_feat(self) -> torch.Tensor:
        return self.image_queue[: self._filled()]

    @property
    def text_feat(self) -> torch.Tensor:
        return self.text_queue[: self._filled()]

    @property
    def image_idx(self) -> torch.Tensor:
        return self.idx_queue[: self._filled()]

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, image_idx: torch.Tensor) -> None:
        n = image_feat.size(0)
        if text_feat.size(0) != n or image_idx.numel() != n:
            raise ValueError(f"enqueue: {n} image features, {text_feat.size(0)} text features and "
                             f"{image_idx.numel()} ids")
        if n == 0:
            return
        if n > self.size:  # only the last `size` rows survive a full wrap
            image_feat, text_feat, image_idx = image_feat[-self.size:], text_feat[-self.size:], image_idx[-self.size:]
            start = (int(self.ptr) + n - self.size) % self.size
            n = self.size
        else:
            start = int(self.ptr)
        slots = (start + torch.arange(n, device=self.image_queue.device)) % self.size
        self.image_queue[slots] = image_feat.detach().to(self.image_queue.dtype)
        self.text_queue[slots] = text_feat.detach().to(self.text_queue.dtype)
        self.idx_queue[slots] = image_idx.detach().view(-1).long()
        self.ptr.fill_((start + n) % self.size)
        self.filled.fill_(min(self.size, self._filled() + n))

    @torch.no_grad()
    def fill_(self, image_feat: torch.Tensor, text_feat: torch.Tensor, source: str = "features") -> None:
        """Start full from ``(size, dim)`` image and text features (pointer at 0); their ids are -1, i.e. no
        image of the data set, so they are negatives of every caption (the authors' ``idx_queue`` -100)."""
        expected = tuple(self.image_queue.shape)
        for what, feat in (("image", image_feat), ("text", text_feat)):
            if tuple(feat.shape) != expected:
                raise ValueError(f"{source}: {what} queue of shape {tuple(feat.shape)} does not fit this queue "
                                 f"(size {expected[0]}, feature dim {expected[1]}); set queue_size={feat.shape[0]}")
        self.image_queue.copy_(image_feat)
        self.text_queue.copy_(text_feat)
        self.idx_queue.fill_(-1)
        self.ptr.zero_()
        self.filled.fill_(self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.image_queue.size(1)}"


__all__ = ["FeatureQueue", "MOMENTUM_RULES", "MomentumRule", "checkpoint_file", "ema_copy", "momentum_update_",
           "ramped_alpha", "start_from_checkpoint_"]
