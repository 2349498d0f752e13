"""BLIP backbone: ViT image encoder, image-grounded text encoder, text decoder and the ITC/ITM heads.

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
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipConfig
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel

from mflightning.pruning.presets import register_preset

log = logging.getLogger(__name__)

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
    _PREFIX + r"\w+_m\.",  # momentum encoders, should a subclass add them
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

BACKBONE_ARCHITECTURE = "MflightningBlipBackbone"
HF_ARCHITECTURES = ("BlipForImageTextRetrieval", "BlipForConditionalGeneration", "BlipForQuestionAnswering")
# Retrieval checkpoints carry no decoder: take it from the captioning checkpoint of the same size.
DEFAULT_DECODER_SOURCE = {
    "Salesforce/blip-itm-base-coco": "Salesforce/blip-image-captioning-base",
    "Salesforce/blip-itm-large-coco": "Salesforce/blip-image-captioning-large",
    "Salesforce/blip-itm-base-flickr": "Salesforce/blip-image-captioning-base",
    "Salesforce/blip-itm-large-flickr": "Salesforce/blip-image-captioning-large",
}
COMPONENTS = ("vision_model", "text_encoder", "text_decoder", "vision_proj", "text_proj", "itm_head", "temp")
DEFAULT_TEMP = 0.07
WEIGHTS_NAME = "model.safetensors"
TIED_PARTS = ("crossattention", "intermediate", "output")  # shared in BLIP pretraining


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
    unknown = set(config) - set(BlipConfig().to_dict()) - {"text_config", "vision_config"}
    if unknown:
        raise ValueError(f"unknown BLIP config keys {sorted(unknown)}")
    return BlipConfig(**dict(config))


def with_first_token(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Copy of ``input_ids`` whose first token is ``token_id`` ([ENC] / [DEC] replace [CLS])."""
    out = input_ids.clone()
    out[:, 0] = token_id
    return out


def shifted_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, per_sequence: bool = False
) -> torch.Tensor:
    """Next-token cross-entropy in fp32 (labels -100 ignored): mean over tokens, or summed per sequence."""
    pred = logits[:, :-1].float()
    target = labels[:, 1:]
    loss = F.cross_entropy(
        pred.reshape(-1, pred.size(-1)), target.reshape(-1), ignore_index=-100,
        label_smoothing=label_smoothing, reduction="none",
    ).view(target.shape)
    if per_sequence:
        return loss.sum(1)
    n_tokens = (target != -100).sum()
    if n_tokens == 0:
        raise ValueError("LM loss: every label is ignored (-100); check prompt length and padding")
    return loss.sum() / n_tokens


