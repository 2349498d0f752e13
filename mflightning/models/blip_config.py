"""BLIP configs: the dict form recipes give (``as_blip_config``), one filled from a tokenizer, tiny ones for tests."""
from __future__ import annotations

from typing import Any, Mapping

from transformers import BlipConfig


def tiny_config(
    vocab_size: int,
    hidden_size: int = 32,
    num_layers: int = 1,
    num_heads: int = 2,
    image_size: int = 32,
    patch_size: int = 16,
    bos_token_id: int | None = None,
    pad_token_id: int = 0,
    sep_token_id: int | None = None,
    max_position_embeddings: int = 64,
    embed_dim: int = 16,
    enc_token_id: int | None = None,
) -> BlipConfig:
    """A small random BLIP config for tests and smoke runs (hidden 32, 1 layer, 32 px images)."""
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        encoder_hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_token_id if bos_token_id is not None else vocab_size - 2,  # [DEC], [ENC] last
        pad_token_id=pad_token_id,
        sep_token_id=sep_token_id if sep_token_id is not None else 3,
        eos_token_id=sep_token_id if sep_token_id is not None else 3,
    )
    vision = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        image_size=image_size,
        patch_size=patch_size,
        initializer_range=0.02,
    )
    config = BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=embed_dim)
    config.enc_token_id = enc_token_id if enc_token_id is not None else text["bos_token_id"] + 1
    return config


def as_blip_config(config: BlipConfig | Mapping[str, Any]) -> BlipConfig:
    """Accept a BlipConfig or its dict form (``text_config``/``vision_config`` sub-dicts, YAML-friendly)."""
    if isinstance(config, BlipConfig):
        return config
    if not isinstance(config, Mapping):
        raise TypeError(f"BLIP config must be a BlipConfig or a dict, got {type(config).__name__}")
    # enc_token_id / tie_decoder: this project's own fields, which BlipConfig.to_dict() of a backbone's config holds
    unknown = set(config) - set(BlipConfig().to_dict()) - {"text_config", "vision_config", "enc_token_id", "tie_decoder"}
    if unknown:
        raise ValueError(f"unknown BLIP config keys {sorted(unknown)}")
    return BlipConfig(**dict(config))


def config_from_tokenizer(spec: Mapping[str, Any], tokenizer: Any) -> BlipConfig:
    """A BlipConfig from its dict form; vocabulary and [DEC]/[PAD]/[SEP]/[ENC] ids default to the tokenizer's."""
    config = dict(spec)
    text = dict(config.get("text_config") or {})
    text.setdefault("vocab_size", len(tokenizer))
    text.setdefault("bos_token_id", tokenizer.convert_tokens_to_ids("[DEC]"))
    text.setdefault("pad_token_id", tokenizer.pad_token_id)
    text.setdefault("sep_token_id", tokenizer.sep_token_id)
    text.setdefault("eos_token_id", tokenizer.sep_token_id)
    config["text_config"] = text
    blip_config = as_blip_config({k: v for k, v in config.items() if k != "enc_token_id"})
    blip_config.enc_token_id = config.get("enc_token_id", tokenizer.convert_tokens_to_ids("[ENC]"))
    return blip_config

