"""Retrieval evaluation as plain tensor functions: gathered eval outputs -> one deduplicated set,
ITC top-k -> the pairs to re-score with ITM, scores -> recall (no Lightning, no backbone)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from mflightning.metrics import retrieval_recall

#: Per-batch eval output keys that every process shares (CPU tensors).
SHARED_KEYS = ("image_idx", "image_feat", "text_idx", "text_image_idx", "text_feat", "text_input_ids",
               "text_attention_mask")


@dataclass
class RetrievalSet:
    """Every evaluated image and text once, sorted by global index.

    ``owner[p]``: the process whose ITM scores image position p (the first to report it);
    ``txt2img[t]``: image position of text position t; ``img2txt[p]``: its text positions.
    ``tokens``/``masks`` (the texts' ids, for ITM re-ranking) are None when the outputs carried no
    ``text_input_ids`` / ``text_attention_mask`` (a dual encoder's evaluation needs only features).
    """

    image_ids: list[int]
    owner: list[int]
    image_feats: torch.Tensor
    text_feats: torch.Tensor
    tokens: torch.Tensor | None
    masks: torch.Tensor | None
    txt2img: list[int]
    img2txt: list[list[int]]

    def sims(self) -> torch.Tensor:
        """ITC similarities, images x texts."""
        return self.image_feats @ self.text_feats.t()


def merge_outputs(per_rank: Iterable[Iterable[Mapping[str, torch.Tensor]]], stage: str) -> RetrievalSet:
    """One ``RetrievalSet`` from every process's eval batches (``SHARED_KEYS``), in rank order; an image
    or text seen twice (a padding sampler) counts once. Raises naming what is missing.
    ``text_input_ids`` and ``text_attention_mask`` may be left out (then ``tokens``/``masks`` are None)."""
    images: dict[int, tuple[int, torch.Tensor]] = {}  # image idx -> (owning rank, ITC feature)
    texts: dict[int, tuple[Any, ...]] = {}  # text idx -> (feature, ids, mask, image idx)
    for r, batches in enumerate(per_rank):
        for b in batches:
            for j, idx in enumerate(b["image_idx"].tolist()):
                images.setdefault(idx, (r, b["image_feat"][j]))
            for j, idx in enumerate(b["text_idx"].tolist()):
                ids, att = b.get("text_input_ids"), b.get("text_attention_mask")
                texts.setdefault(idx, (b["text_feat"][j], None if ids is None else ids[j],
                                       None if att is None else att[j], int(b["text_image_idx"][j])))
    if not images or not texts:
        raise RuntimeError(f"retrieval {stage}: no images or texts were evaluated")
    image_ids, text_ids = sorted(images), sorted(texts)
    position = {idx: p for p, idx in enumerate(image_ids)}
    orphans = [(t, texts[t][3]) for t in text_ids if texts[t][3] not in position]
    if orphans:
        raise ValueError(f"retrieval {stage}: texts belong to images that were not evaluated "
                         f"(text, image): {orphans[:5]}")
    txt2img = [position[texts[t][3]] for t in text_ids]
    img2txt: list[list[int]] = [[] for _ in image_ids]
    for p, i in enumerate(txt2img):
        img2txt[i].append(p)
    return RetrievalSet(
        image_ids=image_ids, owner=[images[i][0] for i in image_ids],
        image_feats=torch.stack([images[i][1] for i in image_ids]).float(),
        text_feats=torch.stack([texts[t][0] for t in text_ids]).float(),
        tokens=_stack_optional([texts[t][1] for t in text_ids]), masks=_stack_optional([texts[t][2] for t in text_ids]),
        txt2img=txt2img, img2txt=img2txt,
    )


def _stack_optional(rows: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The rows stacked, or None when no batch carried them (all None)."""
    if all(r is None for r in rows):
        return None
    if any(r is None for r in rows):
        raise ValueError("retrieval: some eval batches carry text_input_ids/text_attention_mask and others do not")
    return torch.stack(rows)


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


def topk_score_matrices(sims: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-ranked matrices: ``scores`` on each query's ITC top-k (by ``sims``), -inf elsewhere.

    ``scores`` is dense (images x texts, NaN where not computed). Returns (scores_i2t: images x
    texts, scores_t2i: texts x images).
    """
    n_img, n_txt = sims.shape
    top_txt = sims.topk(min(k, n_txt), dim=1).indices
    top_img = sims.t().topk(min(k, n_img), dim=1).indices
    i2t, t2i = scores.gather(1, top_txt), scores.t().gather(1, top_img)
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


__all__ = ["RetrievalSet", "SHARED_KEYS", "merge_outputs", "recall_from_scores", "rerank_pairs", "rerank_scores",
           "topk_score_matrices"]
