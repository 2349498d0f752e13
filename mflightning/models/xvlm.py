"""XVLM-style backbone: timm ViT image encoder, 6-layer BERT text encoder, 6-layer fusion encoder.

Layout (parameter name prefixes; layer indices are global, as in XVLM's 12-layer BERT):
- ``vision_encoder.``  a timm VisionTransformer (CLIP ViT-B/16 shape for real use); its qkv, proj
  and MLP layers are nn.Linear, its patch embedding a Conv2d.
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
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (BertAttention, BertEmbeddings, BertIntermediate,
                                                    BertOnlyMLMHead, BertOutput)

from mflightning.pruning.presets import register_preset

log = logging.getLogger(__name__)

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
    description="XVLM: vision = ViT; text = text encoder layers 0-5; fusion = layers 6-11 (cross-attention) and "
    "the VQA decoder copied from them (inherits their masks); heads dense",
)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
ARCHITECTURE = "XVLMBackbone"


@dataclass
class XVLMConfig:
    """Sizes of the three encoders and the heads; ``vision_model=None`` builds timm's VisionTransformer
    from ``vision_kwargs`` (tests), a timm name builds that model (``vision_pretrained`` / a local
    ``vision_checkpoint`` file load its weights through timm)."""

    vocab_size: int = 30524  # bert-base-uncased + [DEC], [ENC] (mflightning.data.build_tokenizer)
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    num_text_layers: int = 6
    num_fusion_layers: int = 6
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    vision_model: str | None = "vit_base_patch16_clip_224"
    vision_kwargs: dict = field(default_factory=dict)
    vision_pretrained: bool = False
    vision_checkpoint: str | None = None
    image_size: int = 224
    embed_dim: int = 256
    temp: float = 0.07
    bbox_head: bool = True
    decoder: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def as_xvlm_config(config: XVLMConfig | Mapping[str, Any] | None) -> XVLMConfig:
    """An XVLMConfig from itself, its dict form (YAML-friendly; unknown keys are an error) or None (defaults)."""
    if config is None:
        return XVLMConfig()
    if isinstance(config, XVLMConfig):
        return copy.deepcopy(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"XVLM config must be an XVLMConfig or a dict, got {type(config).__name__}")
    known = {f.name for f in fields(XVLMConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown XVLM config keys {unknown}; known: {sorted(known)}")
    return XVLMConfig(**copy.deepcopy(dict(config)))


def tiny_config(vocab_size: int, hidden_size: int = 32, num_heads: int = 2, num_text_layers: int = 1,
                num_fusion_layers: int = 1, image_size: int = 32, patch_size: int = 16, **overrides: Any) -> XVLMConfig:
    """A small random XVLM config for tests (hidden 32, 1 text + 1 fusion layer, 1-block ViT, 32 px)."""
    vision = dict(patch_size=patch_size, embed_dim=hidden_size, depth=1, num_heads=num_heads, pre_norm=True)
    values = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_attention_heads=num_heads,
                  intermediate_size=2 * hidden_size, num_text_layers=num_text_layers,
                  num_fusion_layers=num_fusion_layers, max_position_embeddings=64, vision_model=None,
                  vision_kwargs=vision, image_size=image_size, embed_dim=16)
    values.update(overrides)
    return XVLMConfig(**values)


def bert_config(config: XVLMConfig) -> BertConfig:
    """The BertConfig of the text, fusion and decoder layers (SDPA attention with explicit boolean masks)."""
    bert = BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_text_layers + config.num_fusion_layers,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
        pad_token_id=config.pad_token_id, hidden_act=config.hidden_act, hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob, layer_norm_eps=config.layer_norm_eps,
    )
    bert._attn_implementation = "sdpa"
    return bert


def build_vision_encoder(config: XVLMConfig) -> nn.Module:
    """The timm ViT: ``VisionTransformer(**vision_kwargs)`` or ``timm.create_model(vision_model, ...)``."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(config.vision_kwargs)
    kwargs.update(img_size=config.image_size, num_classes=0, dynamic_img_size=True)
    if config.vision_model is None:
        model = VisionTransformer(**kwargs)
    else:
        overlay = {"file": str(config.vision_checkpoint)} if config.vision_checkpoint else None
        if overlay and not Path(overlay["file"]).is_file():
            raise FileNotFoundError(f"vision_checkpoint {overlay['file']!r} does not exist")
        model = timm.create_model(config.vision_model, pretrained=config.vision_pretrained or overlay is not None,
                                  pretrained_cfg_overlay=overlay, **kwargs)
    if getattr(model, "cls_token", None) is None or not hasattr(model, "forward_features"):
        raise ValueError(f"vision model {config.vision_model!r} must be a ViT with a class token (XVLM's ITC uses it)")
    return model


