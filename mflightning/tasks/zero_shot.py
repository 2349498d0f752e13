"""Zero-shot image-text retrieval of a dual encoder (CLIP, SigLIP, ...): no fine-tuning, what pruning costs.

    trainer = L.Trainer(callbacks=[MultiFlowCallback(sparsity=0.5, modalities=..., exclude=...)])
    trainer.test(ZeroShotRetrievalModule("openai/clip-vit-base-patch16"), datamodule=ProcessorDataModule(...))

The callback prunes in `on_test_start` (calibrating on the datamodule's `calibration_dataloader()`
through `calibration_step`), then the test loop scores the pruned model; without the callback the
same run gives the dense figures.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from mflightning.tasks.base import EvaluationLoop, _require
from mflightning.tasks.distributed import gather_objects, to_cpu
from mflightning.tasks.ranking import merge_outputs, recall_from_scores

EVAL_KEYS = ("pixel_values", "input_ids", "image_idx", "text_idx", "text_image_idx")
#: What each process keeps of an eval batch (CPU tensors), gathered at epoch end.
OUTPUT_KEYS = ("image_idx", "image_feat", "text_idx", "text_image_idx", "text_feat")


def load_dual_encoder(model: Any, model_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A model object as is, or `transformers.AutoModel.from_pretrained(name_or_path, **model_kwargs)`
    (a CLIP checkpoint gives a CLIPModel, a SigLIP one a SiglipModel); checked to be a dual encoder."""
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModel

        model = AutoModel.from_pretrained(os.fspath(model), **dict(model_kwargs or {}))
    elif model_kwargs:
        raise ValueError("model_kwargs apply only when model is a hub name or a local path")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, a hub name or a local path, got {type(model).__name__}")
    missing = [m for m in ("get_image_features", "get_text_features") if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(
            f"{type(model).__name__} is not a dual encoder: it has no {' / '.join(missing)} "
            "(ZeroShotRetrievalModule takes CLIPModel, SiglipModel or a model with both methods)"
        )
    return model


def as_features(output: Any, what: str) -> torch.Tensor:
    """The (batch, dim) embedding of `get_image_features` / `get_text_features`: a tensor (transformers 4),
    or the projected `pooler_output` of the ModelOutput transformers 5 returns (or its tuple form)."""
    if isinstance(output, torch.Tensor):
        features = output
    elif isinstance(output, Mapping) or hasattr(output, "pooler_output"):
        features = None
        for key in ("pooler_output", f"{what}_embeds"):
            value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
            if isinstance(value, torch.Tensor):
                features = value
                break
        if features is None:
            keys = list(output.keys()) if isinstance(output, Mapping) else type(output).__name__
            raise TypeError(f"get_{what}_features returned an output without pooler_output ({keys})")
    elif isinstance(output, (tuple, list)) and len(output) >= 2 and isinstance(output[1], torch.Tensor):
        features = output[1]  # (last_hidden_state, pooler_output, ...)
    else:
        raise TypeError(f"get_{what}_features returned {type(output).__name__}, expected a tensor or a ModelOutput "
                        "with pooler_output")
    if features.dim() != 2:
        raise ValueError(f"get_{what}_features gave shape {tuple(features.shape)}, expected (batch, dim)")
    return features


class ZeroShotRetrievalModule(EvaluationLoop, pl.LightningModule):
    """Zero-shot image-text retrieval (COCO/Flickr protocol) of a dual encoder, for `trainer.test` / `validate`.

    Each eval batch (`ProcessorDataModule`: `pixel_values`, `input_ids`, `attention_mask`,
    `image_idx`, `text_idx`, `text_image_idx`) gives L2-normalised image and text features; at epoch
    end the features of every process are gathered, each image and caption counted once (by
    `image_idx` / `text_idx`), and the cosine similarities of all image-caption pairs rank them: text
    retrieval R@1/5/10 (`txt_r1` ..., an image finds any of its captions), image retrieval
    (`img_r1` ..., a caption finds its image), their means `txt_r_mean`, `img_r_mean` and `r_mean`,
    logged as `test/...` (`val/...`) and kept in `eval_results[stage]`. SigLIP's logit scale and
    bias are monotonic in the cosine, so ranking by it is ranking by SigLIP's logits.

    Args:
        model: a `CLIPModel` / `SiglipModel` (or any module with `get_image_features` and
            `get_text_features`), or a hub name / local directory for `AutoModel.from_pretrained`.
        model_kwargs: keywords of `from_pretrained` (e.g. `{"attn_implementation": "sdpa"}`).
        use_attention_mask: give the text encoder the batch's `attention_mask` (when it has one).
            The original SigLIP encodes max-length padded text without a mask (it pools the last
            position), so its recipe sets this to false.
    """

    def __init__(self, model: Any, model_kwargs: dict[str, Any] | None = None, use_attention_mask: bool = True):
        super().__init__()
        self.save_hyperparameters(ignore=[] if isinstance(model, (str, os.PathLike)) else ["model"])
        self.model = load_dual_encoder(model, model_kwargs)
        self.use_attention_mask = use_attention_mask
        # a preset the model declares travels to prune() / MultiFlowCallback (read on the pruned module)
        preset = getattr(self.model, "pruning_preset", None)
        if preset is not None:
            self.pruning_preset = preset
        self.eval_results: dict[str, dict[str, float]] = {}
        self._eval_outputs: list[dict[str, torch.Tensor]] = []

    # ----------------------------------------------------------------- features
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (batch, dim), in fp32."""
        out = as_features(self.model.get_image_features(pixel_values=pixel_values), "image")
        return nn.functional.normalize(out.float(), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised text embeddings (batch, dim), in fp32 (the mask only with `use_attention_mask`)."""
        kwargs = {"attention_mask": attention_mask} if self.use_attention_mask and attention_mask is not None else {}
        out = as_features(self.model.get_text_features(input_ids=input_ids, **kwargs), "text")
        return nn.functional.normalize(out.float(), dim=-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image features, text features), both normalised."""
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)

    # ----------------------------------------------------------------- pruning hook
    def calibration_step(self, batch: Mapping[str, Any]) -> None:
        """Run both towers (every prunable layer) on a calibration batch: `pixel_values`, `input_ids`
        (+ `attention_mask`), e.g. `ProcessorDataModule.calibration_dataloader()`."""
        _require(batch, ("pixel_values", "input_ids"), "calibration batch")
        self(batch["pixel_values"], batch["input_ids"], batch.get("attention_mask"))

    # ----------------------------------------------------------------- evaluation
    def _eval_step(self, batch: Mapping[str, Any]) -> None:
        _require(batch, EVAL_KEYS, "zero-shot retrieval eval batch")
        n_text = batch["input_ids"].size(0)
        if batch["text_idx"].numel() != n_text or batch["text_image_idx"].numel() != n_text:
            raise ValueError(f"zero-shot retrieval eval batch: {n_text} caption rows but text_idx has "
                             f"{batch['text_idx'].numel()} and text_image_idx {batch['text_image_idx'].numel()}")
        if batch["image_idx"].numel() != batch["pixel_values"].size(0):
            raise ValueError(f"zero-shot retrieval eval batch: {batch['pixel_values'].size(0)} images but image_idx "
                             f"has {batch['image_idx'].numel()}")
        image_feat, text_feat = self(batch["pixel_values"], batch["input_ids"], batch.get("attention_mask"))
        self._eval_outputs.append({
            "image_idx": to_cpu(batch["image_idx"]).long(),
            "image_feat": to_cpu(image_feat),
            "text_idx": to_cpu(batch["text_idx"]).long(),
            "text_image_idx": to_cpu(batch["text_image_idx"]).long(),
            "text_feat": to_cpu(text_feat),
        })

    @torch.no_grad()
    def _evaluate(self, stage: str) -> None:
        """Gather every process's features, deduplicate, rank all pairs by cosine, log recall."""
        outputs, self._eval_outputs = self._eval_outputs, []
        if self.trainer.sanity_checking:
            return
        data = merge_outputs(gather_objects([{k: o[k] for k in OUTPUT_KEYS} for o in outputs]), stage)
        sims = data.sims()
        metrics = recall_from_scores(sims, sims.t().contiguous(), data.txt2img, data.img2txt)
        metrics["num_images"], metrics["num_texts"] = float(len(data.image_ids)), float(len(data.txt2img))
        self.eval_results[stage] = dict(metrics)
        self.log_dict({f"{stage}/{k}": float(v) for k, v in metrics.items()}, sync_dist=True)


__all__ = ["ZeroShotRetrievalModule", "as_features", "load_dual_encoder"]
