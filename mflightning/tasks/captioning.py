"""Image captioning on any backbone: prompted LM training, beam-search generation, COCO metrics."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from mflightning.metrics import caption_scores
from mflightning.models.generation import LENGTH_NORMALISATIONS, LengthNormalisation
from mflightning.losses import shifted_lm_loss
from mflightning.tasks.base import EvaluationLoop, TaskModule, _require
from mflightning.tasks.distributed import broadcast_from_zero, dedupe, gather_objects


def coco_image_id(image_id: Any) -> Any:
    """COCO results use integer ids: a decimal string becomes an int, anything else is kept."""
    if isinstance(image_id, str) and image_id.isdigit():
        return int(image_id)
    return image_id


class CaptioningModule(EvaluationLoop, TaskModule):
    """Captioning (COCO Karpathy protocol), BLIP's settings by default.

    Training: LM loss with label smoothing on ``"<prompt><caption>"`` (first token the backbone's
    ``dec_token_id``: BLIP's [DEC]; XVLM keeps [CLS]) through the backbone's ``caption_logits``
    (BLIP: its decoder; XVLM: the text + fusion layers with causal masks); prompt tokens and padding
    are not in the loss. Evaluation: the backbone's beam search (``num_beams``; ``min_generated_length``
    and ``max_generated_length`` count the prompt tokens, as BLIP's ``min_length``/``max_length`` do),
    captions gathered across processes (deduplicated by ``image_id``), scored with ``caption_scores``
    (``val/bleu4``, ``val/cider`` ...) and written as a COCO results JSON ``[{"image_id", "caption"}]``.
    The generation lengths are named apart from the datamodule's ``max_length`` (training text): with a
    logger, Lightning refuses module and datamodule hyperparameters that share a name but not a value.
    ``length_normalisation``: how beam search normalises a hypothesis's log-probability: ``"generated"``
    (by its generated tokens, end token included: transformers 5) or ``"sequence"`` (by prompt + generated
    tokens, end token excluded: transformers 4.31, which the MultiFlow authors ran).
    """

    task = "captioning"

    def __init__(
        self, *args: Any, prompt: str = "a picture of ", label_smoothing: float = 0.1, num_beams: int = 3,
        min_generated_length: int = 5, max_generated_length: int = 20, repetition_penalty: float = 1.0, meteor: bool = True,
        length_normalisation: LengthNormalisation = "generated", **kwargs: Any,
    ):
        kwargs.setdefault("lr", 1e-5)
        kwargs.setdefault("weight_decay", 0.05)
        super().__init__(*args, **kwargs)
        self.prompt = prompt
        self.label_smoothing = label_smoothing
        self.num_beams = num_beams
        self.min_generated_length = min_generated_length
        self.max_generated_length = max_generated_length
        self.repetition_penalty = repetition_penalty
        if length_normalisation not in LENGTH_NORMALISATIONS:
            raise ValueError(f"length_normalisation must be one of {LENGTH_NORMALISATIONS}, got {length_normalisation!r}")
        self.length_normalisation = length_normalisation
        self.meteor = meteor  # False skips METEOR's slow Java start-up (quick runs and tests)
        # [CLS] + prompt word pieces ([SEP] dropped): positions excluded from the loss.
        self.prompt_length = len(self.tokenizer(prompt).input_ids) - 1
        if max_generated_length <= self.prompt_length:
            raise ValueError(f"max_generated_length {max_generated_length} leaves no room after the {self.prompt_length}-token prompt")
        self._eval_outputs: list[tuple[Any, str, list[str]]] = []

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        _require(batch, ("image", "input_ids", "attention_mask"), "captioning train batch")
        image_embeds = self.backbone.encode_image(batch["image"])
        input_ids = self.decoder_ids(batch["input_ids"])
        labels = input_ids.masked_fill(batch["attention_mask"] == 0, -100)
        labels[:, : self.prompt_length] = -100
        logits = self.backbone.caption_logits(input_ids, batch["attention_mask"], image_embeds)
        loss = shifted_lm_loss(logits, labels, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=input_ids.size(0))
        return loss

    @torch.no_grad()
    def generate(self, image: torch.Tensor) -> list[str]:
        """Captions for a batch of images (prompt removed)."""
        image_embeds = self.backbone.encode_image(image)
        prompt = self.tokenizer([self.prompt] * image.size(0), return_tensors="pt").input_ids[:, :-1]
        prompt = self.decoder_ids(prompt).to(image.device)
        generated = self.backbone.generate_caption(
            prompt, image_embeds, num_beams=self.num_beams, min_length=self.min_generated_length,
            max_length=self.max_generated_length,
            eos_token_id=self.sep_token_id, pad_token_id=self.pad_token_id, repetition_penalty=self.repetition_penalty,
            length_normalisation=self.length_normalisation,
        )
        return [text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]

    # ----------------------------------------------------------------- evaluation
    def _eval_step(self, batch: Mapping[str, Any]) -> None:
        _require(batch, ("image", "image_id", "captions"), "captioning eval batch")
        captions = self.generate(batch["image"])
        if len(batch["image_id"]) != len(captions) or len(batch["captions"]) != len(captions):
            raise ValueError(f"captioning eval batch: {len(captions)} images but {len(batch['image_id'])} image_id "
                             f"and {len(batch['captions'])} reference lists")
        for image_id, caption, refs in zip(batch["image_id"], captions, batch["captions"]):
            self._eval_outputs.append((image_id, caption, list(refs)))

    def _evaluate(self, stage: str) -> None:
        outputs, self._eval_outputs = self._eval_outputs, []
        items = dedupe((item for part in gather_objects(outputs) for item in part), key=lambda item: str(item[0]))
        if not items:
            raise RuntimeError(f"captioning {stage}: no images were evaluated")
        self.write_results(stage, "captions", [{"image_id": coco_image_id(i), "caption": c} for i, c, _ in items])
        predictions = {str(i): c for i, c, _ in items}
        references = {str(i): refs for i, _, refs in items}
        self.log_metrics(stage, broadcast_from_zero(lambda: caption_scores(predictions, references, meteor=self.meteor)))