def itc_loss(
    image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor,
    image_idx: torch.Tensor, text_image_idx: torch.Tensor,
) -> torch.Tensor:
    """Image-text contrastive loss; every pair sharing an image index is a positive (soft targets)."""
    sim_i2t = image_feat.float() @ text_feat.float().t() / temp.float()
    positives = (image_idx.view(-1, 1) == text_image_idx.view(1, -1)).float()
    targets_i2t = positives / positives.sum(1, keepdim=True).clamp_min(1)
    targets_t2i = positives.t() / positives.t().sum(1, keepdim=True).clamp_min(1)
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_i2t.t(), dim=1) * targets_t2i).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def sample_hard_negatives(sim: torch.Tensor, same_image: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row pick one column with probability softmax(sim) among columns of another image.

    Returns (rows, columns) of the rows that have at least one valid negative (a batch whose
    captions all describe one image has none, and those rows are left out).
    """
    weights = F.softmax(sim.detach().float(), dim=1) + 1e-5
    weights = weights.masked_fill(same_image, 0.0)
    rows = torch.nonzero(weights.sum(1) > 0).flatten()
    if rows.numel() == 0:
        return rows, rows
    cols = torch.multinomial(weights[rows], 1, generator=generator).flatten()
    return rows, cols


class BlipBackbone(nn.Module):
    """BLIP image encoder + image-grounded text encoder + text decoder + ITC/ITM heads (one name space)."""

    pruning_preset = PRESET_NAME

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
        if tie:
            self.tie_decoder_()

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
        """Share the decoder's cross-attention and FFN modules with the encoder (BLIP pretraining layout).

        The decoder's own copies are dropped (the encoder's weights win). Shared weights appear once,
        under ``text_encoder.`` names, and calibration statistics accumulate the encoder's and the
        decoder's calls: masks computed on a tied backbone hold the encoder's layers only, and an untied
        task module's decoder inherits them through the ``blip`` preset.
        """
        encoder_layers = self.text_encoder.encoder.layer
        decoder_layers = self.text_decoder.bert.encoder.layer
        if len(encoder_layers) != len(decoder_layers):
            raise ValueError(f"cannot tie: encoder has {len(encoder_layers)} layers, decoder {len(decoder_layers)}")
        for enc, dec in zip(encoder_layers, decoder_layers):
            for part in TIED_PARTS:
                setattr(dec, part, getattr(enc, part))
        self.config.tie_decoder = True
        return self

    def untie_decoder_(self) -> "BlipBackbone":
        """Give the decoder its own copies of the shared modules (BLIP fine-tuning layout); no-op if untied."""
        if not self.decoder_tied:
            return self
        for dec in self.text_decoder.bert.encoder.layer:
            for part in TIED_PARTS:
                setattr(dec, part, copy.deepcopy(getattr(dec, part)))
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

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (tied LM-head aliases stored once)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        config["architectures"] = [BACKBONE_ARCHITECTURE]
        (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))
        state = {name: t.detach().contiguous().cpu() for name, t in self._unique_state().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return directory

    def _unique_state(self) -> dict[str, torch.Tensor]:
        """State dict without tied aliases (same storage seen under two names keeps its first name)."""
        seen: set[tuple[int, tuple[int, ...]]] = set()
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self.state_dict().items():
            key = (tensor.data_ptr(), tuple(tensor.shape))
            if key in seen:
                continue
            seen.add(key)
            out[name] = tensor
        return out

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        decoder_from: str | os.PathLike | None = None,
        allow_missing: tuple[str, ...] = (),
        tie_decoder: bool | None = None,
        **hub_kwargs: Any,
    ) -> "BlipBackbone":
        """Load a backbone saved by ``save_pretrained`` or a Salesforce BLIP checkpoint (hub name or dir).

        HF checkpoints: ``BlipForImageTextRetrieval`` gives the image encoder, text encoder and heads,
        ``BlipForQuestionAnswering`` image encoder + encoder + decoder, ``BlipForConditionalGeneration``
        image encoder + decoder. Components the checkpoint lacks come from ``decoder_from`` (its
        ``text_decoder.*`` only; default for the hub's retrieval checkpoints: the captioning checkpoint
        of the same size). Any other missing component is an error unless named in ``allow_missing``
        (e.g. ``("text_decoder",)``), any checkpoint key that does not map is an error. The
        temperature, absent from HF checkpoints, starts at 0.07. ``tie_decoder=True`` shares the
        decoder's cross-attention/FFN with the encoder after loading (the encoder's weights win);
        None keeps the saved layout (HF checkpoints: untied).
        """
        source = str(name_or_path)
        raw_config = _read_json(source, "config.json", hub_kwargs)
        architectures = raw_config.get("architectures") or []
        if BACKBONE_ARCHITECTURE in architectures:
            config = BlipConfig.from_dict(raw_config)
            model = cls(config)
            state = _read_state_dict(source, hub_kwargs)
            loaded = model._load_mapped(state, source, components=COMPONENTS)
            model._check_missing(loaded, source, allow_missing=allow_missing)
            return _set_tied(model, tie_decoder)
        architecture = next((a for a in architectures if a in HF_ARCHITECTURES), None)
        if architecture is None:
            raise ValueError(
                f"{source}: config.json architectures {architectures} is not a supported BLIP checkpoint; "
                f"expected one of {list(HF_ARCHITECTURES)} or {BACKBONE_ARCHITECTURE}"
            )
        config = BlipConfig.from_dict(raw_config)
        model = cls(config)
        state = _read_state_dict(source, hub_kwargs)
        loaded = model._load_mapped(state, source, components=COMPONENTS)
        has_decoder = any(name.startswith("text_decoder.") for name in loaded)
        if not has_decoder:
            decoder_from = decoder_from or DEFAULT_DECODER_SOURCE.get(source)
            if decoder_from is not None:
                decoder_state = _read_state_dict(str(decoder_from), hub_kwargs)
                decoder_state = {k: v for k, v in decoder_state.items() if not k.startswith("vision_model.")}
                loaded |= model._load_mapped(decoder_state, str(decoder_from), components=("text_decoder",))
        if not any(name == "temp" for name in loaded):
            loaded.add("temp")
            log.info("%s has no ITC temperature; starting from %s", source, DEFAULT_TEMP)
        model._check_missing(loaded, source, allow_missing=allow_missing)
        return _set_tied(model, tie_decoder)

    def _load_mapped(self, state: Mapping[str, torch.Tensor], source: str, components: tuple[str, ...]) -> set[str]:
        """Copy checkpoint tensors into same-named parameters/buffers; returns the names loaded.

        Tied aliases (the LM head's decoder weight/bias) and the non-persistent ``position_ids``
        buffers are accepted and skipped; any other key that does not map is an error.
        """
        own = self.state_dict(keep_vars=True)
        unique = set(self._unique_state())
        unexpected, mismatched, loaded = [], [], set()
        for key, value in state.items():
            if key.endswith("position_ids"):
                continue
            if key.split(".", 1)[0] not in components or key not in own:
                unexpected.append(key)
                continue
            if key not in unique:  # tied alias: its storage is loaded under the first name
                continue
            target = own[key]
            if tuple(target.shape) != tuple(value.shape):
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
                continue
            with torch.no_grad():
                target.copy_(value.to(target.dtype))
            loaded.add(key)
        if unexpected or mismatched:
            lines = []
            if unexpected:
                lines.append(f"{len(unexpected)} unexpected keys, e.g. {sorted(unexpected)[:8]}")
            if mismatched:
                lines.append(f"{len(mismatched)} shape mismatches, e.g. {mismatched[:8]}")
            raise ValueError(f"{source}: checkpoint does not match BlipBackbone: " + "; ".join(lines))
        return loaded

    def _check_missing(self, loaded: set[str], source: str, allow_missing: tuple[str, ...]) -> None:
        """Raise naming the components (and a few keys) that no checkpoint provided."""
        missing = [k for k in self._unique_state() if k not in loaded]
        missing = [k for k in missing if k.split(".", 1)[0] not in allow_missing]
        if missing:
            parts = sorted({k.split(".", 1)[0] for k in missing})
            raise ValueError(
                f"{source}: {len(missing)} backbone weights missing from the checkpoint (components "
                f"{parts}, e.g. {missing[:6]}); pass decoder_from=<captioning/VQA checkpoint> for the "
                f"decoder or allow_missing={tuple(parts)} to keep them randomly initialised"
            )

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


def _set_tied(model: BlipBackbone, tie_decoder: bool | None) -> BlipBackbone:
    if tie_decoder is True:
        return model.tie_decoder_()
    if tie_decoder is False:
        return model.untie_decoder_()
    return model


def _read_json(source: str, filename: str, hub_kwargs: Mapping[str, Any]) -> dict:
    from transformers.utils.hub import cached_file

    path = cached_file(source, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if path is None:
        raise FileNotFoundError(f"{source}: no {filename} (expected a BLIP checkpoint directory or hub name)")
    return json.loads(Path(path).read_text())


def _read_state_dict(source: str, hub_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: model.safetensors, its sharded index, or pytorch_model.bin."""
    from safetensors.torch import load_file
    from transformers.utils.hub import cached_file

    def find(name: str) -> str | None:
        return cached_file(source, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)

    if (path := find("model.safetensors")) is not None:
        return load_file(path)
    if (index := find("model.safetensors.index.json")) is not None:
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            shard_path = find(shard)
            if shard_path is None:
                raise FileNotFoundError(f"{source}: shard {shard} listed in the index is missing")
            state.update(load_file(shard_path))
        return state
    if (path := find("pytorch_model.bin")) is not None:
        return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{source}: no model.safetensors, sharded index or pytorch_model.bin")


__all__ = [
    "BlipBackbone", "tiny_config", "as_blip_config", "with_first_token", "shifted_lm_loss", "itc_loss",
    "sample_hard_negatives", "PRESET_NAME", "BLIP_GROUPS", "BLIP_EXCLUDE", "BLIP_INHERIT",
]
