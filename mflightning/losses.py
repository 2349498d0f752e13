"""Training losses shared by the backbones' pretraining objectives and the task modules.

ITC (in-batch contrastive, captions of one image are positives), ITM with hard negatives sampled
from the ITC similarities, next-token LM with label smoothing, and BERT-style MLM. The ITC/ITM
pair is written once against ``VisionLanguageBackbone`` (``mflightning.models.interface``): how a
backbone scores an image-text pair is its ``match_logits``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # imported lazily: the backbones import this module
    from mflightning.models.interface import VisionLanguageBackbone


def shifted_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, per_sequence: bool = False
) -> torch.Tensor:
    """Next-token cross-entropy in fp32 (labels -100 ignored): mean over tokens, or summed per sequence."""
    pred = logits[:, :-1].float()
    target = labels[:, 1:]
    loss = F.cross_entropy(
        pred.reshape(-1, pred.size(-1)), target.reshape(-1), ignore_index=-100,
        label_smoothing=label_smoothing, reduction="none",
    ).view(target.shape)
    if per_sequence:
        return loss.sum(1)
    n_tokens = (target != -100).sum()
    if n_tokens == 0:
        raise ValueError("LM loss: every label is ignored (-100); check prompt length and padding")
    return loss.sum() / n_tokens


def itc_loss(
    image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor,
    image_idx: torch.Tensor, text_image_idx: torch.Tensor,
) -> torch.Tensor:
    """Image-text contrastive loss; every pair sharing an image index is a positive (soft targets)."""
    return itc_from_similarity(itc_similarity(image_feat, text_feat, temp), image_idx, text_image_idx)


def itc_similarity(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """Image-to-text similarities over the temperature, in fp32.

    The division keeps a copy of the temperature, so a later in-place clamp (the next ITC loss of a paired
    calibration batch, before one backward over both) does not invalidate this graph."""
    return image_feat.float() @ text_feat.float().t() / temp.float().clone()


def itc_from_similarity(sim_i2t: torch.Tensor, image_idx: torch.Tensor, text_image_idx: torch.Tensor) -> torch.Tensor:
    """`itc_loss` from precomputed image-to-text similarities (`itc_similarity`)."""
    loss_i2t = soft_cross_entropy(sim_i2t, positive_targets(image_idx, text_image_idx))
    loss_t2i = soft_cross_entropy(sim_i2t.t(), positive_targets(text_image_idx, image_idx))
    return (loss_i2t + loss_t2i) / 2


def sample_hard_negatives(sim: torch.Tensor, same_image: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row pick one column with probability softmax(sim) among columns of another image.

    Returns (rows, columns) of the rows that have at least one valid negative (a batch whose
    captions all describe one image has none, and those rows are left out).
    """
    weights = F.softmax(sim.detach().float(), dim=1) + 1e-5
    weights = weights.masked_fill(same_image, 0.0)
    rows = torch.nonzero(weights.sum(1) > 0).flatten()
    if rows.numel() == 0:
        return rows, rows
    cols = torch.multinomial(weights[rows], 1, generator=generator).flatten()
    return rows, cols


