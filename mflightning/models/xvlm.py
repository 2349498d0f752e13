"""XVLM backbone (XVLM_CLIP, the variant MultiFlow prunes): CLIP ViT image encoder, 6-layer BERT
text encoder, 6-layer fusion encoder.

Layout (parameter name prefixes; layer indices are global, as in XVLM's 12-layer BERT):
- ``vision_encoder.``  by default (``vision_layout="clip"``) XVLM_CLIP's CLIP ViT-B/16 in the
  authors' names: ``class_embedding``, ``patch_embed`` (Conv2d, no bias), ``pos_embed`` (an
  embedding table), ``pre_layrnorm``, ``encoder.layers.N.self_attn.{q_proj,k_proj,v_proj,out_proj}``,
  ``layer_norm1``, ``mlp.fc1``, ``mlp.fc2``, ``layer_norm2``, ``post_layernorm`` (over all tokens).
  q, k, v and out are separate nn.Linear layers, so MultiFlow's per-layer ratios and saliencies
  are per projection, as in the reference. ``vision_layout="timm"`` builds a timm ViT instead
  (fused qkv: its masks differ from the reference's).
- ``text_encoder.embeddings``, ``text_encoder.encoder.layer.0-5``  bidirectional BERT layers.
- ``fusion_encoder.layer.6-11``  BERT layers with cross-attention to the image tokens; their
  self-attention is bidirectional (masks are built here and passed explicitly, never causal).
- ``text_encoder.cls``  the MLM head (decoder tied to the word embeddings); also the LM head when
  captioning runs the text + fusion stack with causal masks.
- ``vision_proj``, ``text_proj``, ``itm_head``, ``bbox_head``, ``temp``: ITC/ITM/box heads, dense.
- ``text_decoder.`` (optional, for VQA): embeddings, ``layer.6-11`` and ``cls`` copied from the
  text embeddings, the fusion layers and the MLM head; its self-attention is causal and its
  cross-attention reads the question's fusion states. The ``xvlm`` preset makes each decoder layer
  inherit the mask of the fusion layer it was copied from (its self-attention included, since it is
  initialised from the fusion's), so masks computed on the pretrained backbone cover the decoder.

Pruning preset ``"xvlm"`` (the reference partition): vision = every nn.Linear of the image encoder
(q/k/v/out projections, fc1, fc2; the patch convolution, positions and norms are not Linear layers
and stay dense, as with the timm layout); text = ``text_encoder.encoder.layer.0-5``; fusion =
``fusion_encoder.layer.6-11`` (whole layers: self-attention, cross-attention, FFN) and the VQA
decoder copied from them; dense: ``vision_proj``, ``text_proj``, ``itm_head``, ``bbox_head``,
``text_encoder.cls`` and the embeddings.

``XVLMBackbone.from_pretrained`` reads ``save_pretrained`` directories, state-dict files in these
names and the authors' XVLM_CLIP checkpoints (``xvlm_checkpoints.py`` has the name mapping).

``XVLMBackbone`` implements ``VisionLanguageBackbone`` (``mflightning.models.interface``): every
text starts with [CLS] (no [ENC]/[DEC]), ITM runs the fusion encoder on the text encoder's states,
captions come from the text + fusion stack with causal masks (``beam_search`` generates them).
Configs live in ``xvlm_config.py``, layers in ``xvlm_layers.py``, checkpoint IO in ``xvlm_checkpoints.py``.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mflightning.losses import itc_itm_losses, mask_tokens, mlm_loss, shifted_lm_loss
from mflightning.models.generation import beam_search
from mflightning.models.state import checkpoint_spec
from mflightning.models.xvlm_checkpoints import load_backbone, load_state, read_state_dict, save_backbone, tied_aliases
from mflightning.models.xvlm_config import XVLMConfig, as_xvlm_config, bert_config, tiny_config
from mflightning.models.xvlm_layers import (LayerStack, TextDecoder, TextEncoder, XBertLayer, build_mlp,
                                            build_vision_encoder, init_bert_weights, key_mask, self_attention_mask,
                                            tie_lm_head)
from mflightning.pruning.presets import register_preset

PRESET_NAME = "xvlm"
_ANY_PREFIX = r"(^|\.)"  # names may carry a task module's prefix (``backbone.``)
XVLM_GROUPS = {
    "vision": _ANY_PREFIX + r"vision_encoder\.",
    "text": _ANY_PREFIX + r"text_encoder\.encoder\.",
    "fusion": _ANY_PREFIX + r"(fusion_encoder|text_decoder)\.layer\.",
}
XVLM_EXCLUDE = (
    _ANY_PREFIX + r"(vision_proj|text_proj|itm_head|bbox_head)\.",
    _ANY_PREFIX + r"(text_encoder|text_decoder)\.cls\.",
    # the MLM/LM decoders are tied to the word embeddings and named as them: keep them dense
    _ANY_PREFIX + r"(text_encoder|text_decoder)\.embeddings\.",
)
# Only the fusion cross-attention reads image tokens; the decoder's reads question tokens (filtered).
XVLM_UNFILTERED = (_ANY_PREFIX + r"fusion_encoder\.layer\.\d+\.crossattention\.self\.(key|value)\.weight$",)
XVLM_INHERIT = ((r"^(.*\.)?text_decoder\.layer\.(\d+)\.(.+)$", r"\1fusion_encoder.layer.\2.\3"),)

register_preset(
    PRESET_NAME,
    groups=XVLM_GROUPS,
    exclude=XVLM_EXCLUDE,
    unfiltered=XVLM_UNFILTERED,
    inherit=XVLM_INHERIT,
    image_groups=("vision",),
    description="XVLM: vision = ViT (CLIP layout: q/k/v/out, fc1, fc2 each a layer); text = text encoder layers 0-5; fusion = layers 6-11 (cross-attention) and "
    "the VQA decoder copied from them (inherits their masks); heads dense",
)

# The authors' default for XVLM VQA (their vqa.py without --inherit_mask): the answer decoder, copied from the
# dense pretrained fusion layers, keeps all its weights (masks of ones) and trains dense; only the other
# layers are masked. A task module selects it by its `pruning_preset` (XVLMVQAModule(inherit_decoder_masks=False)).
DENSE_DECODER_PRESET = "xvlm_dense_decoder"
register_preset(
    DENSE_DECODER_PRESET,
    groups={**XVLM_GROUPS, "fusion": _ANY_PREFIX + r"fusion_encoder\.layer\."},
    exclude=XVLM_EXCLUDE + (_ANY_PREFIX + r"text_decoder\.",),
    unfiltered=XVLM_UNFILTERED,
    image_groups=("vision",),
    description="XVLM with a dense VQA decoder (the authors' default): as 'xvlm', the decoder copied from the "
    "fusion layers neither inherits their masks nor is pruned",
)

# Backbone parts each task never runs in training (frozen by the task modules). The MLM head's
# transform and bias serve MLM pretraining and captioning only (its output weight is the word
# embedding matrix, which every task trains).
_MLM_ONLY = ("text_encoder.cls.predictions.transform", "text_encoder.cls.predictions.bias")
UNUSED_PARTS = {
    "retrieval": ("bbox_head", *_MLM_ONLY),
    "captioning": ("vision_proj", "text_proj", "itm_head", "bbox_head", "temp"),
    "vqa": ("vision_proj", "text_proj", "itm_head", "bbox_head", "temp", *_MLM_ONLY),
}


class XVLMBackbone(nn.Module):
    """XVLM: CLIP ViT + BERT text encoder (layers 0-5) + fusion encoder (layers 6-11) + ITC/ITM/MLM/box heads.

    Implements ``VisionLanguageBackbone``; texts keep their [CLS] first token everywhere.
    """

    pruning_preset = PRESET_NAME
    enc_token_id: int | None = None  # [CLS] starts grounded texts, answers and captions alike
    dec_token_id: int | None = None

    def __init__(self, config: XVLMConfig | Mapping[str, Any] | None = None):
        super().__init__()
        config = as_xvlm_config(config)
        self.config = config
        self.vision_encoder = build_vision_encoder(config)
        vision_width = int(self.vision_encoder.embed_dim)  # both layouts name their width embed_dim
        bert = bert_config(config)
        first_fusion = config.num_text_layers
        self.text_encoder = TextEncoder(bert, config.num_text_layers)
        self.fusion_encoder = LayerStack({
            i: XBertLayer(bert, cross_attention=True, encoder_width=vision_width)
            for i in range(first_fusion, first_fusion + config.num_fusion_layers)
        })
        self.vision_proj = nn.Linear(vision_width, config.embed_dim)
        self.text_proj = nn.Linear(config.hidden_size, config.embed_dim)
        self.itm_head = build_mlp(config.hidden_size, 2)
        self.bbox_head = build_mlp(config.hidden_size, 4) if config.bbox_head else None
        self.temp = nn.Parameter(torch.tensor(float(config.temp)))
        for part in (self.text_encoder, self.fusion_encoder, self.vision_proj, self.text_proj, self.itm_head,
                     self.bbox_head):
            if part is not None:
                part.apply(init_bert_weights)
        tie_lm_head(self.text_encoder.cls, self.text_encoder.embeddings)
        self.text_decoder: TextDecoder | None = None
        if config.decoder:
            self.add_decoder_()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_spec(cls, spec: Any, tokenizer: Any, decoder_from: str | None = None) -> "XVLMBackbone":
        """Backbone from a ``save_pretrained`` dir / state-dict file (ours or the authors'), a config dict
        (vocabulary and pad id default to the tokenizer's), a dict ``{"checkpoint": path, "image_size": ...,
        "config": ..., "strict": ...}`` (``from_pretrained``'s arguments, e.g. the authors' 224 px file at
        384 px) or an ``XVLMBackbone``; checked against the tokenizer."""
        if decoder_from is not None:
            raise ValueError("decoder_from is a BLIP option: an XVLM decoder is copied from the fusion layers")
        if isinstance(spec, cls):
            backbone = spec
        elif isinstance(spec, (str, os.PathLike)):
            backbone = cls.from_pretrained(spec)
        elif isinstance(spec, Mapping) and "checkpoint" in spec:
            path, options = checkpoint_spec(spec, ("image_size", "config", "strict"), "XVLM")
            backbone = cls.from_pretrained(path, **options)
        elif isinstance(spec, Mapping):
            config = dict(spec)
            config.setdefault("vocab_size", len(tokenizer))
            config.setdefault("pad_token_id", tokenizer.pad_token_id)
            backbone = cls(config)
        elif spec is None:
            raise ValueError("backbone is required: an XVLM checkpoint directory/file or a config dict")
        else:
            raise TypeError(f"backbone must be a path, a config dict or an XVLMBackbone, got {type(spec).__name__}")
        backbone.check_tokenizer(tokenizer)
        return backbone

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise if the tokenizer's vocabulary or [PAD] id do not fit this backbone.

        The vocabulary may lack exactly the tokenizer's [DEC] and [ENC], when they are its last two
        ids (``build_tokenizer`` appends them to bert-base-uncased's 30522 words; the authors'
        checkpoints have 30522 and XVLM never feeds either token).
        """
        vocab, pad = self.config.vocab_size, self.config.pad_token_id
        added = {getattr(tokenizer, "enc_token_id", None), getattr(tokenizer, "dec_token_id", None)}
        beyond = set(range(vocab, len(tokenizer)))
        if beyond and beyond != added:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the backbone's vocabulary is {vocab}")
        if tokenizer.pad_token_id != pad:
            raise ValueError(f"tokenizer [PAD] id {tokenizer.pad_token_id} differs from the backbone's pad_token_id {pad}")

    def unused_parts(self, task: str) -> tuple[str, ...]:
        """Parts ``task`` never runs: the box head always, the ITC/ITM heads for captioning and VQA."""
        if task not in UNUSED_PARTS:
            raise ValueError(f"unknown task {task!r}: XVLMBackbone knows {sorted(UNUSED_PARTS)}")
        return UNUSED_PARTS[task]

    # ----------------------------------------------------------------- decoder
    def add_decoder_(self) -> "XVLMBackbone":
        """Add the VQA decoder as a copy of the fusion layers (and the text embeddings / MLM head); no-op if present.

        Its self-attention becomes causal; its cross-attention reads the question's fusion states,
        so the image and text widths must agree, as in XVLM (ViT-B/16 and BERT-base: 768).
        """
        if self.text_decoder is not None:
            return self
        vision_width = int(self.vision_encoder.embed_dim)
        if vision_width != self.config.hidden_size:
            raise ValueError(f"the VQA decoder is copied from the fusion layers, whose cross-attention reads "
                             f"{vision_width}-wide image tokens, but it must read {self.config.hidden_size}-wide "
                             "question states: use a ViT as wide as the text encoder")
        layers = copy.deepcopy(self.fusion_encoder.layer)
        for layer in layers.values():
            layer.attention.self.is_causal = True  # informational: the mask passed is causal
        self.text_decoder = TextDecoder(copy.deepcopy(self.text_encoder.embeddings), layers,
                                        copy.deepcopy(self.text_encoder.cls))
        self.config.decoder = True
        return self

    # ----------------------------------------------------------------- forward pieces
    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """ViT tokens ``(B, 1+P, D)`` after the final norm (any resolution: position embeddings interpolated)."""
        if image.dim() != 4 or image.size(1) != 3:
            raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
        return self.vision_encoder.forward_features(image)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Text encoder states ``(B, L, D)`` (layers 0-5; bidirectional unless ``causal``)."""
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} have different shapes")
        hidden = self.text_encoder.embeddings(input_ids=input_ids)
        return self.text_encoder.encoder(hidden, self_attention_mask(attention_mask, causal))

    def fuse(self, text_states: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor,
             image_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """Fusion encoder states ``(B, L, D)``: layers 6-11 over text states, cross-attending to image tokens."""
        return self.fusion_encoder(text_states, self_attention_mask(attention_mask, causal), image_embeds,
                                   key_mask(image_mask))

    def encode_grounded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, encoder_states: torch.Tensor,
                        encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text encoder then fusion encoder: image-grounded states of a text (ITM input, VQA question)."""
        return self.fuse(self.encode_text(input_ids, attention_mask), attention_mask, encoder_states, encoder_mask)

    def caption_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       image_embeds: torch.Tensor) -> torch.Tensor:
        """Captioning LM logits ``(B, L, V)``: the text and fusion layers run with causal masks, MLM head on top."""
        states = self.encode_text(input_ids, attention_mask, causal=True)
        return self.text_encoder.cls(self.fuse(states, attention_mask, image_embeds, causal=True))

    def mlm_logits(self, fusion_states: torch.Tensor) -> torch.Tensor:
        return self.text_encoder.cls(fusion_states)

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, encoder_states: torch.Tensor,
               encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        """VQA decoder logits ``(B, L, V)`` (causal) attending to ``encoder_states`` (question fusion states)."""
        if self.text_decoder is None:
            raise RuntimeError("this XVLMBackbone has no decoder: call add_decoder_() (VQA) first")
        return self.text_decoder(input_ids, attention_mask, encoder_states, encoder_mask)

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC image embedding (fp32) from the image [CLS] token."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]).float(), dim=-1)

    def text_features(self, text_states: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC text embedding (fp32) from the text encoder's [CLS] token."""
        return F.normalize(self.text_proj(text_states[:, 0]).float(), dim=-1)

    def itm_logits(self, fusion_states: torch.Tensor) -> torch.Tensor:
        """ITM logits ``(B, 2)`` (fp32; class 1 = match) from the fusion [CLS] token."""
        return self.itm_head(fusion_states[:, 0]).float()

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> dict:
        """Calibration forward: image, text and fusion encoders (and the decoder, if any) on one batch.

        Every prunable layer sees data, so ``prune(backbone, calibration=loader)`` works with the
        engine's default ``model(**batch)``; other batch keys are ignored. The decoder reads the
        caption, cross-attending to the caption's fusion states (as it reads questions in VQA).
        """
        image_embeds = self.encode_image(image)
        text_states = self.encode_text(input_ids, attention_mask)
        fusion_states = self.fuse(text_states, attention_mask, image_embeds)
        out = {"image_embeds": image_embeds, "text_states": text_states, "fusion_states": fusion_states}
        if self.text_decoder is not None:
            out["decoder_logits"] = self.decode(input_ids, attention_mask, fusion_states, attention_mask)
        return out

    # ----------------------------------------------------------------- task members (VisionLanguageBackbone)
    def match_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor,
                     text_states: torch.Tensor | None = None) -> torch.Tensor:
        """ITM logits ``(B, 2)``: the fusion encoder over the text encoder's states (reused when given)."""
        if text_states is None:
            text_states = self.encode_text(input_ids, attention_mask)
        return self.itm_logits(self.fuse(text_states, attention_mask, image_embeds))

    @torch.no_grad()
    def generate_caption(self, prompt_ids: torch.Tensor, image_embeds: torch.Tensor, *, num_beams: int,
                         min_length: int, max_length: int, eos_token_id: int, pad_token_id: int,
                         repetition_penalty: float = 1.0, length_normalisation: str = "generated") -> list[list[int]]:
        """``beam_search`` over ``caption_logits`` from ``prompt_ids`` (eos dropped; ``pad_token_id`` unused)."""
        beams = image_embeds.repeat_interleave(num_beams, dim=0)

        def step(seqs: torch.Tensor) -> torch.Tensor:
            return self.caption_logits(seqs, torch.ones_like(seqs), beams)[:, -1]

        return beam_search(step, prompt_ids, num_beams, min_length, max_length, eos_token_id,
                           repetition_penalty=repetition_penalty, length_normalisation=length_normalisation)

    @property
    def pruning_loss_terms(self) -> tuple[str, ...]:
        """SNIP's loss terms: the MULTIFLOW code's ITC + ITM + MLM (never ``caption_lm``); with a VQA decoder,
        which the authors' pretrained XVLM lacks, also its ``lm`` term, the only one reaching its weights."""
        return ("itc", "itm", "mlm") + (("lm",) if self.text_decoder is not None else ())

    def pretraining_losses(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           image_idx: torch.Tensor, tokenizer: Any) -> dict[str, torch.Tensor]:
        """XVLM's ITC, ITM (hard negatives) and MLM; the captioning LM (``caption_lm``: next-token loss of the
        text + fusion stack run with causal masks, as captioning runs it); the decoder's LM loss when it has one (VQA).

        ``caption_lm`` is XVLM's generation pretraining (the authors train the captioner with an LM loss on
        the pretraining images before fine-tuning it on COCO); without it the causal path the captioner
        uses is never trained before fine-tuning.
        """
        ids, att = input_ids, attention_mask
        image_embeds = self.encode_image(image)
        itc, itm = itc_itm_losses(self, image_embeds, ids, att, image_idx)
        masked, labels = mask_tokens(ids, att, tokenizer)
        # mask_tokens draws random words from the whole tokenizer; [DEC]/[ENC] past the vocabulary -> [MASK]
        masked = masked.masked_fill(masked >= self.config.vocab_size, tokenizer.mask_token_id)
        mlm = mlm_loss(self.mlm_logits(self.encode_grounded(masked, att, image_embeds)), labels)
        caption_lm = shifted_lm_loss(self.caption_logits(ids, att, image_embeds), ids.masked_fill(att == 0, -100))
        losses = {"itc": itc, "itm": itm, "mlm": mlm, "caption_lm": caption_lm}
        if self.text_decoder is not None:  # the decoder reads the caption as calibration_step runs it
            states = self.encode_grounded(ids, att, image_embeds)
            losses["lm"] = shifted_lm_loss(self.decode(ids, att, states, att), ids.masked_fill(att == 0, -100))
        return losses

    # ----------------------------------------------------------------- checkpoints
    def _aliases(self) -> dict[str, str]:
        """Tied state-dict names -> the first name of the same storage (the LM heads' decoders)."""
        return tied_aliases(self)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (tied aliases stored once)."""
        return save_backbone(self, directory)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: XVLMConfig | Mapping[str, Any] | None = None,
                        strict: bool = True, image_size: int | None = None) -> "XVLMBackbone":
        """Build and load a backbone from a ``save_pretrained`` directory or a state-dict file.

        A file (``.safetensors``, or a torch file holding the state dict, possibly under ``model`` /
        ``state_dict``) in this backbone's names takes its config from ``config`` or a ``config.json``
        beside it. The XVLM_CLIP authors' checkpoint (``torch.load(f)["model"]``, pretraining or
        fine-tuning; recognised by its layers all under ``text_encoder``) is mapped onto these names
        and its config inferred from the tensor shapes (attention heads: 12 at width 768, 16 at
        1024; other widths need ``config=``); a ``config`` dict overrides inferred fields, an
        ``XVLMConfig`` replaces them. Its momentum copies and queues are skipped with one info line;
        any other tensor the model lacks, or one it has that the file lacks (``strict``), or one of
        the wrong shape is an error naming the tensor and the file.

        ``image_size``: build the model for that resolution, the position table resized at load
        (CLS kept, bicubic, ``align_corners=False``). Without it the model keeps the file's size
        and other sizes interpolate at run time. The vision encoder is built without pretrained
        weights (the file holds them). A decoder is added when the file has ``text_decoder.*``.
        """
        return load_backbone(cls, path, config, strict, image_size)

    def load_state_dict_file(self, path: str | os.PathLike | Mapping[str, torch.Tensor], strict: bool = True,
                             source: str | None = None) -> dict[str, list[str]]:
        """Copy a state dict (file path or mapping) into this backbone; returns missing/unexpected keys.

        Raises, naming the keys, on shape mismatches, on tied copies that disagree, and (``strict``)
        on missing or unexpected keys; with ``strict=False`` those are logged and returned.
        """
        return load_state(self, path, strict=strict, source=source)


__all__ = [
    "XVLMBackbone", "XVLMConfig", "tiny_config", "as_xvlm_config", "read_state_dict", "PRESET_NAME",
    "XVLM_GROUPS", "XVLM_EXCLUDE", "XVLM_UNFILTERED", "XVLM_INHERIT", "UNUSED_PARTS", "bert_config",
    "XBertLayer", "LayerStack", "TextEncoder", "TextDecoder", "self_attention_mask", "key_mask",
]
