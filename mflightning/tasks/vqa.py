"""Generative VQA on any backbone: weighted answer LM training, ranking of a fixed answer list at inference."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch

from mflightning.metrics import vqa_accuracy
from mflightning.losses import shifted_lm_loss
from mflightning.tasks.base import EvaluationLoop, TaskModule, _require
from mflightning.tasks.distributed import dedupe, gather_objects

TRAIN_KEYS = ("image", "question_input_ids", "question_attention_mask", "answer_input_ids",
              "answer_attention_mask", "answer_weights", "n_answers")
EVAL_KEYS = ("image", "question_input_ids", "question_attention_mask", "question_id")
#: How a ranked candidate answer is scored: its log-likelihood; minus its label-smoothed loss (the BLIP
#: authors' decoder returns that loss); the log-likelihood plus the first token's log-probability again
#: (the XVLM authors' ``rank_answer``).
RankScore = Literal["log_likelihood", "smoothed_loss", "first_token_twice"]
RANK_SCORES = ("log_likelihood", "smoothed_loss", "first_token_twice")


def load_answer_list(answer_list: str | os.PathLike | Sequence[str]) -> list[str]:
    """The candidate answers: a JSON file holding a list of strings, or the list itself."""
    source = "answer list"
    if isinstance(answer_list, (str, os.PathLike)):
        source = str(answer_list)
        path = Path(answer_list)
        if not path.is_file():
            raise FileNotFoundError(f"answer list file {source!r} does not exist")
        answer_list = json.loads(path.read_text())
    if not isinstance(answer_list, Sequence) or isinstance(answer_list, str):
        raise TypeError(f"{source}: expected a list of answer strings, got {type(answer_list).__name__}")
    bad = [(i, a) for i, a in enumerate(answer_list) if not isinstance(a, str) or not a.strip()]
    if bad:
        raise ValueError(f"{source}: entries must be non-empty strings, e.g. index {bad[0][0]}: {bad[0][1]!r}")
    if not answer_list:
        raise ValueError(f"{source}: the answer list is empty")
    return list(answer_list)


class VQAModule(EvaluationLoop, TaskModule):
    """Generative VQA (VQA v2 protocol), BLIP's settings by default.

    The question is encoded by the backbone's image-grounded encoder (BLIP: first token [ENC];
    XVLM: text then fusion encoder); the answer is decoded by its answer decoder (BLIP: first token
    [DEC]; XVLM: a copy of the fusion layers, added here if absent) attending to the question
    states. Training: per answer LM loss (summed over its tokens, label smoothing
    ``label_smoothing``) times its weight, summed per question, averaged over the batch.
    Inference ranks ``answer_list``: the top ``k_test`` (capped) by first-token probability,
    re-ranked by ``rank_score`` of each candidate ``answer + candidate_suffix``. Predictions
    ``[{"question_id", "answer"}]`` are written as JSON; VQA accuracy is logged when the eval batches
    carry ``answers``.

    ``answer_list``: JSON path or list; None uses the datamodule's ``answer_list`` attribute.
    ``rank_score``: ``"log_likelihood"`` (sum of the candidate's token log-probabilities, the default);
    ``"smoothed_loss"``: minus its LM loss with ``label_smoothing`` (the BLIP authors' ``rank_answer``:
    their decoder's loss is label-smoothed); ``"first_token_twice"``: the log-likelihood plus the
    first answer token's log-probability once more (the XVLM authors' ``rank_answer``).
    ``candidate_suffix``: text appended to every candidate before tokenizing (the XVLM authors append
    ``"[SEP]"``, so a candidate ends with two [SEP] tokens, like their training answers).
    """

    task = "vqa"

    def __init__(
        self, *args: Any, answer_list: str | list[str] | None = None, k_test: int = 128,
        label_smoothing: float = 0.1, rank_batch_size: int = 1024, rank_score: RankScore = "log_likelihood",
        candidate_suffix: str = "", **kwargs: Any,
    ):
        kwargs.setdefault("lr", 2e-5)
        kwargs.setdefault("weight_decay", 0.05)
        super().__init__(*args, **kwargs)
        if k_test < 1:
            raise ValueError(f"k_test must be >= 1, got {k_test}")
        if rank_score not in RANK_SCORES:
            raise ValueError(f"rank_score must be one of {RANK_SCORES}, got {rank_score!r}")
        self.rank_score = rank_score
        self.candidate_suffix = candidate_suffix
        self.answer_list = load_answer_list(answer_list) if answer_list is not None else None
        self.k_test = k_test
        self.label_smoothing = label_smoothing
        self.rank_batch_size = rank_batch_size
        self._answer_tokens: tuple[torch.Tensor, torch.Tensor] | None = None
        self._eval_outputs: list[tuple[int, str, list[str] | None]] = []

    def prepare_backbone(self) -> None:
        """The answer decoder (a copy of the fusion layers for XVLM), added before freezing so its own
        LM-head transform and bias train like the rest of it."""
        self.backbone.add_decoder_()

    def encode_question(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Image-grounded question states ``(B, L, D)``."""
        image_embeds = self.backbone.encode_image(image)
        return self.backbone.encode_grounded(self.grounded_ids(input_ids), attention_mask, image_embeds)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        _require(batch, TRAIN_KEYS, "VQA train batch")
        n_answers = batch["n_answers"].long()
        answer_ids = batch["answer_input_ids"]
        if int(n_answers.sum()) != answer_ids.size(0) or batch["answer_weights"].numel() != answer_ids.size(0):
            raise ValueError(f"VQA train batch: n_answers sums to {int(n_answers.sum())} but there are "
                             f"{answer_ids.size(0)} answer rows and {batch['answer_weights'].numel()} weights")
        q_mask = batch["question_attention_mask"]
        q_states = self.encode_question(batch["image"], batch["question_input_ids"], q_mask)
        q_states = q_states.repeat_interleave(n_answers, dim=0)
        q_mask = q_mask.repeat_interleave(n_answers, dim=0)
        answer_ids = self.decoder_ids(answer_ids)
        labels = answer_ids.masked_fill(batch["answer_attention_mask"] == 0, -100)
        logits = self.backbone.decode(answer_ids, batch["answer_attention_mask"], q_states, q_mask)
        per_answer = shifted_lm_loss(logits, labels, label_smoothing=self.label_smoothing, per_sequence=True)
        loss = (batch["answer_weights"].float() * per_answer).sum() / batch["image"].size(0)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].size(0))
        return loss

    # ----------------------------------------------------------------- answer ranking
    def _answers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The answer list tokenized once (first token the backbone's ``dec_token_id``), on this module's device."""
        if self.answer_list is None:
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            source = getattr(datamodule, "answer_list", None)
            if source is None:
                raise ValueError("VQAModule needs answer_list= (JSON path or list) or a datamodule with `answer_list`")
            self.answer_list = load_answer_list(source)
        if self._answer_tokens is None or self._answer_tokens[0].device != self.device:
            candidates = [answer + self.candidate_suffix for answer in self.answer_list]
            tokens = self.tokenizer(candidates, padding="longest", return_tensors="pt")
            if tokens.input_ids.size(1) < 2:
                raise ValueError("answer list tokenizes to no answer tokens")
            ids = self.decoder_ids(tokens.input_ids).to(self.device)
            self._answer_tokens = (ids, tokens.attention_mask.to(self.device))
        return self._answer_tokens

    @torch.no_grad()
    def answer_scores(self, q_states: torch.Tensor, q_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each question's top ``k_test`` candidates by first-token probability (indices into ``answer_list``,
        ``(questions, k)``) and their ``rank_score`` (same shape)."""
        answer_ids, answer_mask = self._answers()
        n_questions, n_candidates = q_states.size(0), answer_ids.size(0)
        k = min(self.k_test, n_candidates)
        start = torch.full((n_questions, 1), self.dec_token_id, dtype=torch.long, device=q_states.device)
        first_logits = self.backbone.decode(start, torch.ones_like(start), q_states, q_mask)[:, 0].float()
        first_prob = first_logits.softmax(dim=-1)[:, answer_ids[:, 1]]  # (questions, candidates)
        topk_prob, topk = first_prob.topk(k, dim=1)
        smoothing = self.label_smoothing if self.rank_score == "smoothed_loss" else 0.0
        scores = torch.empty(n_questions, k, device=q_states.device)
        per_chunk = max(1, self.rank_batch_size // k)
        for s in range(0, n_questions, per_chunk):
            rows = topk[s:s + per_chunk].reshape(-1)
            ids, att = answer_ids[rows], answer_mask[rows]
            states = q_states[s:s + per_chunk].repeat_interleave(k, dim=0)
            mask = q_mask[s:s + per_chunk].repeat_interleave(k, dim=0)
            logits = self.backbone.decode(ids, att, states, mask)
            labels = ids.masked_fill(att == 0, -100)
            nll = shifted_lm_loss(logits, labels, label_smoothing=smoothing, per_sequence=True)
            scores[s:s + per_chunk] = -nll.view(-1, k)
        if self.rank_score == "first_token_twice":
            scores = scores + topk_prob.log()
        return topk, scores

    @torch.no_grad()
    def rank_answers(self, q_states: torch.Tensor, q_mask: torch.Tensor) -> torch.Tensor:
        """Index into ``answer_list`` of each question's answer (first-token top-k, then ``rank_score``)."""
        topk, scores = self.answer_scores(q_states, q_mask)
        return topk[torch.arange(topk.size(0), device=topk.device), scores.argmax(dim=1)]

    @torch.no_grad()
    def predict_answers(self, batch: Mapping[str, Any]) -> list[str]:
        """Answer strings for an eval batch."""
        q_states = self.encode_question(batch["image"], batch["question_input_ids"], batch["question_attention_mask"])
        chosen = self.rank_answers(q_states, batch["question_attention_mask"])
        return [self.answer_list[i] for i in chosen.tolist()]  # type: ignore[index]

    # ----------------------------------------------------------------- evaluation
    def _eval_step(self, batch: Mapping[str, Any]) -> None:
        _require(batch, EVAL_KEYS, "VQA eval batch")
        answers = self.predict_answers(batch)
        humans = batch.get("answers")
        if humans is not None and len(humans) != len(answers):
            raise ValueError(f"VQA eval batch: {len(answers)} questions but {len(humans)} answer lists")
        for j, (qid, answer) in enumerate(zip(batch["question_id"], answers)):
            qid = int(qid)
            self._eval_outputs.append((qid, answer, list(humans[j]) if humans is not None else None))

    def _evaluate(self, stage: str) -> None:
        outputs, self._eval_outputs = self._eval_outputs, []
        items = dedupe((item for part in gather_objects(outputs) for item in part), key=lambda item: item[0])
        if not items:
            raise RuntimeError(f"VQA {stage}: no questions were evaluated")
        self.write_results(stage, "vqa_predictions", [{"question_id": q, "answer": a} for q, a, _ in items])
        with_answers = [item for item in items if item[2] is not None]
        if with_answers and len(with_answers) != len(items):
            raise ValueError(f"VQA {stage}: {len(with_answers)} of {len(items)} questions carry human answers; "
                             "all or none must")
        if with_answers:
            accuracy = vqa_accuracy([a for _, a, _ in items], [h for _, _, h in items])
            self.log_metrics(stage, {"vqa_acc": accuracy})