def _init_bert_weights(module: nn.Module) -> None:
    """BERT's initialisation (normal 0.02, zero bias, unit LayerNorm) for randomly built text parts."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_mlp(width: int, out: int) -> nn.Sequential:
    """XVLM's head MLP: Linear(w, 2w), LayerNorm, GELU, Linear(2w, out)."""
    return nn.Sequential(nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(), nn.Linear(2 * width, out))


def self_attention_mask(attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean SDPA mask (True = attend): ``(B, 1, 1, L)`` over real keys, ``(B, 1, L, L)`` when causal."""
    keys = attention_mask.bool()[:, None, None, :]
    if not causal:
        return keys
    length = attention_mask.size(1)
    return keys & torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()


def key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Cross-attention mask ``(B, 1, 1, Lk)`` from a ``(B, Lk)`` mask; None = attend to every token."""
    return None if mask is None else mask.bool()[:, None, None, :]


class XBertLayer(nn.Module):
    """A BERT layer (HF modules, BertLayer's parameter names) whose masks are always given explicitly.

    Composed here instead of using ``BertLayer`` because transformers couples cross-attention to
    ``is_decoder=True``; this layer's self-attention is causal only when the caller passes a causal
    mask. Cross-attention keys/values read ``encoder_width``-dimensional tokens.
    """

    def __init__(self, config: BertConfig, cross_attention: bool = False, encoder_width: int | None = None):
        super().__init__()
        self.attention = BertAttention(config, is_causal=False)
        if cross_attention:
            self.crossattention = BertAttention(config, is_causal=False, is_cross_attention=True)
            width = encoder_width or config.hidden_size
            if width != config.hidden_size:
                self.crossattention.self.key = nn.Linear(width, config.hidden_size)
                self.crossattention.self.value = nn.Linear(width, config.hidden_size)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    @property
    def has_cross_attention(self) -> bool:
        return hasattr(self, "crossattention")

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, encoder_states: torch.Tensor | None = None,
                encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.attention(hidden, attention_mask=mask)[0]
        if self.has_cross_attention:
            if encoder_states is None:
                raise ValueError("a cross-attention layer needs encoder_states (image or question tokens)")
            hidden = self.crossattention(hidden, encoder_hidden_states=encoder_states,
                                         encoder_attention_mask=encoder_mask)[0]
        return self.output(self.intermediate(hidden), hidden)


class LayerStack(nn.Module):
    """Layers keyed by their global index (``layer.6`` ... ``layer.11``), run in order."""

    def __init__(self, layers: Mapping[int, XBertLayer]):
        super().__init__()
        self.layer = nn.ModuleDict({str(i): layer for i, layer in layers.items()})

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, encoder_states: torch.Tensor | None = None,
                encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layer.values():
            hidden = layer(hidden, mask, encoder_states, encoder_mask)
        return hidden


def _tie_lm_head(head: BertOnlyMLMHead, embeddings: BertEmbeddings) -> None:
    """BERT ties the prediction decoder to the word embeddings (and its bias to ``predictions.bias``)."""
    head.predictions.decoder.weight = embeddings.word_embeddings.weight
    head.predictions.decoder.bias = head.predictions.bias


class TextEncoder(nn.Module):
    """Embeddings, the unimodal layers 0..n-1 and the MLM head (``cls``, applied to fusion outputs)."""

    def __init__(self, config: BertConfig, num_layers: int):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = LayerStack({i: XBertLayer(config) for i in range(num_layers)})
        self.cls = BertOnlyMLMHead(config)


class TextDecoder(nn.Module):
    """VQA answer decoder: embeddings, layers (causal self-attention + cross-attention) and LM head."""

    def __init__(self, embeddings: BertEmbeddings, layers: nn.ModuleDict, cls: BertOnlyMLMHead):
        super().__init__()
        self.embeddings = embeddings
        self.layer = layers
        self.cls = cls
        _tie_lm_head(self.cls, self.embeddings)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, encoder_states: torch.Tensor,
                encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embeddings(input_ids=input_ids)
        mask, cross = self_attention_mask(attention_mask, causal=True), key_mask(encoder_mask)
        for layer in self.layer.values():
            hidden = layer(hidden, mask, encoder_states, cross)
        return self.cls(hidden)


class XVLMBackbone(nn.Module):
    """XVLM: ViT + BERT text encoder (layers 0-5) + fusion encoder (layers 6-11) + ITC/ITM/MLM/box heads."""

    pruning_preset = PRESET_NAME

    def __init__(self, config: XVLMConfig | Mapping[str, Any] | None = None):
        super().__init__()
        config = as_xvlm_config(config)
        self.config = config
        self.vision_encoder = build_vision_encoder(config)
        vision_width = int(self.vision_encoder.embed_dim)
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
                part.apply(_init_bert_weights)
        _tie_lm_head(self.text_encoder.cls, self.text_encoder.embeddings)
        self.text_decoder: TextDecoder | None = None
        if config.decoder:
            self.add_decoder_()

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

    def encode_grounded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor,
                        image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text encoder then fusion encoder: image-grounded states of a text (ITM input, VQA question)."""
        return self.fuse(self.encode_text(input_ids, attention_mask), attention_mask, image_embeds, image_mask)

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

    # ----------------------------------------------------------------- checkpoints
    def _aliases(self) -> dict[str, str]:
        """Tied state-dict names -> the first name of the same storage (the LM heads' decoders)."""
        first: dict[tuple[int, tuple[int, ...]], str] = {}
        aliases: dict[str, str] = {}
        for name, tensor in self.state_dict(keep_vars=True).items():
            key = (tensor.data_ptr(), tuple(tensor.shape))
            if key in first:
                aliases[name] = first[key]
            else:
                first[key] = name
        return aliases

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (tied aliases stored once)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        config.update(architecture=ARCHITECTURE, vision_pretrained=False, vision_checkpoint=None)
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        aliases = self._aliases()
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k not in aliases}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: XVLMConfig | Mapping[str, Any] | None = None,
                        strict: bool = True) -> "XVLMBackbone":
        """Build and load a backbone from a ``save_pretrained`` directory or a state-dict file.

        A file (``.safetensors``, or a torch file holding the state dict, possibly under ``model`` /
        ``state_dict``) takes its config from ``config`` or a ``config.json`` beside it. The vision
        encoder is built without pretrained weights (the file holds them). A decoder is added when
        the file has ``text_decoder.*`` weights.
        """
        path = Path(path)
        weights = path / WEIGHTS_NAME if path.is_dir() else path
        if not weights.is_file():
            raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} in the directory" if path.is_dir()
                                    else f"XVLM checkpoint {str(path)!r} does not exist")
        if config is None:
            config_file = weights.parent / CONFIG_NAME
            if not config_file.is_file():
                raise FileNotFoundError(f"{weights}: no config given and no {CONFIG_NAME} beside it")
            raw = json.loads(config_file.read_text())
            if raw.pop("architecture", ARCHITECTURE) != ARCHITECTURE:
                raise ValueError(f"{config_file}: not an {ARCHITECTURE} config")
            config = raw
        config = as_xvlm_config(config)
        config.vision_pretrained, config.vision_checkpoint = False, None
        state = read_state_dict(weights)
        config.decoder = config.decoder or any(k.startswith("text_decoder.") for k in state)
        model = cls(config)
        model.load_state_dict_file(state, strict=strict, source=str(weights))
        return model

    def load_state_dict_file(self, path: str | os.PathLike | Mapping[str, torch.Tensor], strict: bool = True,
                             source: str | None = None) -> dict[str, list[str]]:
        """Copy a state dict (file path or mapping) into this backbone; returns missing/unexpected keys.

        Raises, naming the keys, on shape mismatches, on tied copies that disagree, and (``strict``)
        on missing or unexpected keys; with ``strict=False`` those are logged and returned.
        """
        state = read_state_dict(path) if not isinstance(path, Mapping) else dict(path)
        source = source or (str(path) if not isinstance(path, Mapping) else "state dict")
        if state and all(k.startswith("backbone.") for k in state):  # a task module's checkpoint
            state = {k[len("backbone."):]: v for k, v in state.items()}
        own = self.state_dict(keep_vars=True)
        aliases = self._aliases()
        unexpected = sorted(k for k in state if k not in own)
        missing = sorted(k for k in own if k not in state and k not in aliases)
        mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                      for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
        untied = [k for k in state if k in aliases and aliases[k] in state
                  and state[k].shape == state[aliases[k]].shape and not torch.equal(state[k], state[aliases[k]])]
        problems = []
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches: {mismatched[:10]}")
        if untied:
            problems.append(f"tied weights differ from their source: {untied}")
        if strict and missing:
            problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
        if strict and unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
        if problems:
            raise ValueError(f"{source}: state dict does not match XVLMBackbone: " + "; ".join(problems))
        if missing or unexpected:
            log.warning("%s: %d missing keys %s, %d unexpected keys %s (ignored, strict=False)", source,
                        len(missing), _listing(missing), len(unexpected), _listing(unexpected))
        with torch.no_grad():
            for key, value in state.items():
                if key in own and key not in aliases:
                    own[key].copy_(value.to(own[key].dtype))
        return {"missing": missing, "unexpected": unexpected}


def _listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch file (unwrapping ``model`` / ``state_dict``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state-dict file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors come in many types
        raise ValueError(f"{path}: not a readable torch state-dict file: {err}") from err
    for key in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return dict(state)


__all__ = [
    "XVLMBackbone", "XVLMConfig", "tiny_config", "as_xvlm_config", "read_state_dict", "PRESET_NAME",
    "XVLM_GROUPS", "XVLM_EXCLUDE", "XVLM_UNFILTERED", "XVLM_INHERIT",
]
