"""XVLM configs: ``XVLMConfig`` (sizes of the encoders and heads), its dict form, tiny ones for tests."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from transformers import BertConfig


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

