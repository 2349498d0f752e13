"""XVLM downstream tasks: retrieval (ITC + ITM, ITM-only re-ranking), captioning and generative VQA.

Batches, metric names (``val/txt_r1``, ``val/cider``, ``val/vqa_acc`` ...), results files and the
cross-process gathering are the BLIP modules'; their evaluation plumbing (which only talks to the
backbone through ``encode_image`` / ``encode_text`` / ``image_features`` / ``text_features`` /
``decode``, all of which ``XVLMBackbone`` offers) is reused as is. What differs is XVLM's: the
first token is ``[CLS]`` everywhere (no ``[ENC]``/``[DEC]``), ITM reads the fusion encoder's output
of the text encoder's states, retrieval ranks by the ITM logit alone, captioning runs the text +
fusion stack with causal masks, VQA decodes with a copy of the fusion layers, and the optimiser is
AdamW(0.9, 0.98) without decay on biases/LayerNorms and a linear schedule with 10% warmup.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from mflightning.models.blip import itc_loss, sample_hard_negatives, shifted_lm_loss
from mflightning.models.xvlm import PRESET_NAME, XVLMBackbone
from mflightning.tasks.base import BlipTaskModule, _require, load_tokenizer
from mflightning.tasks.captioning import CaptioningModule
from mflightning.tasks.distributed import gather_objects, rank
from mflightning.tasks.retrieval import RetrievalModule, recall_from_scores, rerank_scores
from mflightning.tasks.vqa import VQAModule, load_answer_list


def build_xvlm_backbone(spec: Any, tokenizer: Any) -> XVLMBackbone:
    """Backbone from a ``save_pretrained`` dir / state-dict file, a config dict (vocabulary and pad id
    default to the tokenizer's) or an ``XVLMBackbone``; checked against the tokenizer."""
    if isinstance(spec, XVLMBackbone):
        backbone = spec
    elif isinstance(spec, (str, os.PathLike)):
        backbone = XVLMBackbone.from_pretrained(spec)
    elif isinstance(spec, Mapping):
        config = dict(spec)
        config.setdefault("vocab_size", len(tokenizer))
        config.setdefault("pad_token_id", tokenizer.pad_token_id)
        backbone = XVLMBackbone(config)
    elif spec is None:
        raise ValueError("backbone is required: an XVLM checkpoint directory/file or a config dict")
    else:
        raise TypeError(f"backbone must be a path, a config dict or an XVLMBackbone, got {type(spec).__name__}")
    vocab, pad = backbone.config.vocab_size, backbone.config.pad_token_id
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the backbone's vocabulary is {vocab}")
    if tokenizer.pad_token_id != pad:
        raise ValueError(f"tokenizer [PAD] id {tokenizer.pad_token_id} differs from the backbone's pad_token_id {pad}")
    return backbone


def linear_warmup_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warmup to 1, then linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def itc_itm_losses(backbone: XVLMBackbone, image_embeds: torch.Tensor, text_states: torch.Tensor,
                   attention_mask: torch.Tensor, image_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """XVLM's ITC (captions of one image are positives) and ITM with one hard negative each way.

    The ITM pairs reuse the text encoder states of the ITC pass (the fusion encoder reads them),
    negatives are sampled from the ITC similarities, never from the same image.
    """
    image_feat = backbone.image_features(image_embeds)
    text_feat = backbone.text_features(text_states)
    with torch.no_grad():
        backbone.temp.clamp_(0.001, 0.5)
    itc = itc_loss(image_feat, text_feat, backbone.temp, image_idx, image_idx)
    with torch.no_grad():
        sim = image_feat @ text_feat.t() / backbone.temp
        same = image_idx.view(-1, 1) == image_idx.view(1, -1)
        txt_rows, neg_image = sample_hard_negatives(sim.t(), same)  # a negative image per caption
        img_rows, neg_text = sample_hard_negatives(sim, same)  # a negative caption per image
    states = torch.cat([text_states, text_states[txt_rows], text_states[neg_text]])
    masks = torch.cat([attention_mask, attention_mask[txt_rows], attention_mask[neg_text]])
    images = torch.cat([image_embeds, image_embeds[neg_image], image_embeds[img_rows]])
    logits = backbone.itm_logits(backbone.fuse(states, masks, images))
    labels = torch.zeros(logits.size(0), dtype=torch.long, device=logits.device)
    labels[: text_states.size(0)] = 1
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


def itm_score_matrices(sims: torch.Tensor, itm: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """XVLM's re-ranked matrices: the ITM logit on each query's ITC top-k, -inf elsewhere.

    ``itm`` is dense (images x texts, NaN where not computed). Returns (scores_i2t: images x texts,
    scores_t2i: texts x images).
    """
    n_img, n_txt = sims.shape
    top_txt = sims.topk(min(k, n_txt), dim=1).indices
    top_img = sims.t().topk(min(k, n_img), dim=1).indices
    i2t, t2i = itm.gather(1, top_txt), itm.t().gather(1, top_img)
    if torch.isnan(i2t).any() or torch.isnan(t2i).any():
        raise RuntimeError("retrieval: an ITM score needed for re-ranking was not computed")
    scores_i2t = torch.full((n_img, n_txt), float("-inf")).scatter_(1, top_txt, i2t)
    scores_t2i = torch.full((n_txt, n_img), float("-inf")).scatter_(1, top_img, t2i)
    return scores_i2t, scores_t2i


@torch.no_grad()
def beam_search(step: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor, num_beams: int,
                min_length: int, max_length: int, eos_token_id: int, length_penalty: float = 1.0) -> list[list[int]]:
    """Beam search continuing ``prompt`` ``(B, P)``; returns each item's generated ids (eos dropped).

    ``step(seqs)`` gives next-token logits ``(B*K, V)`` for ``seqs`` ``(B*K, t)`` (row ``b*K + j`` is
    beam j of item b). Lengths count the prompt; eos is blocked below ``min_length``. Finished
    hypotheses are scored by summed log-probability / (generated tokens incl. eos) ** length_penalty;
    an item stops when it has K finished hypotheses that no running beam can beat (as in HF).
    """
    batch, prompt_len = prompt.shape
    k = num_beams
    seqs = prompt.repeat_interleave(k, dim=0)
    scores = torch.full((batch, k), float("-inf"), device=prompt.device)
    scores[:, 0] = 0.0  # identical beams at the start: let only the first one expand
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    while seqs.size(1) < max_length and not all(done):
        logp = step(seqs).float().log_softmax(dim=-1)
        if seqs.size(1) < min_length:
            logp[:, eos_token_id] = float("-inf")
        vocab = logp.size(-1)
        top_scores, top_ids = (scores.view(-1, 1) + logp).view(batch, k * vocab).topk(2 * k, dim=1)
        generated = seqs.size(1) + 1 - prompt_len
        rows, tokens, new_scores = [], [], []
        for b in range(batch):
            running = []
            for rank_, (score, flat) in enumerate(zip(top_scores[b].tolist(), top_ids[b].tolist())):
                beam, token = divmod(flat, vocab)
                if done[b] or len(running) == k:
                    break
                if token == eos_token_id:
                    if rank_ < k and score > float("-inf"):
                        hyp = seqs[b * k + beam, prompt_len:].tolist()
                        finished[b] = sorted(finished[b] + [(score / generated ** length_penalty, hyp)],
                                             reverse=True)[:k]
                else:
                    running.append((score, b * k + beam, token))
            while len(running) < k:  # finished items (or too few candidates) keep placeholder beams
                running.append((float("-inf"), b * k, eos_token_id))
            best_running = running[0][0]
            if len(finished[b]) == k and finished[b][-1][0] >= best_running / generated ** length_penalty:
                done[b] = True
            for score, row, token in running:
                rows.append(row)
                tokens.append(token)
                new_scores.append(score)
        index = torch.tensor(rows, device=seqs.device)
        seqs = torch.cat([seqs[index], torch.tensor(tokens, device=seqs.device).view(-1, 1)], dim=1)
        scores = torch.tensor(new_scores, device=seqs.device).view(batch, k)
    generated = seqs.size(1) - prompt_len
    out = []
    for b in range(batch):
        pool = list(finished[b])
        if not done[b]:  # max_length reached: running beams compete as they are
            pool += [(s / max(1, generated) ** length_penalty, seqs[b * k + j, prompt_len:].tolist())
                     for j, s in enumerate(scores[b].tolist()) if s > float("-inf")]
        out.append(max(pool, key=lambda item: item[0])[1] if pool else [])
    return out


class XVLMTaskModule(pl.LightningModule):
    """Base of the XVLM task modules: ``self.backbone`` (``XVLMBackbone``), ``self.tokenizer``, optimiser.

    Args:
        backbone: ``XVLMBackbone.save_pretrained`` directory or state-dict file, a config dict
            (``XVLMConfig`` fields; vocabulary/pad id default to the tokenizer's) or a backbone.
        tokenizer: name/path for ``mflightning.data.build_tokenizer`` or a tokenizer object.
        lr, weight_decay, betas: AdamW; biases, LayerNorms and the temperature get no weight decay.
        warmup_ratio: fraction of the optimizer steps of linear warmup; then linear decay to 0.
        output_dir: where results files go (default: the trainer's log dir).
    """

    pruning_preset = PRESET_NAME
    # Backbone parts (parameter name prefixes) this task never runs: frozen, so that plain DDP (which
    # requires every trainable parameter to get a gradient) works and the optimiser skips them.
    unused_parts: tuple[str, ...] = ()

    def __init__(self, backbone: Any = None, tokenizer: Any = "bert-base-uncased", lr: float = 3e-5,
                 weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.98), warmup_ratio: float = 0.1,
                 output_dir: str | None = None):
        super().__init__()
        ignore = [name for name, value in (("backbone", backbone), ("tokenizer", tokenizer))
                  if not isinstance(value, (str, os.PathLike, Mapping, type(None)))]
        self.save_hyperparameters(ignore=ignore)
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.tokenizer = load_tokenizer(tokenizer)
        self.backbone = build_xvlm_backbone(backbone, self.tokenizer)
        self.freeze_unused_parts()
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_ratio = warmup_ratio
        self.output_dir = output_dir
        self.eval_results: dict[str, dict[str, float]] = {}
        self.results_paths: dict[str, Any] = {}

    freeze_unused_parts = BlipTaskModule.freeze_unused_parts

    # Results files and logged metrics: the BLIP modules' (same names, rank-0 files, sync'd logs).
    results_dir = BlipTaskModule.results_dir
    write_results = BlipTaskModule.write_results
    log_metrics = BlipTaskModule.log_metrics

    @property
    def dec_token_id(self) -> int:
        """XVLM starts every text, answers and captions included, with [CLS]."""
        return int(self.tokenizer.cls_token_id)

    pad_token_id = BlipTaskModule.pad_token_id
    sep_token_id = BlipTaskModule.sep_token_id

    # ----------------------------------------------------------------- pruning hooks
    # The backbone's forward runs the image, text and fusion encoders (and the VQA decoder, if any).
    calibration_step = BlipTaskModule.calibration_step

    def pruning_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """XVLM pretraining loss ITC + ITM + MLM (+ the decoder's LM loss, if any) for gradient-based baselines."""
        _require(batch, ("image", "input_ids", "attention_mask"), "calibration batch")
        ids, att = batch["input_ids"], batch["attention_mask"]
        image_embeds = self.backbone.encode_image(batch["image"])
        image_idx = batch.get("image_idx")
        if image_idx is None:
            image_idx = torch.arange(ids.size(0), device=ids.device)
        itc, itm = itc_itm_losses(self.backbone, image_embeds, self.backbone.encode_text(ids, att), att, image_idx)
        masked, labels = mask_tokens(ids, att, self.tokenizer)
        logits = self.backbone.mlm_logits(self.backbone.encode_grounded(masked, att, image_embeds)).float()
        mlm = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100) \
            if (labels != -100).any() else logits.sum() * 0.0
        loss = itc + itm + mlm
        if self.backbone.text_decoder is not None:  # a task's decoder: LM loss as in calibration_step
            states = self.backbone.encode_grounded(ids, att, image_embeds)
            logits = self.backbone.decode(ids, att, states, att)
            loss = loss + shifted_lm_loss(logits, ids.masked_fill(att == 0, -100))
        return loss

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]  # biases, norms, temp
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=self.lr, betas=self.betas)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the linear schedule needs a finite number of steps: set max_epochs or max_steps")
        warmup = int(self.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_lambda(int(total), warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


EVAL_HOOKS = ("on_validation_epoch_start", "on_test_epoch_start", "validation_step", "test_step",
              "on_validation_epoch_end", "on_test_epoch_end", "_eval_step", "_evaluate")


def blip_eval_hooks(source: type) -> Callable[[type], type]:
    """Class decorator: take the BLIP task's evaluation hooks (reset outputs, collect per batch, gather
    and score at epoch end) for those the class does not define itself."""

    def decorate(cls: type) -> type:
        for name in EVAL_HOOKS:
            if name not in cls.__dict__:
                setattr(cls, name, getattr(source, name))
        return cls

    return decorate


@blip_eval_hooks(RetrievalModule)
class XVLMRetrievalModule(XVLMTaskModule):
    """XVLM image-text retrieval (COCO/Flickr protocol; authors: lr 3e-5, wd 0.01, 10 epochs).

    Training: ITC with in-batch positives (captions sharing ``image_idx``) + ITM with hard
    negatives. Evaluation: ITC similarities of all pairs; each query's top ``k_test`` re-scored by
    the ITM logit alone; text/image R@1/5/10 logged as ``val/txt_r1`` ... ``test/r_mean``.
    """

    unused_parts = ("bbox_head", "text_encoder.cls.predictions.transform", "text_encoder.cls.predictions.bias")

    def __init__(self, *args: Any, k_test: int = 256, itm_batch_size: int = 128, **kwargs: Any):
        kwargs.setdefault("lr", 3e-5)
        super().__init__(*args, **kwargs)
        if k_test < 1 or itm_batch_size < 1:
            raise ValueError(f"k_test and itm_batch_size must be >= 1, got {k_test}, {itm_batch_size}")
        self.k_test = k_test
        self.itm_batch_size = itm_batch_size
        self._eval_outputs: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        _require(batch, ("image", "input_ids", "attention_mask", "image_idx"), "retrieval train batch")
        image_embeds = self.backbone.encode_image(batch["image"])
        text_states = self.backbone.encode_text(batch["input_ids"], batch["attention_mask"])
        itc, itm = itc_itm_losses(self.backbone, image_embeds, text_states, batch["attention_mask"], batch["image_idx"])
        loss = itc + itm
        self.log_dict({"train/loss_itc": itc, "train/loss_itm": itm, "train/loss": loss},
                      prog_bar=True, batch_size=batch["image"].size(0))
        return loss

    @torch.no_grad()
    def _evaluate(self, stage: str) -> None:
        """Gather features, ITC top-k, ITM for the owned images, recall from ITM-only scores."""
        outputs, self._eval_outputs = self._eval_outputs, []
        keys = ("image_idx", "image_feat", "text_idx", "text_image_idx", "text_feat", "text_input_ids",
                "text_attention_mask")
        images: dict[int, tuple[int, torch.Tensor]] = {}  # image idx -> (owning rank, ITC feature)
        texts: dict[int, tuple] = {}  # text idx -> (feature, ids, mask, image idx)
        for r, batches in enumerate(gather_objects([{k: o[k] for k in keys} for o in outputs])):
            for b in batches:
                for j, idx in enumerate(b["image_idx"].tolist()):
                    images.setdefault(idx, (r, b["image_feat"][j]))
                for j, idx in enumerate(b["text_idx"].tolist()):
                    texts.setdefault(idx, (b["text_feat"][j], b["text_input_ids"][j], b["text_attention_mask"][j],
                                           int(b["text_image_idx"][j])))
        if not images or not texts:
            raise RuntimeError(f"retrieval {stage}: no images or texts were evaluated")
        image_ids, text_ids = sorted(images), sorted(texts)
        position = {idx: p for p, idx in enumerate(image_ids)}
        orphans = [t for t in text_ids if texts[t][3] not in position]
        if orphans:
            raise ValueError(f"retrieval {stage}: texts {orphans[:5]} belong to images that were not evaluated")
        img_feats = torch.stack([images[i][1] for i in image_ids]).float()
        txt_feats = torch.stack([texts[t][0] for t in text_ids]).float()
        tokens = torch.stack([texts[t][1] for t in text_ids])
        masks = torch.stack([texts[t][2] for t in text_ids])
        txt2img = [position[texts[t][3]] for t in text_ids]
        img2txt: list[list[int]] = [[] for _ in image_ids]
        for p, i in enumerate(txt2img):
            img2txt[i].append(p)
        sims = img_feats @ txt_feats.t()

        # ITM for the images this process owns, with its local copy of their ViT tokens.
        local = {}
        for o in outputs:
            for j, idx in enumerate(o["image_idx"].tolist()):
                if images[idx][0] == rank():
                    local.setdefault(idx, o["image_embeds"][j])

        def itm_score(i: int, chosen: torch.Tensor) -> torch.Tensor:
            embeds, scores = local[image_ids[i]], []
            for start in range(0, chosen.numel(), self.itm_batch_size):
                rows = chosen[start:start + self.itm_batch_size]
                ids, att = tokens[rows].to(self.device), masks[rows].to(self.device)
                with self.trainer.precision_plugin.forward_context():
                    fused = self.backbone.encode_grounded(ids, att, embeds.unsqueeze(0).expand(rows.numel(), -1, -1))
                    scores.append(self.backbone.itm_logits(fused)[:, 1].float().cpu())
            return torch.cat(scores)

        itm = torch.full_like(sims, float("nan"))
        mine = sorted(position[idx] for idx in local)
        for rows, cols, values in gather_objects(rerank_scores(sims, itm_score, self.k_test, images=mine)):
            itm[rows, cols] = values
        scores_i2t, scores_t2i = itm_score_matrices(sims, itm, self.k_test)
        self.log_metrics(stage, recall_from_scores(scores_i2t, scores_t2i, txt2img, img2txt))


@blip_eval_hooks(CaptioningModule)
class XVLMCaptioningModule(XVLMTaskModule):
    """XVLM captioning (COCO Karpathy; authors: lr 1e-5, 5 epochs).

    The text and fusion layers run with causal self-attention masks and the MLM head predicts the
    next token (XVLM fine-tunes its encoder as the captioner; no separate decoder). Training: LM
    loss with label smoothing on ``"<prompt><caption>"``, prompt and padding not in the loss.
    Evaluation: beam search (lengths count the prompt, as in BLIP), ``caption_scores`` logged as
    ``val/bleu4``, ``val/cider`` ..., COCO results JSON ``[{"image_id", "caption"}]``.
    """

    unused_parts = ("vision_proj", "text_proj", "itm_head", "bbox_head", "temp")

    def __init__(self, *args: Any, prompt: str = "a picture of ", label_smoothing: float = 0.1, num_beams: int = 3,
                 min_length: int = 5, max_length: int = 20, meteor: bool = True, **kwargs: Any):
        kwargs.setdefault("lr", 1e-5)
        super().__init__(*args, **kwargs)
        self.meteor = meteor  # read by the shared evaluation (CaptioningModule._evaluate)
        self.prompt = prompt
        self.label_smoothing = label_smoothing
        self.num_beams = num_beams
        self.min_length = min_length
        self.max_length = max_length
        # [CLS] + prompt word pieces ([SEP] dropped): positions excluded from the loss.
        self.prompt_length = len(self.tokenizer(prompt).input_ids) - 1
        if max_length <= self.prompt_length:
            raise ValueError(f"max_length {max_length} leaves no room after the {self.prompt_length}-token prompt")
        self._eval_outputs: list[tuple[Any, str, list[str]]] = []

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        _require(batch, ("image", "input_ids", "attention_mask"), "captioning train batch")
        ids, att = batch["input_ids"], batch["attention_mask"]
        labels = ids.masked_fill(att == 0, -100)
        labels[:, : self.prompt_length] = -100
        logits = self.backbone.caption_logits(ids, att, self.backbone.encode_image(batch["image"]))
        loss = shifted_lm_loss(logits, labels, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=ids.size(0))
        return loss

    @torch.no_grad()
    def generate(self, image: torch.Tensor) -> list[str]:
        """Captions for a batch of images (prompt removed)."""
        image_embeds = self.backbone.encode_image(image)
        prompt = self.tokenizer([self.prompt] * image.size(0), return_tensors="pt").input_ids[:, :-1].to(image.device)
        beams = image_embeds.repeat_interleave(self.num_beams, dim=0)

        def step(seqs: torch.Tensor) -> torch.Tensor:
            return self.backbone.caption_logits(seqs, torch.ones_like(seqs), beams)[:, -1]

        generated = beam_search(step, prompt, self.num_beams, self.min_length, self.max_length, self.sep_token_id)
        return [text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]


@blip_eval_hooks(VQAModule)
class XVLMVQAModule(XVLMTaskModule):
    """XVLM generative VQA (VQA v2 protocol; authors: lr 5e-5, 10 epochs).

    The question is encoded by the text and fusion encoders (cross-attending to the image); the
    answer is decoded by ``backbone.text_decoder`` (added here if absent: a copy of the fusion
    layers with causal self-attention) cross-attending to the question states. Training loss,
    answer ranking (first-token top ``k_test``, re-ranked by full likelihood), predictions JSON and
    ``val/vqa_acc`` are the BLIP module's.

    ``answer_list``: JSON path or list; None uses the datamodule's ``answer_list`` attribute.
    """

    unused_parts = ("vision_proj", "text_proj", "itm_head", "bbox_head", "temp", "text_encoder.cls.predictions.transform", "text_encoder.cls.predictions.bias")
    training_step = VQAModule.training_step
    _answers = VQAModule._answers
    rank_answers = VQAModule.rank_answers
    predict_answers = VQAModule.predict_answers

    def __init__(self, *args: Any, answer_list: str | list[str] | None = None, k_test: int = 128,
                 label_smoothing: float = 0.1, rank_batch_size: int = 1024, **kwargs: Any):
        kwargs.setdefault("lr", 5e-5)
        super().__init__(*args, **kwargs)
        if k_test < 1:
            raise ValueError(f"k_test must be >= 1, got {k_test}")
        self.backbone.add_decoder_()
        self.answer_list = load_answer_list(answer_list) if answer_list is not None else None
        self.k_test = k_test
        self.label_smoothing = label_smoothing
        self.rank_batch_size = rank_batch_size
        self._answer_tokens: tuple[torch.Tensor, torch.Tensor] | None = None
        self._eval_outputs: list[tuple[int, str, list[str] | None]] = []

    def encode_question(self, image: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
        """Image-grounded question states ``(B, L, D)`` (text encoder, then fusion encoder)."""
        return self.backbone.encode_grounded(input_ids, attention_mask, self.backbone.encode_image(image))


__all__ = [
    "XVLMTaskModule", "XVLMRetrievalModule", "XVLMCaptioningModule", "XVLMVQAModule", "build_xvlm_backbone",
    "beam_search", "itc_itm_losses", "itm_score_matrices", "linear_warmup_lambda", "mask_tokens",
]
