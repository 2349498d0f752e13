"""BLIP backbone: ViT image encoder, image-grounded text encoder, text decoder and the ITC/ITM heads.

(About 360 lines: the preset and the one backbone class with its interface methods; configs and
checkpoints live in `blip_config.py` and `blip_checkpoints.py`.)

One class serves retrieval, captioning and VQA, so that parameter names are identical for every
task and ONE mask file computed on the backbone applies unchanged to all task modules (each holds
the backbone as attribute ``backbone``).

Layout (parameter name prefixes):
- ``vision_model.``  ``transformers`` ``BlipVisionModel`` (ViT; patch embedding is a Conv2d).
- ``text_encoder.``  ``BlipTextModel`` with a cross-attention block in every layer: used unimodally
  (ITC, no image) and image-grounded (ITM / VQA question, first token ``[ENC]``).
- ``text_decoder.``  ``BlipTextLMHeadModel`` (causal self-attention, cross-attention, LM head tied to
  its word embeddings), first token ``[DEC]``.
- ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``: ITC/ITM heads and temperature.

Encoder and decoder are separate, untied copies, as in BLIP's fine-tuning models: each task may
update them independently. In BLIP pretraining the decoder shares everything with the encoder
except its causal self-attention; the ``blip`` preset mirrors that for masks: the decoder's
cross-attention and FFN inherit the matching encoder layer's mask, its self-attention
(``attention.self.*`` and ``attention.output.dense``) keeps its own.

``BlipBackbone`` implements ``VisionLanguageBackbone`` (``mflightning.models.interface``): first
tokens [ENC] (grounded encoder) and [DEC] (decoder), ITM re-encodes the text with cross-attention,
captions come from the decoder. Checkpoint reading/writing lives in ``blip_checkpoints.py``, config
helpers (``tiny_config``, dict forms) in ``blip_config.py``.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipConfig
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel

from mflightning.losses import itc_itm_losses, itc_loss, sample_hard_negatives, shifted_lm_loss
from mflightning.models.blip_checkpoints import DEFAULT_TEMP, load_backbone, save_backbone, unique_state
from mflightning.models.blip_config import as_blip_config, config_from_tokenizer, tiny_config
from mflightning.models.generation import beam_search
from mflightning.models.interface import with_first_token
from mflightning.models.state import checkpoint_spec
from mflightning.models.stochastic_depth import set_drop_path_
from mflightning.pruning.presets import register_preset

PRESET_NAME = "blip"
_PREFIX = r"^(backbone\.)?"

BLIP_GROUPS = {
    "vision": _PREFIX + r"vision_model\.",
    "text": _PREFIX + r"text_(encoder|decoder)\.",
}
BLIP_EXCLUDE = (
    _PREFIX + r"(vision_proj|text_proj|itm_head)\.",  # ITC / ITM heads
    r"(^|\.)cls\.predictions\.",  # LM prediction head
    # ... whose decoder Linear is tied to the word embeddings, so its weight is named as the embedding
    r"(^|\.)embeddings\.word_embeddings\.",
    # momentum encoders are not excluded here: a module holding them declares them as copies
    # (`pruning_copies`, e.g. RetrievalModule's `backbone_m.`), so they take the backbone's masks, unscored
)
# Decoder layer N's cross-attention and FFN take the mask of encoder layer N; its causal
# self-attention (attention.self.*, attention.output.dense) keeps its own.
BLIP_INHERIT = (
    (
        _PREFIX + r"text_decoder\.bert\.encoder\.layer\.(\d+)\.((crossattention|intermediate|output)\..+)$",
        r"\1text_encoder.encoder.layer.\2.\3",
    ),
)

register_preset(
    PRESET_NAME,
    groups=BLIP_GROUPS,
    exclude=BLIP_EXCLUDE,
    inherit=BLIP_INHERIT,
    image_groups=("vision",),
    description="BLIP: vision = ViT image encoder; text = text encoder (incl. cross-attention) and "
    "decoder; heads dense; decoder cross-attention/FFN inherit the encoder's masks",
)

TIED_PARTS = ("crossattention", "intermediate", "output")  # shared in BLIP pretraining
# Backbone parts each task never runs in training (frozen by the task modules).
UNUSED_PARTS = {
    "retrieval": ("text_decoder",),
    "captioning": ("text_encoder", "vision_proj", "text_proj", "itm_head", "temp"),
    "vqa": ("vision_proj", "text_proj", "itm_head", "temp"),
}


def _cross_mask_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Hand the encoder mask, passed as ``attention_mask``, to the cross-attention where it reads it."""
    if kwargs.get("encoder_hidden_states") is not None and kwargs.get("encoder_attention_mask") is None:
        kwargs["encoder_attention_mask"] = kwargs.get("attention_mask")
    return args, kwargs


