"""Image-text retrieval with BLIP: ITC + ITM (hard negatives) training, ITC top-k re-ranked by ITM."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from mflightning.metrics import retrieval_recall
from mflightning.models.blip import with_first_token
from mflightning.tasks.base import EvaluationLoop, BlipTaskModule, _require, itc_itm_losses
from mflightning.tasks.distributed import gather_objects, rank, to_cpu

EVAL_KEYS = ("image", "image_idx", "text_input_ids", "text_attention_mask", "text_idx", "text_image_idx")


def rerank_pairs(sims: torch.Tensor, k: int) -> torch.Tensor:
    """Bool (images x texts): pairs the top-k re-ranking needs (t in i's top-k texts or i in t's top-k images)."""
    n_img, n_txt = sims.shape
    need = torch.zeros(n_img, n_txt, dtype=torch.bool)
    need.scatter_(1, sims.topk(min(k, n_txt), dim=1).indices, True)
    need.t().scatter_(1, sims.t().topk(min(k, n_img), dim=1).indices, True)
    return need


def rerank_scores(
    sims: torch.Tensor, itm_score: Callable[[int, torch.Tensor], torch.Tensor], k: int,
    images: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ITM logits ``(image rows, text columns, scores)`` of the pairs the re-ranking needs, for ``images``.

    ``itm_score(i, texts)`` returns the ITM logits of image i with those texts; texts come in
    ascending order, so the result does not depend on how images are split across processes.
    """
    need = rerank_pairs(sims, k)
    rows, cols, values = [], [], []
    for i in (range(sims.size(0)) if images is None else images):
        texts = need[i].nonzero().flatten()
        if texts.numel() == 0:
            continue
        rows.append(torch.full((texts.numel(),), i, dtype=torch.long))
        cols.append(texts)
        values.append(itm_score(i, texts).float().cpu())
    if not rows:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty, torch.empty(0)
    return torch.cat(rows), torch.cat(cols), torch.cat(values)


