"""Image-text retrieval: ITC (momentum encoders, queue, distillation, global batch) + ITM (hard negatives)
training, ITC top-k re-ranked with ITM, on any backbone."""
from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Mapping

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mflightning.losses import (MatchCandidates, itc_itm_losses, itc_similarity, itm_hard_negative_loss,  # noqa: F401
                                positive_targets, soft_cross_entropy)
from mflightning.tasks.base import EvaluationLoop, TaskModule, _require
from mflightning.tasks.distributed import (all_gather, gather_objects, gather_shapes, gather_sizes, pad_length,
                                          rank, scale_grad, to_cpu, world_size)
from mflightning.tasks.momentum import (MOMENTUM_RULES, FeatureQueue, MomentumRule, ema_copy, momentum_update_,
                                        ramped_alpha, start_from_checkpoint_)
from mflightning.tasks.ranking import (SHARED_KEYS, RetrievalSet, merge_outputs,  # noqa: F401
                                       recall_from_scores, rerank_pairs, rerank_scores, topk_score_matrices)

#: The parts the momentum encoders copy, by backbone preset: ITC image and text encoders and projections.
MOMENTUM_PARTS: dict[str, tuple[str, ...]] = {
    "blip": ("vision_model", "text_encoder", "vision_proj", "text_proj"),
    "xvlm": ("vision_encoder", "text_encoder", "vision_proj", "text_proj"),
}
EVAL_KEYS = ("image", "image_idx", "text_input_ids", "text_attention_mask", "text_idx", "text_image_idx")


