"""XVLM task modules: the generic retrieval, captioning and VQA modules with XVLM's settings.

The modules are ``RetrievalModule``, ``CaptioningModule`` and ``VQAModule``; the backbone does the
XVLM-specific work through ``VisionLanguageBackbone`` (texts keep [CLS] first, ITM runs the fusion
encoder on the text encoder's states, captions come from the text + fusion stack with causal masks,
VQA decodes with a copy of the fusion layers). What these subclasses set:

- ``backbone_type = XVLMBackbone``: a path or config dict names an XVLM checkpoint/config;
- the authors' optimiser: AdamW betas (0.9, 0.98), weight decay 0.01 without decay on biases,
  LayerNorms and the temperature, linear schedule with 10% warmup; and each task's learning rate;
- retrieval re-ranks each query's ITC top-k by the ITM logit alone (``combine_scores``).

Recipes name these classes by path (``mflightning.tasks.xvlm_tasks.XVLMRetrievalModule`` ...).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from mflightning.losses import mask_tokens  # noqa: F401  (importable from here as before)
from mflightning.models.generation import beam_search  # noqa: F401
from mflightning.models.xvlm import DENSE_DECODER_PRESET, XVLMBackbone
from mflightning.models.xvlm import PRESET_NAME as XVLM_PRESET
from mflightning.tasks.base import TaskModule, load_tokenizer
from mflightning.tasks.captioning import CaptioningModule
from mflightning.tasks.optim import linear_warmup_lambda  # noqa: F401
from mflightning.tasks.retrieval import RetrievalModule
from mflightning.tasks.vqa import VQAModule

#: XVLM's fine-tuning optimiser (the authors' settings); each class adds its learning rate.
XVLM_OPTIMISER: dict[str, Any] = {
    "weight_decay": 0.01, "betas": (0.9, 0.98), "no_decay_bias_norm": True, "schedule": "linear", "warmup_ratio": 0.1,
}


class XVLMSettings:
    """Mixin placed before a task module: XVLM backbone type and optimiser defaults (any can be overridden)."""

    backbone_type: ClassVar[type] = XVLMBackbone
    #: The authors' learning rate for the task.
    default_lr: ClassVar[float] = 3e-5

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("lr", self.default_lr)
        for name, value in XVLM_OPTIMISER.items():
            kwargs.setdefault(name, value)
        super().__init__(*args, **kwargs)


class XVLMTaskModule(XVLMSettings, TaskModule):
    """XVLM backbone holder without a task: calibration (image, text, fusion encoders and the decoder, if
    any) and ``pruning_loss`` = XVLM's ITC + ITM + MLM (the MULTIFLOW code's SNIP loss), e.g. for pruning recipes."""


class XVLMRetrievalModule(XVLMSettings, RetrievalModule):
    """XVLM image-text retrieval (COCO/Flickr protocol; authors: lr 3e-5, wd 0.01, 10 epochs).

    Training: ITC + ITM with hard negatives over the global batch (gathered across processes with
    gradients, ``gather=True``; captions of one image are positives). The authors' code instead gives
    the encoders 1/world of the exact ITC gradient and draws ITM negatives from each process's batch:
    ``gather_backward="local", itm_negatives="local"`` (the paper recipe). XVLM trains without momentum
    encoders, queue or distillation (``momentum=None, queue_size=0, alpha=0``; each can be switched on,
    the momentum encoders copying the ITC encoders and projections). Evaluation: ITC similarities of all pairs; each
    query's top ``k_test`` re-scored by the ITM logit alone.
    """

    default_lr = 3e-5

    def __init__(self, *args: Any, momentum: float | None = None, queue_size: int = 0, alpha: float = 0.0,
                 gather: bool = True, **kwargs: Any):
        super().__init__(*args, momentum=momentum, queue_size=queue_size, alpha=alpha, gather=gather, **kwargs)

    def combine_scores(self, itm: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
        """XVLM ranks the ITC top-k by the ITM logit alone."""
        return itm


class XVLMCaptioningModule(XVLMSettings, CaptioningModule):
    """XVLM captioning (COCO Karpathy; authors: lr 1e-5, 5 epochs): the text and fusion layers run with
    causal masks and the MLM head predicts the next token (no separate decoder)."""

    default_lr = 1e-5


class XVLMVQAModule(XVLMSettings, VQAModule):
    """XVLM generative VQA (VQA v2 protocol; authors: lr 5e-5, 10 epochs): question through the text and
    fusion encoders, answers from ``backbone.text_decoder`` (added if absent: a copy of the fusion layers).

    ``inherit_decoder_masks``: True (default) gives the decoder the fusion layers' masks, so one mask file
    makes the whole model sparse; False keeps it dense (preset ``xvlm_dense_decoder``: not pruned, not
    counted), the authors' default (their ``vqa.py`` without ``--inherit_mask``: the copied pretrained
    weights under masks of ones), which the paper's recipe uses.

    The answer loss has no label smoothing, as the authors' decoder (``label_smoothing=0.0``).
    """

    default_lr = 5e-5

    def __init__(self, *args: Any, inherit_decoder_masks: bool = True, label_smoothing: float = 0.0, **kwargs: Any):
        super().__init__(*args, label_smoothing=label_smoothing, **kwargs)
        self.inherit_decoder_masks = bool(inherit_decoder_masks)
        if not self.inherit_decoder_masks:
            if self.pruning_preset != XVLM_PRESET:
                raise ValueError(f"inherit_decoder_masks=False needs the {XVLM_PRESET!r} preset's layer names; the "
                                 f"backbone's preset is {self.pruning_preset!r}")
            self.pruning_preset = DENSE_DECODER_PRESET


def build_xvlm_backbone(spec: Any, tokenizer: Any) -> XVLMBackbone:
    """``XVLMBackbone.from_spec`` under its former name."""
    return XVLMBackbone.from_spec(spec, load_tokenizer(tokenizer))


__all__ = [
    "XVLMSettings", "XVLMTaskModule", "XVLMRetrievalModule", "XVLMCaptioningModule", "XVLMVQAModule",
    "XVLM_OPTIMISER", "build_xvlm_backbone", "beam_search", "linear_warmup_lambda",
    "mask_tokens",
]