def honour_cross_attention_masks(text_model: nn.Module) -> int:
    """Make every BLIP text cross-attention honour its encoder padding mask; returns how many were hooked.

    transformers' ``BlipTextAttention`` passes the encoder mask on as ``attention_mask`` while its
    cross-attention reads ``encoder_attention_mask``, so the mask is dropped and a VQA decoder
    attends to the question's PAD states (image tokens, all real, are unaffected). A forward
    pre-hook on each ``crossattention.self`` moves the mask where it is read; it does nothing
    once transformers passes ``encoder_attention_mask`` itself.
    """
    hooked = 0
    for name, module in text_model.named_modules():
        if name.endswith("crossattention.self") and not getattr(module, "_mfl_cross_mask_hook", False):
            module.register_forward_pre_hook(_cross_mask_hook, with_kwargs=True)
            module._mfl_cross_mask_hook = True
            hooked += 1
    return hooked


class BlipBackbone(nn.Module):
    """BLIP image encoder + image-grounded text encoder + text decoder + ITC/ITM heads (one name space).

    Implements ``VisionLanguageBackbone``.
    """

    pruning_preset = PRESET_NAME
    pruning_loss_terms = ("itc", "itm", "lm")  # the MULTIFLOW code's SNIP loss: BLIP pretraining's three
    match_reads_text_states = False  # ITM re-encodes the text with cross-attention: no states to gather

    def __init__(
        self, config: BlipConfig | Mapping[str, Any], temp: float = DEFAULT_TEMP, tie_decoder: bool | None = None
    ):
        super().__init__()
        config = copy.deepcopy(as_blip_config(config))
        tie = tie_decoder if tie_decoder is not None else bool(getattr(config, "tie_decoder", False))
        # Every BLIP text layer has a cross-attention block; causality is chosen per call.
        config.text_config.is_decoder = True
        config.text_config.encoder_hidden_size = config.vision_config.hidden_size
        if getattr(config, "enc_token_id", None) is None:
            # BLIP's tokenizer adds [DEC] (bos) then [ENC]: consecutive ids.
            config.enc_token_id = config.text_config.bos_token_id + 1
        self.config = config
        text_hidden = config.text_config.hidden_size
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(config.text_config)
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, config.image_text_hidden_size)
        self.text_proj = nn.Linear(text_hidden, config.image_text_hidden_size)
        self.itm_head = nn.Linear(text_hidden, 2)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        config.tie_decoder = False
        for text_model in (self.text_encoder, self.text_decoder):
            honour_cross_attention_masks(text_model)
        self.set_drop_path_(getattr(config.vision_config, "drop_path_rate", 0.0))
        if tie:
            self.tie_decoder_()

    def set_drop_path_(self, rate: float) -> "BlipBackbone":
        """Stochastic depth in the ViT as the authors' ``create_vit(drop_path_rate=rate)`` (0.1 for VQA, else 0):
        layer i drops each residual branch with ``linspace(0, rate, depth)[i]``; kept in
        ``config.vision_config.drop_path_rate`` (saved with the backbone); 0 switches it off."""
        set_drop_path_(self.vision_model.encoder.layers, rate, branches=("self_attn", "mlp"))
        self.config.vision_config.drop_path_rate = float(rate)
        return self

    @property
    def enc_token_id(self) -> int:
        return int(self.config.enc_token_id)

    @property
    def dec_token_id(self) -> int:
        return int(self.config.text_config.bos_token_id)

    @property
    def decoder_tied(self) -> bool:
        return bool(getattr(self.config, "tie_decoder", False))

    def tie_decoder_(self) -> "BlipBackbone":
        """Share the decoder's cross-attention and FFN weights with the encoder (BLIP pretraining layout).

        As BLIP's ``tie_encoder_decoder_weights``, the decoder keeps its own modules, which apply the
        encoder's parameters (its own values are dropped: the encoder's weights win). Shared weights
        appear once, under ``text_encoder.`` names, and their calibration statistics come from the
        encoder's calls only (the module under the first name, as the MULTIFLOW code): masks computed
        on a tied backbone hold the encoder's layers only, and an untied task module's decoder inherits
        them through the ``blip`` preset.
        """
        encoder_layers = self.text_encoder.encoder.layer
        decoder_layers = self.text_decoder.bert.encoder.layer
        if len(encoder_layers) != len(decoder_layers):
            raise ValueError(f"cannot tie: encoder has {len(encoder_layers)} layers, decoder {len(decoder_layers)}")
        for enc, dec in zip(encoder_layers, decoder_layers):
            for part in TIED_PARTS:
                enc_modules = dict(getattr(enc, part).named_modules())
                for name, module in getattr(dec, part).named_modules():
                    for key, _ in list(module.named_parameters(recurse=False)):
                        setattr(module, key, getattr(enc_modules[name], key))
        self.config.tie_decoder = True
        return self

    def untie_decoder_(self) -> "BlipBackbone":
        """Give the decoder its own copies of the shared weights (BLIP fine-tuning layout); no-op if untied."""
        if not self.decoder_tied:
            return self
        for dec in self.text_decoder.bert.encoder.layer:
            for part in TIED_PARTS:
                for module in getattr(dec, part).modules():
                    for key, param in list(module.named_parameters(recurse=False)):
                        setattr(module, key, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
        self.config.tie_decoder = False
        return self

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise if the tokenizer's vocabulary or [DEC]/[ENC]/[PAD] ids do not fit this backbone."""
        vocab = self.config.text_config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the backbone's vocabulary is {vocab}")
        expected = {"[DEC] (bos)": self.dec_token_id, "[ENC]": self.enc_token_id,
                    "[PAD]": self.config.text_config.pad_token_id}
        actual = {"[DEC] (bos)": tokenizer.convert_tokens_to_ids("[DEC]"),
                  "[ENC]": tokenizer.convert_tokens_to_ids("[ENC]"), "[PAD]": tokenizer.pad_token_id}
        wrong = {k: (actual[k], v) for k, v in expected.items() if actual[k] != v}
        if wrong:
            raise ValueError(
                "tokenizer and backbone disagree on special token ids (tokenizer, backbone): "
                + ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in wrong.items())
            )

    # ----------------------------------------------------------------- construction / IO
    @classmethod
    def from_config(
        cls, config: BlipConfig | Mapping[str, Any], temp: float = DEFAULT_TEMP, tie_decoder: bool | None = None
    ) -> "BlipBackbone":
        """Randomly initialised backbone from a BlipConfig or its dict form."""
        return cls(config, temp=temp, tie_decoder=tie_decoder)

    @classmethod
    def from_spec(cls, spec: Any, tokenizer: Any, decoder_from: str | None = None) -> "BlipBackbone":
        """Backbone from a hub name / local dir / original ``.pth`` file, a dict ``{"checkpoint": path,
        "image_size": ..., "config": ..., "allow_missing": [...], "drop_path_rate": ...}``
        (``from_pretrained``'s arguments, e.g. the authors' 224 px pretraining file fine-tuned at 384 px,
        plus the ViT's stochastic depth, ``set_drop_path_``), a config dict (token ids and vocab filled
        from the tokenizer; ``vision_config.drop_path_rate`` likewise) or an existing ``BlipBackbone``;
        always untied (encoder and decoder train as separate copies)."""
        if isinstance(spec, cls):
            backbone = spec
        elif isinstance(spec, (str, os.PathLike)):
            backbone = cls.from_pretrained(spec, decoder_from=decoder_from)
        elif isinstance(spec, Mapping) and "checkpoint" in spec:
            path, options = checkpoint_spec(spec, ("image_size", "config", "allow_missing", "drop_path_rate"), "BLIP")
            if "allow_missing" in options:
                options["allow_missing"] = tuple(options["allow_missing"])
            drop_path_rate = options.pop("drop_path_rate", None)
            backbone = cls.from_pretrained(path, decoder_from=decoder_from, **options)
            if drop_path_rate is not None:
                backbone.set_drop_path_(drop_path_rate)
        elif isinstance(spec, Mapping):
            backbone = cls.from_config(config_from_tokenizer(spec, tokenizer))
        elif spec is None:
            raise ValueError("backbone is required: a BLIP checkpoint name/path or a config dict")
        else:
            raise TypeError(f"backbone must be a name/path, a config dict or a BlipBackbone, got {type(spec).__name__}")
        backbone.untie_decoder_()
        backbone.check_tokenizer(tokenizer)
        return backbone

    def save_pretrained(self, directory: str | os.PathLike):
        """Write ``config.json`` + ``model.safetensors`` (tied LM-head aliases stored once); returns the dir."""
        return save_backbone(self, directory)

    def _unique_state(self) -> dict[str, torch.Tensor]:
        """State dict without tied aliases (same storage seen under two names keeps its first name)."""
        return unique_state(self)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        decoder_from: str | os.PathLike | None = None,
        allow_missing: tuple[str, ...] = (),
        tie_decoder: bool | None = None,
        config: BlipConfig | Mapping[str, Any] | None = None,
        image_size: int | None = None,
        **hub_kwargs: Any,
    ) -> "BlipBackbone":
        """Load a backbone saved by ``save_pretrained``, a Salesforce BLIP checkpoint (hub name or dir) or
        one of the authors' original BLIP ``.pth`` files.

        HF checkpoints: ``BlipForImageTextRetrieval`` gives the image encoder, text encoder and heads,
        ``BlipForQuestionAnswering`` image encoder + encoder + decoder, ``BlipForConditionalGeneration``
        image encoder + decoder. Components the checkpoint lacks come from ``decoder_from`` (its
        ``text_decoder.*`` only; default for the hub's retrieval checkpoints: the captioning checkpoint
        of the same size). Any other missing component is an error unless named in ``allow_missing``
        (e.g. ``("text_decoder",)``), any checkpoint key that does not map is an error. The
        temperature, absent from HF checkpoints, starts at 0.07. ``tie_decoder=True`` shares the
        decoder's cross-attention/FFN with the encoder after loading (the encoder's weights win);
        None keeps the saved layout (HF checkpoints: untied).

        Original BLIP files (a path to a file: ``.pth``/``.pt``/``.bin``, or any file ``torch.load``
        reads as ``{"model": state_dict, ...}`` or a bare state dict; ``blip_original.py``): the image
        encoder is renamed onto transformers' ``BlipVisionModel`` (``visual_encoder.blocks.N.attn.qkv``
        -> ``vision_model.encoder.layers.N.self_attn.qkv``, ...), text names pass through. The config
        is inferred from the tensor shapes (published sizes only: widths 768/1024 -> 12/16 heads,
        BLIP's 30524-token vocabulary) unless ``config=`` (a ``BlipConfig`` or its dict) is given,
        which small models need. Momentum encoders (``*_m``) and queues are not loaded (one info log
        line lists them); any other tensor that does not map, a wrong shape or a missing tensor is an
        error. Per type: pretraining (``model_base*.pth``) gives everything; its decoder, tied to the
        encoder in the file, is loaded as an equal copy and, with ``tie_decoder=None``, tied again
        (the file's layout). A retrieval fine-tune has no decoder and a captioning fine-tune no text
        encoder / ITC-ITM heads: as for HF checkpoints, that is an error unless ``decoder_from=``
        (an original or HF checkpoint with a decoder) supplies the decoder or ``allow_missing`` names
        the parts left randomly initialised (e.g. ``("text_decoder",)``; captioning:
        ``("text_encoder", "vision_proj", "text_proj", "itm_head")``); a VQA fine-tune lacks the
        heads the same way. ``temp`` starts at 0.07 when the file has none.

        ``image_size`` (any format): the image size to build the backbone for; the checkpoint's
        position embeddings are resized to its patch grid (CLS kept, bicubic, ``align_corners=False``),
        e.g. 224 -> 384 px is 14x14 -> 24x24 at patch 16. Parameter names and shapes of every pruned
        layer do not depend on it, so masks computed at one size apply at another.
        """
        return load_backbone(cls, name_or_path, decoder_from, allow_missing, tie_decoder, hub_kwargs,
                             config=config, image_size=image_size)

    @staticmethod
    def load_momentum_(copy_: nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
        """Momentum encoders of the authors' pretraining/retrieval ``.pth`` into ``copy_`` (a momentum copy of
        a ``BlipBackbone``); returns the file's ITC queues, rows ``(queue_size, embed_dim)``. See
        ``blip_original.load_original_momentum_``."""
        from mflightning.models.blip_original import load_original_momentum_

        return load_original_momentum_(copy_, path)

    def unused_parts(self, task: str) -> tuple[str, ...]:
        """Parts ``task`` never runs: the decoder for retrieval, the encoder and ITC/ITM heads for captioning."""
        if task not in UNUSED_PARTS:
            raise ValueError(f"unknown task {task!r}: BlipBackbone knows {sorted(UNUSED_PARTS)}")
        return UNUSED_PARTS[task]

    def add_decoder_(self) -> "BlipBackbone":
        """No-op: BLIP always holds its decoder."""
        return self

    # ----------------------------------------------------------------- forward pieces
    @property
    def image_size(self) -> int:
        size = self.config.vision_config.image_size
        return size if isinstance(size, int) else int(size[0])

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """ViT tokens ``(B, 1+P, D)``; position embeddings interpolated for another resolution."""
        if image.dim() != 4 or image.size(1) != 3:
            raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
        interpolate = tuple(image.shape[-2:]) != (self.image_size, self.image_size)
        return self.vision_model(pixel_values=image, interpolate_pos_encoding=interpolate).last_hidden_state

    @staticmethod
    def image_attention_mask(image_embeds: torch.Tensor) -> torch.Tensor:
        return torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unimodal text encoder states ``(B, L, D)`` (no cross-attention, bidirectional)."""
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode_grounded(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        encoder_states: torch.Tensor, encoder_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image-grounded text encoder states (cross-attention to ``encoder_states``); first token [ENC]."""
        if encoder_mask is None:
            encoder_mask = self.image_attention_mask(encoder_states)
        return self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask,
            encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_mask,
        ).last_hidden_state

    def decode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        encoder_states: torch.Tensor, encoder_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal decoder logits ``(B, L, V)`` conditioned on ``encoder_states``; first token [DEC]."""
        if encoder_mask is None:
            encoder_mask = self.image_attention_mask(encoder_states)
        return self.text_decoder(
            input_ids=input_ids, attention_mask=attention_mask,
            encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_mask,
        ).logits

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC image embedding (fp32) from the [CLS] token."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]).float(), dim=-1)

    def text_features(self, text_states: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC text embedding (fp32) from the first token of the unimodal encoder."""
        return F.normalize(self.text_proj(text_states[:, 0]).float(), dim=-1)

    def itm_logits(self, grounded_states: torch.Tensor) -> torch.Tensor:
        """ITM logits ``(B, 2)`` (fp32; class 1 = match) from the [ENC] token."""
        return self.itm_head(grounded_states[:, 0]).float()

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> dict:
        """Calibration forward: image encoder, grounded encoder ([ENC]) and decoder ([DEC]) on one batch.

        Every prunable layer sees data, so ``prune(backbone, calibration=loader)`` works with the
        engine's default ``model(**batch)`` on calibration batches; other batch keys are ignored.
        """
        image_embeds = self.encode_image(image)
        grounded = self.encode_grounded(with_first_token(input_ids, self.enc_token_id), attention_mask, image_embeds)
        logits = self.decode(with_first_token(input_ids, self.dec_token_id), attention_mask, image_embeds)
        return {"image_embeds": image_embeds, "grounded_states": grounded, "decoder_logits": logits}

    # ----------------------------------------------------------------- task members (VisionLanguageBackbone)
    def match_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor,
                     text_states: torch.Tensor | None = None) -> torch.Tensor:
        """ITM logits ``(B, 2)``: the grounded encoder re-reads the text ([ENC] first; ``text_states`` unused)."""
        return self.itm_logits(self.encode_grounded(input_ids, attention_mask, image_embeds))

    def caption_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       image_embeds: torch.Tensor) -> torch.Tensor:
        """Captioning LM logits ``(B, L, V)``: the decoder ([DEC] first) attending to the image tokens."""
        return self.decode(input_ids, attention_mask, image_embeds)

    @torch.no_grad()
    def generate_caption(self, prompt_ids: torch.Tensor, image_embeds: torch.Tensor, *, num_beams: int,
                         min_length: int, max_length: int, eos_token_id: int, pad_token_id: int,
                         repetition_penalty: float = 1.0, length_normalisation: str = "generated") -> list[list[int]]:
        """transformers beam search with the decoder from ``prompt_ids`` ([DEC] first); ids after the prompt.
        ``length_normalisation="sequence"`` (transformers 4.31's scores, which transformers 5 cannot give) runs
        ``mflightning.models.generation.beam_search`` over the decoder instead (no KV cache: slower)."""
        if length_normalisation != "generated":
            beams = image_embeds.repeat_interleave(num_beams, dim=0)

            def step(seqs: torch.Tensor) -> torch.Tensor:
                return self.caption_logits(seqs, torch.ones_like(seqs), beams)[:, -1]

            return beam_search(step, prompt_ids, num_beams, min_length, max_length, eos_token_id,
                               repetition_penalty=repetition_penalty, length_normalisation=length_normalisation)
        output = self.text_decoder.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=self.image_attention_mask(image_embeds),
            num_beams=num_beams,
            min_length=min_length,
            max_length=max_length,
            repetition_penalty=repetition_penalty,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            do_sample=False,
        )
        return output[:, prompt_ids.size(1):].tolist()

    def pretraining_losses(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           image_idx: torch.Tensor, tokenizer: Any = None) -> dict[str, torch.Tensor]:
        """BLIP's three pretraining losses: ITC, ITM (hard negatives) and LM (label smoothing 0.1)."""
        image_embeds = self.encode_image(image)
        itc, itm = itc_itm_losses(self, image_embeds, input_ids, attention_mask, image_idx)
        dec_ids = with_first_token(input_ids, self.dec_token_id)
        labels = dec_ids.masked_fill(attention_mask == 0, -100)
        logits = self.decode(dec_ids, attention_mask, image_embeds)
        return {"itc": itc, "itm": itm, "lm": shifted_lm_loss(logits, labels, label_smoothing=0.1)}


__all__ = [
    "BlipBackbone", "tiny_config", "as_blip_config", "config_from_tokenizer", "PRESET_NAME", "BLIP_GROUPS",
    "BLIP_EXCLUDE", "BLIP_INHERIT", "UNUSED_PARTS",
    # moved to mflightning.losses / mflightning.models.interface; importable from here as before
    "with_first_token", "shifted_lm_loss", "itc_loss", "sample_hard_negatives",
]
