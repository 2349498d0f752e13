"""Training losses shared by the backbones' pretraining objectives and the task modules.

ITC (in-batch contrastive, captions of one image are positives), ITM with hard negatives sampled
from the ITC similarities, next-token LM with label smoothing, and BERT-style MLM. The ITC/ITM
pair is written once against ``VisionLanguageBackbone`` (``mflightning.models.interface``): how a
backbone scores an image-text pair is its ``match_logits``.
"""
from __future__ import annotations

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
    """Image-to-text similarities over the temperature, in fp32."""
    return image_feat.float() @ text_feat.float().t() / temp.float()


def itc_from_similarity(sim_i2t: torch.Tensor, image_idx: torch.Tensor, text_image_idx: torch.Tensor) -> torch.Tensor:
    """`itc_loss` from precomputed image-to-text similarities (`itc_similarity`)."""
    positives = (image_idx.view(-1, 1) == text_image_idx.view(1, -1)).float()
    targets_i2t = positives / positives.sum(1, keepdim=True).clamp_min(1)
    targets_t2i = positives.t() / positives.t().sum(1, keepdim=True).clamp_min(1)
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_i2t.t(), dim=1) * targets_t2i).sum(1).mean()
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


def itc_itm_losses(
    backbone: "VisionLanguageBackbone", image_embeds: torch.Tensor, input_ids: torch.Tensor,
    attention_mask: torch.Tensor, image_idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC over the batch (captions of one image are positives) and ITM with hard negatives.

    Hard negatives are sampled from the ITC similarities (softmax), never from the same image:
    one negative image per caption and one negative caption per image. The ITM pairs carry the
    backbone's grounded first token (``enc_token_id``) and the text states of the ITC pass, which
    a backbone whose ITM reads them (XVLM's fusion encoder) reuses.
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
    with torch.no_grad():
        sim = sim.detach()
        same = image_idx.view(-1, 1) == image_idx.view(1, -1)
        txt_rows, neg_image = sample_hard_negatives(sim.t(), same)  # a negative image per caption
        img_rows, neg_text = sample_hard_negatives(sim, same)  # a negative caption per image
    text_ids = torch.cat([enc_ids, enc_ids[txt_rows], enc_ids[neg_text]])
    text_mask = torch.cat([attention_mask, attention_mask[txt_rows], attention_mask[neg_text]])
    states = torch.cat([text_states, text_states[txt_rows], text_states[neg_text]])
    images = torch.cat([image_embeds, image_embeds[neg_image], image_embeds[img_rows]])
    logits = backbone.match_logits(text_ids, text_mask, images, text_states=states)
    labels = torch.zeros(logits.size(0), dtype=torch.long, device=logits.device)
    labels[: input_ids.size(0)] = 1
    return itc, F.cross_entropy(logits, labels)


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


__all__ = ["itc_itm_losses", "itc_loss", "mask_tokens", "mlm_loss", "sample_hard_negatives", "shifted_lm_loss"]
