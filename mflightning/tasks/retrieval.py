"""Image-text retrieval: ITC + ITM (hard negatives) training, ITC top-k re-ranked with ITM, on any backbone."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from mflightning.losses import itc_itm_losses
from mflightning.tasks.base import EvaluationLoop, TaskModule, _require
from mflightning.tasks.distributed import gather_objects, rank, to_cpu
from mflightning.tasks.ranking import (SHARED_KEYS, RetrievalSet, merge_outputs,  # noqa: F401
                                       recall_from_scores, rerank_pairs, rerank_scores, topk_score_matrices)

EVAL_KEYS = ("image", "image_idx", "text_input_ids", "text_attention_mask", "text_idx", "text_image_idx")


class RetrievalModule(EvaluationLoop, TaskModule):
    """Image-text retrieval (COCO/Flickr protocol), BLIP's settings by default.

    Training: ITC with in-batch positives (captions sharing ``image_idx``) + ITM with hard
    negatives sampled from the ITC similarities. Evaluation: ITC similarities of all image-text
    pairs; each query's top ``k_test`` (capped by the counts) re-scored by ``combine_scores``
    (BLIP: ``ITM logit + ITC sim``; ``XVLMRetrievalModule``: the ITM logit alone); text and image
    R@1/5/10 logged as ``val/txt_r1`` ... ``test/r_mean``. Outputs are gathered across processes
    and deduplicated by ``image_idx`` / ``text_idx``; each process computes ITM for the images it owns.
    """

    task = "retrieval"

    def __init__(self, *args: Any, k_test: int = 256, itm_batch_size: int = 128, **kwargs: Any):
        kwargs.setdefault("lr", 1e-5)
        kwargs.setdefault("weight_decay", 0.05)
        super().__init__(*args, **kwargs)
        if k_test < 1 or itm_batch_size < 1:
            raise ValueError(f"k_test and itm_batch_size must be >= 1, got {k_test}, {itm_batch_size}")
        self.k_test = k_test
        self.itm_batch_size = itm_batch_size
        self._eval_outputs: list[dict[str, torch.Tensor]] = []

    def combine_scores(self, itm: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
        """Re-ranking score of each (image, text) pair from its ITM logit and ITC similarity (BLIP: the sum)."""
        return itm + sims

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        _require(batch, ("image", "input_ids", "attention_mask", "image_idx"), "retrieval train batch")
        image_embeds = self.backbone.encode_image(batch["image"])
        itc, itm = itc_itm_losses(self.backbone, image_embeds, batch["input_ids"], batch["attention_mask"],
                                  batch["image_idx"])
        loss = itc + itm
        self.log_dict({"train/loss_itc": itc, "train/loss_itm": itm, "train/loss": loss},
                      prog_bar=True, batch_size=batch["image"].size(0))
        return loss

    # ----------------------------------------------------------------- evaluation
    def _eval_step(self, batch: Mapping[str, Any]) -> None:
        _require(batch, EVAL_KEYS, "retrieval eval batch")
        image_embeds = self.backbone.encode_image(batch["image"])
        text_states = self.backbone.encode_text(batch["text_input_ids"], batch["text_attention_mask"])
        self._eval_outputs.append({
            "image_idx": to_cpu(batch["image_idx"]).long(),
            "image_feat": to_cpu(self.backbone.image_features(image_embeds)),
            "image_embeds": image_embeds.detach(),  # stays on device, used for ITM re-ranking
            "text_idx": to_cpu(batch["text_idx"]).long(),
            "text_image_idx": to_cpu(batch["text_image_idx"]).long(),
            "text_feat": to_cpu(self.backbone.text_features(text_states)),
            "text_input_ids": to_cpu(batch["text_input_ids"]),
            "text_attention_mask": to_cpu(batch["text_attention_mask"]),
        })

    @torch.no_grad()
    def _evaluate(self, stage: str) -> None:
        """Gather features, ITC top-k, ITM for the images this process owns, recall from the combined scores."""
        outputs, self._eval_outputs = self._eval_outputs, []
        data = merge_outputs(gather_objects([{k: o[k] for k in SHARED_KEYS} for o in outputs]), stage)
        sims = data.sims()
        itm = torch.full_like(sims, float("nan"))
        for rows, cols, values in gather_objects(self._owned_itm_scores(outputs, data, sims)):
            itm[rows, cols] = values
        scores_i2t, scores_t2i = topk_score_matrices(sims, self.combine_scores(itm, sims), self.k_test)
        self.log_metrics(stage, recall_from_scores(scores_i2t, scores_t2i, data.txt2img, data.img2txt))

    def _owned_itm_scores(self, outputs: list[dict[str, torch.Tensor]], data: RetrievalSet,
                          sims: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITM logits of the re-ranked pairs of the images this process owns (its local copy of their tokens)."""
        owned = {idx for idx, r in zip(data.image_ids, data.owner) if r == rank()}
        local: dict[int, torch.Tensor] = {}
        for o in outputs:
            for j, idx in enumerate(o["image_idx"].tolist()):
                if idx in owned:
                    local.setdefault(idx, o["image_embeds"][j])
        position = {idx: p for p, idx in enumerate(data.image_ids)}
        enc_ids = self.grounded_ids(data.tokens)

        def itm_score(i: int, texts: torch.Tensor) -> torch.Tensor:
            embeds, scores = local[data.image_ids[i]], []
            for start in range(0, texts.numel(), self.itm_batch_size):
                chunk = texts[start:start + self.itm_batch_size]
                ids, att = enc_ids[chunk].to(self.device), data.masks[chunk].to(self.device)
                states = embeds.unsqueeze(0).expand(chunk.numel(), -1, -1)
                with self.trainer.precision_plugin.forward_context():
                    scores.append(self.backbone.match_logits(ids, att, states)[:, 1].float().cpu())
            return torch.cat(scores)

        return rerank_scores(sims, itm_score, self.k_test, images=sorted(position[idx] for idx in local))