def score_matrices(sims: torch.Tensor, itm: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's re-ranked matrices: ``ITM logit + ITC sim`` on each query's top-k, -inf elsewhere.

    ``itm`` is dense (images x texts, NaN where not computed). Returns (scores_i2t: images x
    texts, scores_t2i: texts x images).
    """
    n_img, n_txt = sims.shape
    top_txt = sims.topk(min(k, n_txt), dim=1).indices
    top_img = sims.t().topk(min(k, n_img), dim=1).indices
    combined = itm + sims
    i2t = combined.gather(1, top_txt)
    t2i = combined.t().gather(1, top_img)
    if torch.isnan(i2t).any() or torch.isnan(t2i).any():
        raise RuntimeError("retrieval: an ITM score needed for re-ranking was not computed")
    scores_i2t = torch.full((n_img, n_txt), float("-inf")).scatter_(1, top_txt, i2t)
    scores_t2i = torch.full((n_txt, n_img), float("-inf")).scatter_(1, top_img, t2i)
    return scores_i2t, scores_t2i


def recall_from_scores(
    scores_i2t: torch.Tensor, scores_t2i: torch.Tensor, txt2img: list[int], img2txt: list[list[int]]
) -> dict[str, float]:
    """Text R@k from the image->text matrix, image R@k from the text->image one, and their means."""
    txt = retrieval_recall(scores_i2t, txt2img, img2txt)
    img = retrieval_recall(scores_t2i.t().contiguous(), txt2img, img2txt)
    out = {k: v for k, v in txt.items() if k.startswith("txt_")}
    out.update({k: v for k, v in img.items() if k.startswith("img_")})
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in (1, 5, 10)) / 3
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in (1, 5, 10)) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


class RetrievalModule(EvaluationLoop, BlipTaskModule):
    """BLIP image-text retrieval (COCO/Flickr protocol).

    Training: ITC with in-batch positives (captions sharing ``image_idx``) + ITM with hard
    negatives sampled from the ITC similarities. Evaluation: ITC similarities of all image-text
    pairs; each query's top ``k_test`` (capped by the counts) re-scored with ``ITM logit + ITC
    sim``; text and image R@1/5/10 logged as ``val/txt_r1`` ... ``test/r_mean``. Outputs are
    gathered across processes and deduplicated by ``image_idx`` / ``text_idx``.
    """

    unused_parts = ("text_decoder",)

    def __init__(self, *args: Any, k_test: int = 256, itm_batch_size: int = 128, **kwargs: Any):
        kwargs.setdefault("lr", 1e-5)
        kwargs.setdefault("weight_decay", 0.05)
        super().__init__(*args, **kwargs)
        if k_test < 1 or itm_batch_size < 1:
            raise ValueError(f"k_test and itm_batch_size must be >= 1, got {k_test}, {itm_batch_size}")
        self.k_test = k_test
        self.itm_batch_size = itm_batch_size
        self._eval_outputs: list[dict[str, torch.Tensor]] = []

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
        outputs, self._eval_outputs = self._eval_outputs, []
        cat = lambda key: torch.cat([o[key] for o in outputs]) if outputs else torch.empty(0)  # noqa: E731
        shared = {key: cat(key) for key in ("image_idx", "image_feat", "text_idx", "text_image_idx", "text_feat",
                                            "text_input_ids", "text_attention_mask")}
        everyone = gather_objects(shared)

        # Global, deduplicated, sorted image and text sets.
        image_feat, text_rows = {}, {}
        owner: dict[int, int] = {}
        for r, part in enumerate(everyone):
            for j, idx in enumerate(part["image_idx"].tolist()):
                if idx not in image_feat:
                    image_feat[idx] = part["image_feat"][j]
                    owner[idx] = r
            for j, idx in enumerate(part["text_idx"].tolist()):
                text_rows.setdefault(idx, (part, j))
        if not image_feat or not text_rows:
            raise RuntimeError(f"retrieval {stage}: no images or texts were evaluated")
        image_ids = sorted(image_feat)
        text_ids = sorted(text_rows)
        image_pos = {idx: p for p, idx in enumerate(image_ids)}
        img_feats = torch.stack([image_feat[i] for i in image_ids]).float()
        txt_feats = torch.stack([text_rows[t][0]["text_feat"][text_rows[t][1]] for t in text_ids]).float()
        tokens = torch.stack([text_rows[t][0]["text_input_ids"][text_rows[t][1]] for t in text_ids])
        masks = torch.stack([text_rows[t][0]["text_attention_mask"][text_rows[t][1]] for t in text_ids])
        txt2img = []
        for t in text_ids:
            part, j = text_rows[t]
            image = int(part["text_image_idx"][j])
            if image not in image_pos:
                raise ValueError(f"retrieval {stage}: text {t} belongs to image {image}, which was not evaluated")
            txt2img.append(image_pos[image])
        img2txt: list[list[int]] = [[] for _ in image_ids]
        for p, i in enumerate(txt2img):
            img2txt[i].append(p)

        sims = img_feats @ txt_feats.t()
        # ITM for the images this process owns (its local copy of their ViT tokens).
        local_embeds = {}
        for o in outputs:
            for j, idx in enumerate(o["image_idx"].tolist()):
                if owner[idx] == rank():
                    local_embeds.setdefault(idx, o["image_embeds"][j])
        mine = [image_pos[idx] for idx in sorted(local_embeds)]
        enc_ids = with_first_token(tokens, self.enc_token_id)

        def itm_score(i: int, texts: torch.Tensor) -> torch.Tensor:
            embeds = local_embeds[image_ids[i]]
            scores = []
            for start in range(0, texts.numel(), self.itm_batch_size):
                chunk = texts[start:start + self.itm_batch_size]
                ids, att = enc_ids[chunk].to(self.device), masks[chunk].to(self.device)
                states = embeds.unsqueeze(0).expand(chunk.numel(), -1, -1)
                with self.trainer.precision_plugin.forward_context():
                    grounded = self.backbone.encode_grounded(ids, att, states)
                    scores.append(self.backbone.itm_logits(grounded)[:, 1].float().cpu())
            return torch.cat(scores)

        itm = torch.full_like(sims, float("nan"))
        for rows, cols, values in gather_objects(rerank_scores(sims, itm_score, self.k_test, images=mine)):
            itm[rows, cols] = values
        scores_i2t, scores_t2i = score_matrices(sims, itm, self.k_test)
        self.log_metrics(stage, recall_from_scores(scores_i2t, scores_t2i, txt2img, img2txt))
