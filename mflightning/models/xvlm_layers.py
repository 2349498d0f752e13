"""XVLM's building blocks: the image encoders (XVLM_CLIP's CLIP ViT, or a timm ViT), BERT layers with
explicit masks, layer stacks, text encoder/decoder.

The CLIP image encoder (``CLIPVisionEncoder``) is a small module written here whose parameter
names are exactly the XVLM_CLIP authors' (``class_embedding``, ``patch_embed.weight``,
``pos_embed.weight``, ``pre_layrnorm``, ``encoder.layers.N.self_attn.{q,k,v,out}_proj``,
``layer_norm1``, ``mlp.fc1``, ``mlp.fc2``, ``layer_norm2``, ``post_layernorm``), so the authors'
checkpoint loads under ``vision_encoder.`` without renaming. Its transformer layers are
transformers' own ``CLIPEncoder`` (the authors' layers are a copy of it); only the embeddings and
the final norm are written here, because the authors name them differently from transformers
(``patch_embed`` / ``pos_embed`` instead of ``embeddings.patch_embedding`` / ``position_embedding``)
and apply ``post_layernorm`` to every token, where transformers' ``CLIPVisionModel`` normalises
only the pooled [CLS] token (its ``last_hidden_state`` is un-normalised). ``clip_state_to_xvlm``
maps a transformers CLIP vision state dict onto these names.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (BertAttention, BertEmbeddings, BertIntermediate,
                                                    BertOnlyMLMHead, BertOutput)

from mflightning.models.state import resize_position_embeddings

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig

    from mflightning.models.xvlm_config import XVLMConfig


class CLIPVisionEncoder(nn.Module):
    """XVLM_CLIP's image encoder: CLIP ViT in the authors' parameter names (see the module docstring).

    ``forward(image)`` returns every token ``(B, 1+P, D)`` after ``post_layernorm``, as XVLM does.
    Images of another (square) size than ``image_size`` use the position table resized on the fly
    (CLS kept, bicubic, ``align_corners=False``: ``resize_position_embeddings``). The patch
    embedding is a Conv2d without bias (kept dense by the pruning presets, as timm's is).
    """

    def __init__(self, config: CLIPVisionConfig):
        from transformers.models.clip.modeling_clip import CLIPEncoder

        super().__init__()
        self.config = config
        width, patch = config.hidden_size, config.patch_size
        if config.image_size % patch:
            raise ValueError(f"image_size {config.image_size} is not a multiple of the patch size {patch}")
        self.image_size, self.patch_size = config.image_size, patch
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.patch_embed = nn.Conv2d(config.num_channels, width, kernel_size=patch, stride=patch, bias=False)
        self.pos_embed = nn.Embedding(1 + (config.image_size // patch) ** 2, width)
        self.pre_layrnorm = nn.LayerNorm(width, eps=config.layer_norm_eps)  # (sic), the authors' and CLIP's name
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.reset_parameters()

    @property
    def embed_dim(self) -> int:
        return int(self.config.hidden_size)

    def reset_parameters(self) -> None:
        """Random initialisation as timm's ViT (Linear and positions truncated normal 0.02, zero biases,
        class token normal 1e-6; the patch convolution keeps torch's default)."""
        for module in self.encoder.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed.weight, std=0.02)
        nn.init.normal_(self.class_embedding, std=1e-6)

    def position_embeddings(self, grid: int) -> torch.Tensor:
        """The ``(1 + grid*grid, D)`` position table for a ``grid x grid`` patch grid."""
        table = self.pos_embed.weight
        if table.size(0) == 1 + grid * grid:
            return table
        return resize_position_embeddings(table, grid * grid, where="vision_encoder.pos_embed.weight")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.size(-1) != image.size(-2):
            raise ValueError(f"the CLIP image encoder takes square images (B, 3, H, H), got {tuple(image.shape)}")
        patches = self.patch_embed(image.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.size(0), 1, -1)
        grid = image.size(-1) // self.patch_size
        hidden = torch.cat([cls, patches], dim=1) + self.position_embeddings(grid).to(patches.dtype)
        hidden = self.encoder(inputs_embeds=self.pre_layrnorm(hidden)).last_hidden_state
        return self.post_layernorm(hidden)

    forward_features = forward  # the name the backbone calls (timm's)


_CLIP_RENAMES = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "patch_embed.weight",
    "embeddings.position_embedding.weight": "pos_embed.weight",
}
_CLIP_NON_VISION = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")


def clip_state_to_xvlm(state: Mapping[str, torch.Tensor], source: str = "CLIP state dict") -> dict[str, torch.Tensor]:
    """A transformers CLIP vision state dict (``CLIPVisionModel``, with or without its ``vision_model.``
    level, or a whole ``CLIPModel``: its text parts are left out) in ``CLIPVisionEncoder``'s names.

    ``embeddings.class_embedding`` -> ``class_embedding``, ``embeddings.patch_embedding`` ->
    ``patch_embed``, ``embeddings.position_embedding`` -> ``pos_embed``; ``pre_layrnorm``,
    ``encoder.*`` and ``post_layernorm`` keep their names; the ``position_ids`` buffer is dropped.
    Any other name is an error naming it.
    """
    out, unknown = {}, []
    for key, value in state.items():
        name = key[len("vision_model."):] if key.startswith("vision_model.") else key
        if key.startswith(_CLIP_NON_VISION) or name == "embeddings.position_ids":
            continue
        name = _CLIP_RENAMES.get(name, name)
        if name in ("class_embedding", "patch_embed.weight", "pos_embed.weight") or \
                name.startswith(("pre_layrnorm.", "encoder.layers.", "post_layernorm.")):
            out[name] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: tensors that are not part of a CLIP vision model: {sorted(unknown)[:10]}")
    return out


def load_clip_vision_weights(encoder: CLIPVisionEncoder, name: str) -> None:
    """Copy the vision weights of the transformers CLIP model ``name`` (hub name or local directory) into
    ``encoder``, its position table resized to the encoder's image size; sizes must agree."""
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel.from_pretrained(name)
    got, want = clip.config, encoder.config
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
              "hidden_act", "layer_norm_eps")
    differ = [f"{f}: {getattr(got, f)} vs {getattr(want, f)}" for f in fields if getattr(got, f) != getattr(want, f)]
    if differ:
        raise ValueError(f"clip_vision_model {name!r} does not fit the XVLM config (model vs config): {differ}")
    state = clip_state_to_xvlm(clip.state_dict(), source=name)
    grid = encoder.image_size // encoder.patch_size
    state["pos_embed.weight"] = resize_position_embeddings(state["pos_embed.weight"], grid * grid,
                                                           where=f"{name}: position embeddings")
    encoder.load_state_dict(state, strict=True)


def build_vision_encoder(config: XVLMConfig) -> nn.Module:
    """The image encoder of ``config.vision_layout``: ``CLIPVisionEncoder`` (clip) or a timm ViT (timm)."""
    from mflightning.models.xvlm_config import check_vision_layout, clip_vision_config

    check_vision_layout(config)
    if config.vision_layout == "clip":
        encoder = CLIPVisionEncoder(clip_vision_config(config))
        if config.clip_vision_model:
            load_clip_vision_weights(encoder, config.clip_vision_model)
        return encoder
    return build_timm_encoder(config)


def build_timm_encoder(config: XVLMConfig) -> nn.Module:
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