class RetrievalModule(EvaluationLoop, TaskModule):
    """Image-text retrieval (COCO/Flickr protocol), BLIP's settings by default.

    Training (BLIP's retrieval fine-tuning): ITC + ITM with hard negatives.

    - ITC: each image against the texts of the GLOBAL batch (gathered across processes, gradients
      flowing back to the process that owns each row) plus the queue, and each text against the
      images likewise; every caption of the same image (``image_idx``), in the batch or in the
      queue, is a positive. With momentum encoders the keys are their features (no gradient) and
      the targets mix in their similarities: ``alpha * softmax(sim_m) + (1 - alpha) * positives``,
      ``alpha`` ramped from 0 over the first epoch (``alpha * min(1, batch / batches_per_epoch)``).
    - ITM: each caption's positive pair, a hard-negative image and a hard-negative caption, drawn
      from the global batch (``itm_negatives="local"``: the process's own) by the softmax of the online
      ITC similarities, never of the same image.

    Args (besides ``TaskModule``'s):
        k_test: candidates per query re-scored by ITM at evaluation.
        itm_batch_size: pairs per ITM forward at evaluation.
        momentum: momentum of the EMA encoders (``momentum_parts``: image and text encoders and
            their ITC projections), copied from the backbone; None: no momentum encoders (the ITC keys
            are the online features). Their parameters are declared copies of the backbone's
            (``pruning_copies``), so ``MultiFlowCallback`` gives them the backbone's masks.
        queue_size: rows of the (image feature, text feature, image id) queue; 0: no queue. Any
            global batch size works (the queue wraps around); empty slots are not read.
        alpha: weight of momentum distillation (needs ``momentum``); 0: hard positive targets.
        momentum_from_checkpoint: start the momentum encoders and the queue (full, no positives) from the
            backbone's checkpoint file, which must hold them (BLIP's pretraining ``.pth``), as the authors'
            retrieval does; False: copies of the backbone and an empty queue.
        gather: ITC keys and ITM negatives over the global batch when several processes train;
            False: each process's own batch only (the queue still takes the global batch, so every
            process holds the same one). BLIP's own code scores each process's rows against its
            local momentum features plus the queue; with ``gather=True`` the other processes' current
            features are keys too (the ITC of one process on the concatenated batch).
        itm_negatives: with ``gather``, where ITM hard negatives come from: ``"global"`` (the global
            batch) or ``"local"`` (this process's batch, as both authors' codes: BLIP's
            ``negative_all_rank: False``, XVLM's ``get_matching_loss``).
        gather_backward: with ``gather``, ``"sum"``: each process's features get the gradient of every
            process's ITC loss (the exact gradient of the global batch's loss); ``"local"``: 1/world of it, the
            gradients of the XVLM authors' ``AllGather``, whose backward keeps only the local slice of each
            process's whole-batch loss (``mflightning.tasks.distributed.scale_grad`` says why they agree).
        momentum_rule: ``"ema"``: ``p_m = m * p_m + (1 - m) * p``; ``"swapped"``: ``p_m = m * p + (1 - m) * p_m``,
            as the MultiFlow authors' BLIP retrieval writes it (``_external_momentum_update``), which keeps the
            momentum encoders next to the online ones.

    The momentum update runs once per training step (per micro-batch under gradient
    accumulation, as BLIP's code does: the effective momentum per optimizer step is then
    ``momentum ** k``). Under true half precision (``precision="bf16-true"``) an EMA step of
    ``1 - 0.995`` is below bf16's resolution, so the momentum encoders hardly move: a warning says
    so; use ``bf16-mixed``.

    Small runs (a few epochs on a small dataset): ``momentum=None, queue_size=0, alpha=0`` trains
    with plain in-batch ITC, as the demo and the benchmark do.

    Evaluation: ITC similarities of all image-text pairs; each query's top ``k_test`` (capped by
    the counts) re-scored by ``combine_scores`` (BLIP: ``ITM logit + ITC sim``;
    ``XVLMRetrievalModule``: the ITM logit alone); text and image R@1/5/10 logged as
    ``val/txt_r1`` ... ``test/r_mean``. Outputs are gathered across processes and deduplicated by
    ``image_idx`` / ``text_idx``; each process computes ITM for the images it owns. The momentum
    encoders and the queue play no part in evaluation.
    """

    task = "retrieval"
    #: Backbone parts the momentum encoders copy; None: ``MOMENTUM_PARTS`` of the backbone's preset (the ITC
    #: encoders and projections), else every part retrieval trains.
    momentum_parts: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, *args: Any, k_test: int = 256, itm_batch_size: int = 128, momentum: float | None = 0.995,
                 queue_size: int = 57600, alpha: float = 0.4, gather: bool = True,
                 itm_negatives: Literal["global", "local"] = "global", gather_backward: Literal["sum", "local"] = "sum",
                 momentum_rule: MomentumRule = "ema", momentum_from_checkpoint: bool = False, **kwargs: Any):
        kwargs.setdefault("lr", 1e-5)
        kwargs.setdefault("weight_decay", 0.05)
        if k_test < 1 or itm_batch_size < 1:
            raise ValueError(f"k_test and itm_batch_size must be >= 1, got {k_test}, {itm_batch_size}")
        if momentum is not None and not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must be in (0, 1) or None (no momentum encoders), got {momentum}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
            raise ValueError(f"queue_size must be an int >= 0 (0: no queue), got {queue_size!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if itm_negatives not in ("global", "local"):
            raise ValueError(f"itm_negatives must be 'global' or 'local', got {itm_negatives!r}")
        if gather_backward not in ("sum", "local"):
            raise ValueError(f"gather_backward must be 'sum' or 'local', got {gather_backward!r}")
        if momentum_rule not in MOMENTUM_RULES:
            raise ValueError(f"momentum_rule must be one of {MOMENTUM_RULES}, got {momentum_rule!r}")
        if alpha > 0 and momentum is None:
            raise ValueError(f"alpha={alpha} distils from the momentum encoders, but momentum=None: "
                             "pass alpha=0 (or a momentum)")
        super().__init__(*args, **kwargs)
        self.k_test = k_test
        self.itm_batch_size = itm_batch_size
        self.momentum = momentum
        self.alpha = float(alpha)
        self.gather = bool(gather)
        self.itm_negatives = itm_negatives
        self.gather_backward = gather_backward
        self.momentum_rule = momentum_rule
        self._eval_outputs: list[dict[str, torch.Tensor]] = []
        self.backbone_m: torch.nn.Module | None = None
        if momentum is not None:
            self.backbone_m = ema_copy(self.backbone, self._momentum_parts())
            # the momentum encoders copy the backbone's weights: they take its pruning masks by rule
            self.pruning_copies = {"backbone_m.": "backbone."}
        self.queue = FeatureQueue(queue_size, self._feature_dim()) if queue_size else None
        if momentum_from_checkpoint:
            start_from_checkpoint_(self.backbone, self.backbone_m, self.queue, self.hparams.get("backbone"))

    def _momentum_parts(self) -> tuple[str, ...]:
        if self.momentum_parts is not None:
            return tuple(self.momentum_parts)
        known = MOMENTUM_PARTS.get(getattr(self.backbone, "pruning_preset", None))
        if known is not None:
            return known
        unused = set(self.unused_parts)
        return tuple(name for name, value in {**self.backbone._modules, **self.backbone._parameters}.items()
                     if value is not None and name not in unused and name != "temp")

    def _feature_dim(self) -> int:
        proj = getattr(self.backbone, "vision_proj", None)
        dim = getattr(proj, "out_features", None)
        if not isinstance(dim, int):
            raise ValueError(f"queue_size={self.hparams.get('queue_size')}: cannot tell the ITC feature size of "
                             f"{type(self.backbone).__name__} (no vision_proj Linear); pass queue_size=0")
        return dim

    def combine_scores(self, itm: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
        """Re-ranking score of each (image, text) pair from its ITM logit and ITC similarity (BLIP: the sum)."""
        return itm + sims

    def current_alpha(self, batch_idx: int) -> float:
        """The distillation weight at this batch: ``alpha`` ramped over the first epoch (0 without momentum)."""
        if self.backbone_m is None:
            return 0.0
        trainer = self._trainer
        batches = float(trainer.num_training_batches) if trainer is not None else math.inf
        epoch = self.current_epoch if trainer is not None else 1
        return ramped_alpha(self.alpha, epoch, batch_idx, batches)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        _require(batch, ("image", "input_ids", "attention_mask", "image_idx"), "retrieval train batch")
        alpha = self.current_alpha(batch_idx)
        itc, itm = self.retrieval_losses(batch, alpha)
        loss = itc + itm
        logged = {"train/loss_itc": itc, "train/loss_itm": itm, "train/loss": loss}
        if self.backbone_m is not None and self.alpha > 0:
            logged["train/alpha"] = alpha
        self.log_dict(logged, prog_bar=True, batch_size=batch["image"].size(0))
        return loss

    def retrieval_losses(self, batch: Mapping[str, Any], alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(ITC, ITM) of one training batch (see the class docstring); updates the momentum encoders
        first and enqueues the batch's keys after, as training does."""
        bb = self.backbone
        image, input_ids, attention_mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        idx = batch["image_idx"].view(-1).long()
        image_embeds = bb.encode_image(image)
        text_states = bb.encode_text(input_ids, attention_mask)
        image_feat = bb.image_features(image_embeds)
        text_feat = bb.text_features(text_states)
        with torch.no_grad():
            bb.temp.clamp_(0.001, 0.5)
        temp = bb.temp

        many = self.gather and world_size() > 1
        sizes = length = None
        if many:  # batch sizes, and sequence lengths: a collate padding to the longest caption differs per rank
            shapes = gather_shapes(idx.numel(), input_ids.size(1), device=idx.device)
            sizes, length = [n for n, _ in shapes], max(L for _, L in shapes)

        def gather(t: torch.Tensor) -> torch.Tensor:  # the identity on one process or with gather=False
            return all_gather(t, sizes) if many else t

        if many and self.gather_backward == "local":  # the XVLM authors' gradients: 1/world of the exact ones
            image_feat, text_feat = scale_grad(image_feat, 1 / world_size()), scale_grad(text_feat, 1 / world_size())
        idx_all = gather(idx)
        image_feat_all, text_feat_all = gather(image_feat), gather(text_feat)  # with gradients

        # ----- ITC: local rows against the global batch's keys (+ the queue)
        if self.backbone_m is not None:
            with torch.no_grad():
                momentum_update_(self.backbone_m, bb, float(self.momentum), self.momentum_rule)
                m = self.backbone_m
                image_feat_m = m.image_features(m.encode_image(image))
                text_feat_m = m.text_features(m.encode_text(input_ids, attention_mask))
                batch_image_keys, batch_text_keys = gather(image_feat_m), gather(text_feat_m)
        else:
            batch_image_keys, batch_text_keys = image_feat_all, text_feat_all
        image_keys, text_keys, key_idx = batch_image_keys, batch_text_keys, idx_all
        if self.queue is not None:
            image_keys = torch.cat([image_keys, self.queue.image_feat.to(image_keys.dtype)])
            text_keys = torch.cat([text_keys, self.queue.text_feat.to(text_keys.dtype)])
            key_idx = torch.cat([key_idx, self.queue.image_idx])
        sim_i2t = itc_similarity(image_feat, text_keys, temp)
        if image_keys is image_feat and text_keys is text_feat:  # in-batch ITC of one process: one product
            sim_t2i = sim_i2t.t()
        else:
            sim_t2i = itc_similarity(text_feat, image_keys, temp)
        targets = positive_targets(idx, key_idx)  # a caption's image is its own row's: one matrix for both
        targets_i2t = targets_t2i = targets
        if self.backbone_m is not None and alpha > 0:
            with torch.no_grad():
                soft_i2t = F.softmax(itc_similarity(image_feat_m, text_keys, temp), dim=1)
                soft_t2i = F.softmax(itc_similarity(text_feat_m, image_keys, temp), dim=1)
                targets_i2t = alpha * soft_i2t + (1 - alpha) * targets
                targets_t2i = alpha * soft_t2i + (1 - alpha) * targets
        itc = (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2
        if self.queue is not None:  # the global batch's keys, in rank order, whatever `gather` says
            queued = (batch_image_keys, batch_text_keys, idx_all)
            if world_size() > 1 and not many:  # every rank must hold the same queue
                sizes_q = gather_sizes(idx.numel(), idx.device)
                queued = tuple(all_gather(t.detach(), sizes_q) for t in queued)
            self.queue.enqueue(*queued)

        # ----- ITM: hard negatives from the global (or local) batch, by the online similarities
        global_negatives = many and self.itm_negatives == "global"
        if not global_negatives:  # negatives from this process's batch only
            idx_all, text_feat_all, image_feat_all = idx, text_feat, image_feat
        if self.backbone_m is None and self.queue is None and sim_i2t.size(1) == idx_all.numel():
            sample_i2t, sample_t2i = sim_i2t, sim_t2i  # the ITC similarities are those already
        else:
            with torch.no_grad():
                sample_i2t = itc_similarity(image_feat, text_feat_all, temp)
                sample_t2i = itc_similarity(text_feat, image_feat_all, temp)
        enc_ids = self.grounded_ids(input_ids)
        same = idx.view(-1, 1) == idx_all.view(1, -1)
        candidates = None
        if global_negatives:  # every rank's texts padded to the longest (padding is masked out), then gathered
            enc_ids, attention_mask = pad_length(enc_ids, length), pad_length(attention_mask, length)
            # the text states travel only to a backbone whose ITM reads them (XVLM's fusion); BLIP re-encodes
            if getattr(bb, "match_reads_text_states", True):
                text_states = pad_length(text_states, length)
                gathered_states = gather(text_states)
            else:
                text_states = gathered_states = None
            candidates = MatchCandidates(gather(enc_ids), gather(attention_mask), gathered_states,
                                         gather(image_embeds))
        itm = itm_hard_negative_loss(bb, enc_ids, attention_mask, text_states, image_embeds, sample_i2t, sample_t2i,
                                     same, candidates)
        return itc, itm

    def on_train_start(self) -> None:
        if self.backbone_m is not None:
            dtype = next(self.backbone_m.parameters()).dtype
            if dtype in (torch.bfloat16, torch.float16):
                rank_zero_warn(f"momentum encoders are held in {dtype}: an EMA step of {1 - float(self.momentum):g} "
                               "is below its resolution, so they barely follow the backbone; train in mixed "
                               "precision (bf16-mixed) instead of true half precision")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint saved without momentum encoders or queue (older runs, or other settings) still
        loads: the momentum encoders start from its backbone weights, the queue empty; one saved with
        them loads into a module without them (their tensors are dropped, with a log line)."""
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict):
            return
        filled = []
        for name, value in self.state_dict().items():
            if name in state:
                continue
            if name.startswith("backbone_m.") and "backbone." + name[len("backbone_m."):] in state:
                state[name] = state["backbone." + name[len("backbone_m."):]].clone()
                filled.append(name)
            elif name.startswith("queue."):
                state[name] = value.clone()
                filled.append(name)
        if filled:
            rank_zero_info(f"[mflightning] the checkpoint has no momentum encoders / queue ({len(filled)} tensors): "
                           "momentum encoders start from its backbone, the queue empty")
        # ... and one trained with them loads into a module without (e.g. momentum=None to evaluate): dropped
        own = self.state_dict()
        dropped = [k for k in state if k.startswith(("backbone_m.", "queue.")) and k not in own]
        for name in dropped:
            del state[name]
        if dropped:
            rank_zero_info(f"[mflightning] dropped the checkpoint's {len(dropped)} momentum-encoder / queue tensors "
                           "this module does not hold (momentum=None or queue_size=0)")

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
