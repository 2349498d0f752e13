"""XVLM configs: ``XVLMConfig`` (sizes of the encoders and heads), its dict form, tiny ones for tests."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Mapping

from transformers import BertConfig

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig


VISION_LAYOUTS = ("clip", "timm")
#: The options of each vision layout; the other layout's options must keep their defaults.
CLIP_OPTIONS = ("vision_width", "vision_layers", "vision_heads", "vision_intermediate_size", "patch_size",
                "vision_hidden_act", "vision_layer_norm_eps", "clip_vision_model")
TIMM_OPTIONS = ("vision_model", "vision_kwargs", "vision_pretrained", "vision_checkpoint")


@dataclass
class XVLMConfig:
    """Sizes of the three encoders and the heads.

    The image encoder has one of two layouts (``vision_layout``):

    - ``"clip"`` (default): XVLM_CLIP's CLIP ViT with separate q/k/v/out projections, in the
      authors' parameter names (``xvlm_layers.CLIPVisionEncoder``), sized by ``vision_width``,
      ``vision_layers``, ``vision_heads``, ``vision_intermediate_size``, ``patch_size`` (quick_gelu,
      LayerNorm eps 1e-5 as in CLIP). ``clip_vision_model`` (a hub name such as
      ``openai/clip-vit-base-patch16`` or a local directory of a transformers CLIP model) loads its
      vision weights through ``CLIPVisionModel.from_pretrained``; None: random initialisation.
    - ``"timm"``: any timm ViT with a class token: ``vision_model=None`` builds timm's
      VisionTransformer from ``vision_kwargs``, a timm name builds that model (``vision_pretrained``
      / a local ``vision_checkpoint`` file load its weights through timm). Its attention has one
      fused qkv matrix, so MultiFlow's per-layer ratios differ from the reference's.

    Options of the layout not chosen must keep their defaults (an error names them otherwise).
    """

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
    vision_layout: str = "clip"
    # clip layout (CLIP ViT-B/16 by default)
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_intermediate_size: int = 3072
    patch_size: int = 16
    vision_hidden_act: str = "quick_gelu"
    vision_layer_norm_eps: float = 1e-5
    clip_vision_model: str | None = None
    # timm layout
    vision_model: str | None = None
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


def check_vision_layout(config: XVLMConfig) -> None:
    """Raise unless ``vision_layout`` is known and the other layout's options keep their defaults."""
    if config.vision_layout not in VISION_LAYOUTS:
        raise ValueError(f"vision_layout must be one of {list(VISION_LAYOUTS)}, got {config.vision_layout!r}")
    defaults = XVLMConfig()
    foreign = TIMM_OPTIONS if config.vision_layout == "clip" else CLIP_OPTIONS
    changed = [name for name in foreign if getattr(config, name) != getattr(defaults, name)]
    if changed:
        other = "timm" if config.vision_layout == "clip" else "clip"
        raise ValueError(f"XVLM config options {changed} belong to vision_layout={other!r} but the config has "
                         f"vision_layout={config.vision_layout!r}: set vision_layout={other!r} or drop them")


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
    """A small random XVLM config for tests (hidden 32, 1 text + 1 fusion layer, 1-layer ViT, 32 px).

    The ViT has the CLIP layout unless ``vision_layout="timm"`` is among the overrides (then a
    1-block timm VisionTransformer with a pre-norm, from ``vision_kwargs``).
    """
    values = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_attention_heads=num_heads,
                  intermediate_size=2 * hidden_size, num_text_layers=num_text_layers,
                  num_fusion_layers=num_fusion_layers, max_position_embeddings=64, image_size=image_size, embed_dim=16)
    if overrides.get("vision_layout", "clip") == "timm":
        values.update(vision_layout="timm", vision_kwargs=dict(patch_size=patch_size, embed_dim=hidden_size, depth=1,
                                                               num_heads=num_heads, pre_norm=True))
    else:
        values.update(vision_width=hidden_size, vision_layers=1, vision_heads=num_heads,
                      vision_intermediate_size=2 * hidden_size, patch_size=patch_size)
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



def clip_vision_config(config: XVLMConfig) -> "CLIPVisionConfig":
    """The transformers ``CLIPVisionConfig`` of the clip-layout image encoder (SDPA attention, no dropout)."""
    from transformers import CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=config.vision_width, intermediate_size=config.vision_intermediate_size,
        num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads, image_size=config.image_size,
        patch_size=config.patch_size, hidden_act=config.vision_hidden_act, layer_norm_eps=config.vision_layer_norm_eps,
        attention_dropout=0.0, num_channels=3,
    )
    vision._attn_implementation = "sdpa"
    return vision
