"""XVLM's building blocks: the timm ViT, BERT layers with explicit masks, layer stacks, text encoder/decoder."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (BertAttention, BertEmbeddings, BertIntermediate,
                                                    BertOnlyMLMHead, BertOutput)

if TYPE_CHECKING:
    from mflightning.models.xvlm_config import XVLMConfig


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


def init_bert_weights(module: nn.Module) -> None:
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


def tie_lm_head(head: BertOnlyMLMHead, embeddings: BertEmbeddings) -> None:
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
        tie_lm_head(self.cls, self.embeddings)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, encoder_states: torch.Tensor,
                encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embeddings(input_ids=input_ids)
        mask, cross = self_attention_mask(attention_mask, causal=True), key_mask(encoder_mask)
        for layer in self.layer.values():
            hidden = layer(hidden, mask, encoder_states, cross)
        return self.cls(hidden)