def positive_targets(row_idx: torch.Tensor, col_idx: torch.Tensor) -> torch.Tensor:
    """ITC targets ``(R, C)``: uniform over the columns whose image index equals the row's (fp32; a row
    without a positive is all zero)."""
    positives = (row_idx.view(-1, 1) == col_idx.view(1, -1)).float()
    return positives / positives.sum(1, keepdim=True).clamp_min(1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum(targets * log_softmax(logits))`` (ITC with soft or distilled targets)."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(1).mean()


@dataclass
class MatchCandidates:
    """What ITM hard negatives are drawn from (the global batch when gathered across processes): the
    grounded texts (``enc_token_id`` first), their masks and ``encode_text`` states, and the image tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    text_states: torch.Tensor | None  # None: the backbone's ITM re-reads the texts (BLIP), nothing to carry
    image_embeds: torch.Tensor


def itm_hard_negative_loss(
    backbone: "VisionLanguageBackbone", enc_ids: torch.Tensor, attention_mask: torch.Tensor,
    text_states: torch.Tensor, image_embeds: torch.Tensor, sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
    same_image: torch.Tensor, candidates: MatchCandidates | None = None,
) -> torch.Tensor:
    """ITM cross-entropy over this batch's positive pairs and one hard negative each way per row.

    Row ``b`` gives the pair (text b, image b), (text b, a negative image) and (a negative text,
    image b); negatives are drawn from ``candidates`` (default: this batch) with probability
    softmax of the similarities ``sim_t2i`` (texts x candidate images) / ``sim_i2t`` (images x
    candidate texts), never of the same image (``same_image``: rows x candidates). Rows without a
    valid negative are left out.
    """
    if candidates is None:
        candidates = MatchCandidates(enc_ids, attention_mask, text_states, image_embeds)
    with torch.no_grad():
        txt_rows, neg_image = sample_hard_negatives(sim_t2i.detach(), same_image)  # a negative image per caption
        img_rows, neg_text = sample_hard_negatives(sim_i2t.detach(), same_image)  # a negative caption per image
    text_ids = torch.cat([enc_ids, enc_ids[txt_rows], candidates.input_ids[neg_text]])
    text_mask = torch.cat([attention_mask, attention_mask[txt_rows], candidates.attention_mask[neg_text]])
    states = None
    if text_states is not None and candidates.text_states is not None:
        states = torch.cat([text_states, text_states[txt_rows], candidates.text_states[neg_text]])
    images = torch.cat([image_embeds, candidates.image_embeds[neg_image], image_embeds[img_rows]])
    logits = backbone.match_logits(text_ids, text_mask, images, text_states=states)
    labels = torch.zeros(logits.size(0), dtype=torch.long, device=logits.device)
    labels[: enc_ids.size(0)] = 1
    return F.cross_entropy(logits, labels)


def itc_itm_losses(
    backbone: "VisionLanguageBackbone", image_embeds: torch.Tensor, input_ids: torch.Tensor,
    attention_mask: torch.Tensor, image_idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC over the batch (captions of one image are positives) and ITM with hard negatives.

    Hard negatives are sampled from the ITC similarities (softmax), never from the same image:
    one negative image per caption and one negative caption per image. The ITM pairs carry the
    backbone's grounded first token (``enc_token_id``) and the text states of the ITC pass, which
    a backbone whose ITM reads them (XVLM's fusion encoder) reuses. (``RetrievalModule`` adds
    momentum encoders, a feature queue and gathering across processes on top of these pieces.)
    """
    from mflightning.models.interface import with_first_token

    text_states = backbone.encode_text(input_ids, attention_mask)
    image_feat = backbone.image_features(image_embeds)
    text_feat = backbone.text_features(text_states)
    with torch.no_grad():
        backbone.temp.clamp_(0.001, 0.5)
    sim = itc_similarity(image_feat, text_feat, backbone.temp)  # once: the loss, then hard-negative sampling
    itc = itc_from_similarity(sim, image_idx, image_idx)
    enc_ids = with_first_token(input_ids, backbone.enc_token_id)
    same = image_idx.view(-1, 1) == image_idx.view(1, -1)
    itm = itm_hard_negative_loss(backbone, enc_ids, attention_mask, text_states, image_embeds, sim, sim.t(), same)
    return itc, itm


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer: Any,
                probability: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking for MLM: 15% of the real non-special tokens; 80% [MASK], 10% random, 10% kept."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=input_ids.device)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special)
    chosen = candidates & (torch.rand(input_ids.shape, device=input_ids.device) < probability)
    labels = input_ids.masked_fill(~chosen, -100)
    draw = torch.rand(input_ids.shape, device=input_ids.device)
    masked = input_ids.masked_fill(chosen & (draw < 0.8), tokenizer.mask_token_id)
    random_words = torch.randint(len(tokenizer), input_ids.shape, device=input_ids.device)
    masked = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_words, masked)
    return masked, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked-LM cross-entropy in fp32 over the labelled positions; a zero that keeps the graph when a
    batch drew no masked token (short captions), so every head still gets a gradient."""
    logits = logits.float()
    if not (labels != -100).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100)


__all__ = ["MatchCandidates", "itc_itm_losses", "itc_loss", "itm_hard_negative_loss", "positive_targets",
           "soft_cross_entropy", "mask_tokens", "mlm_loss", "sample_hard_negatives", "shifted_lm_loss"]
