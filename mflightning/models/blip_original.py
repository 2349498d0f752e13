"""The authors' original BLIP checkpoints (``.pth`` files of the BLIP code base) read into ``BlipBackbone``.

``BlipBackbone.from_pretrained(path)`` comes here for a file (``.pth``/``.pt``/``.bin``, or any file
``torch.load(f, map_location="cpu", weights_only=True)`` reads as ``{"model": state_dict, ...}`` or as a
bare state dict). Layouts: ``/work/shared/CHECKPOINTS.md`` (BLIP section); in short:

- pretraining (``model_base*.pth``): image encoder, text encoder, decoder (its embeddings,
  cross-attention and FFN equal to the encoder's), ITC/ITM heads, ``temp``; momentum copies, queues.
- retrieval fine-tune: as pretraining without the decoder; ``idx_queue``/``ptr_queue``.
- captioning fine-tune: ``visual_encoder.*`` and ``text_decoder.*`` only.
- VQA fine-tune: image encoder, text encoder, decoder (untied); no heads, no ``temp``.

Names. The image encoder is renamed onto ``transformers``' ``BlipVisionModel`` (``VISION_RULES``);
its tensors already have our shapes (``pos_embed`` ``(1, 1+P, D)`` = ``position_embedding``,
``cls_token`` ``(1, 1, D)`` = ``class_embedding``, fused ``qkv`` ``(3D, D)``), only the position
embeddings are resized when the target image size differs. Text names pass through: the original
text encoder is a ``BertModel`` without pooler (``text_encoder.embeddings/encoder.*``, as our
``BlipTextModel``), the decoder a ``BertLMHeadModel`` (``text_decoder.bert.*``,
``text_decoder.cls.predictions.*``, as our ``BlipTextLMHeadModel``); neither has token-type
embeddings. ``position_ids`` buffers (a fixed ``arange``) are accepted and not copied.

Training-only tensors (momentum encoders ``*_m``, queues) are not loaded and are listed in one info
log line; any other tensor that does not map, a shape that differs from the model's, or a model
tensor the file lacks is an error naming it and the file.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import pickle
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from transformers import BlipConfig

from mflightning.models.blip_checkpoints import (
    COMPONENTS,
    DEFAULT_TEMP,
    check_missing,
    fit_position_embeddings,
    load_mapped,
    read_decoder_state,
    set_tied,
)
from mflightning.models.blip_config import as_blip_config

if TYPE_CHECKING:
    from mflightning.models.blip import BlipBackbone

log = logging.getLogger(__name__)

ORIGINAL_SUFFIXES = (".pth", ".pt", ".bin")
# Not part of a backbone: the queues of the ITC/ITM training objectives ...
TRAINING_ONLY_NAMES = ("image_queue", "text_queue", "idx_queue", "queue_ptr", "ptr_queue")
# ... and the momentum (EMA) encoders and heads: `visual_encoder_m.*`, `text_encoder_m.*`, `vision_proj_m.*`, ...
MOMENTUM = re.compile(r"^\w+_m(\.|$)")
# Top-level names that pass through unchanged (besides `visual_encoder.`, renamed below).
PASS_THROUGH = ("text_encoder", "text_decoder", "vision_proj", "text_proj", "itm_head", "temp")
# `visual_encoder.<original>` -> `vision_model.<ours>` (transformers' BlipVisionModel).
VISION_RULES = (
    (r"cls_token", r"embeddings.class_embedding"),
    (r"pos_embed", r"embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"encoder.layers.\1.layer_norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
)
_VISION_RULES = tuple((re.compile(rf"^{pattern}$"), target) for pattern, target in VISION_RULES)
# Attention heads by width: the published BLIP sizes only (ViT-B/16 and BERT-base: 768 -> 12 heads;
# ViT-L/16: 1024 -> 16 heads; 64 channels per head). Any other width needs `config=`.
HEADS_BY_WIDTH = {768: 12, 1024: 16}
# BLIP's tokenizer: bert-base-uncased (30522 tokens, [PAD] 0, [SEP] 102) + [DEC] (bos) + [ENC].
BLIP_VOCAB = 30524
BLIP_TOKEN_IDS = {"pad_token_id": 0, "sep_token_id": 102, "eos_token_id": 102, "bos_token_id": 30522}
BLIP_ENC_TOKEN_ID = 30523
DEFAULT_EMBED_DIM = 256  # ITC embedding width when the file has no heads (BLIP's `embed_dim`)
VISION_LAYER_NORM_EPS = 1e-6  # the original ViT's LayerNorm eps (transformers' default is 1e-5)
TEXT_LAYER_NORM_EPS = 1e-12  # BERT's
# The authors' configs/blip/med_config.json (every task's text encoder and decoder): dropout 0.1 after the
# embeddings, on the attention probabilities and on each sub-layer's output; transformers' BlipTextConfig has 0.0.
TEXT_DROPOUT = 0.1


# ----------------------------------------------------------------------------- reading
def is_original_checkpoint(source: str | os.PathLike) -> bool:
    """A file (not a directory or hub name): an original-format checkpoint. Suffixes .pth/.pt/.bin count even
    when the file does not exist, so a mistyped path fails as "no such file" instead of a hub lookup."""
    path = Path(source)
    return path.is_file() or (path.suffix in ORIGINAL_SUFFIXES and not path.is_dir())


def read_original_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an original checkpoint: ``torch.load(f)["model"]`` or the file's bare state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path}: torch.load(weights_only=True) refused the file ({str(error).splitlines()[0]}). It holds "
            "objects other than tensors and plain containers; if you trust it, re-save its state dict with "
            "torch.save({'model': torch.load(f, weights_only=False)['model']}, new_path) and load that"
        ) from error
    if isinstance(data, Mapping) and "model" in data:
        state = data["model"]
        where = f"{path} ['model']"
    else:
        state, where = data, str(path)
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{where}: expected a state dict (name -> tensor), got {type(state).__name__}")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        top = sorted(data)[:8] if isinstance(data, Mapping) else []
        raise ValueError(
            f"{where}: not a state dict: {len(not_tensors)} entries are not tensors, e.g. {not_tensors[:5]}"
            + (f" (top-level keys: {top}; a checkpoint keeps its state dict under 'model')" if top else "")
        )
    return dict(state)


def is_training_only(name: str) -> bool:
    """Momentum encoders/heads (``*_m.*``) and the ITC/ITM queues: tensors a backbone never holds."""
    return name in TRAINING_ONLY_NAMES or MOMENTUM.match(name) is not None


def vision_name(original: str) -> str | None:
    """``blocks.3.attn.qkv.weight`` -> ``encoder.layers.3.self_attn.qkv.weight`` (names under ``visual_encoder.``)."""
    for pattern, target in _VISION_RULES:
        if pattern.match(original):
            return pattern.sub(target, original)
    return None


def convert_original_state(
    state: Mapping[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Rename an original state dict onto ``BlipBackbone`` names.

    Returns (tensors by our names, our name -> original name, names of the training-only tensors left
    out). A tensor that is neither mapped nor training-only is an error naming it and ``source``.
    """
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    skipped: list[str] = []
    unknown: list[str] = []
    for name, tensor in state.items():
        if is_training_only(name):
            skipped.append(name)
            continue
        top, _, rest = name.partition(".")
        if top == "visual_encoder":
            ours = vision_name(rest)
            target = None if ours is None else f"vision_model.{ours}"
        elif top in PASS_THROUGH:
            target = name
        else:
            target = None
        if target is None:
            unknown.append(name)
            continue
        mapped[target] = tensor
        origin[target] = name
    if unknown:
        hint = ""
        if any(k.startswith("vision_model.") for k in unknown):
            hint = " (these look like transformers names: give the checkpoint's directory with its config.json instead)"
        raise ValueError(
            f"{source}: {len(unknown)} tensors that are neither part of a BLIP backbone nor training-only, "
            f"e.g. {sorted(unknown)[:8]}{hint}"
        )
    return mapped, origin, skipped


def summarize_skipped(skipped: list[str]) -> str:
    """``skipped 412 training-only tensors: visual_encoder_m.* (150), text_queue, ...`` (grouped by top name)."""
    groups = Counter(name.split(".", 1)[0] for name in skipped)
    dotted = {name.split(".", 1)[0] for name in skipped if "." in name}
    order = sorted(groups, key=lambda top: (top not in dotted, top))  # groups first, then single tensors
    parts = [f"{top}.* ({groups[top]})" if top in dotted else top for top in order]
    return f"skipped {len(skipped)} training-only tensors: " + ", ".join(parts)


def checkpoint_kind(names: set[str] | Mapping[str, Any]) -> str:
    """Which of BLIP's published checkpoint types the (original) names look like; for messages."""
    def has(prefix: str) -> bool:
        return any(n.startswith(prefix) for n in names)

    vision, encoder, decoder = has("visual_encoder."), has("text_encoder."), has("text_decoder.")
    heads = has("itm_head.") or has("vision_proj.") or has("text_proj.")
    if vision and encoder and decoder and heads:
        return "pretraining"
    if vision and encoder and heads and not decoder:
        return "retrieval fine-tune"
    if vision and decoder and not encoder:
        return "captioning fine-tune"
    if vision and encoder and decoder and not heads:
        return "VQA fine-tune"
    return "unrecognised BLIP layout"


# ----------------------------------------------------------------------------- config inference
def _shape(state: Mapping[str, torch.Tensor], name: str, source: str) -> tuple[int, ...]:
    if name not in state:
        raise ValueError(f"{source}: cannot infer the BLIP config: tensor {name!r} is missing; pass config=")
    return tuple(state[name].shape)


def _depth(state: Mapping[str, torch.Tensor], prefix: str, source: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    indices = sorted({int(m.group(1)) for n in state if (m := pattern.match(n))})
    if not indices or indices != list(range(len(indices))):
        raise ValueError(f"{source}: cannot infer the depth: layers under {prefix!r} are {indices}, not 0..N-1")
    return len(indices)


def _heads(width: int, what: str, source: str) -> int:
    if width not in HEADS_BY_WIDTH:
        raise ValueError(
            f"{source}: cannot infer the number of attention heads of the {what} (width {width}): the rule knows "
            f"only the published BLIP widths {HEADS_BY_WIDTH} (64 channels per head); pass config= "
            "(a transformers BlipConfig or its dict) with num_attention_heads"
        )
    return HEADS_BY_WIDTH[width]


def infer_blip_config(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> BlipConfig:
    """A ``BlipConfig`` read off the shapes of an ORIGINAL-named state dict (values never read: meta tensors work).

    Vision: width from ``cls_token``, patch size from ``patch_embed.proj``, image size from the
    ``pos_embed`` grid x patch size, depth from the ``blocks.N`` indices, FFN width from ``mlp.fc1``,
    LayerNorm eps 1e-6. Text (encoder, else the decoder's ``bert.``): vocabulary and width from the
    word embeddings, positions, depth, FFN width; cross-attention width = the image encoder's;
    hidden and attention dropout 0.1 (the authors' ``med_config.json``, not in the file).
    Heads: only the published widths (``HEADS_BY_WIDTH``: 768 -> 12, 1024 -> 16); other widths raise.
    Token ids: BLIP's tokenizer (vocabulary 30524: [PAD] 0, [SEP] 102, [DEC] 30522, [ENC] 30523); another
    vocabulary raises. ITC width from ``vision_proj`` (256 when the file has no heads).
    Anything it cannot decide is an error telling to pass ``config=``.
    """
    v = "visual_encoder."
    width = _shape(state, v + "cls_token", source)[-1]
    patch_weight = _shape(state, v + "patch_embed.proj.weight", source)
    if len(patch_weight) != 4 or patch_weight[2] != patch_weight[3]:
        raise ValueError(f"{source}: visual_encoder.patch_embed.proj.weight {patch_weight} is not a square-patch Conv2d")
    patch = patch_weight[-1]
    positions = _shape(state, v + "pos_embed", source)
    grid = math.isqrt(positions[-2] - 1)
    if grid * grid != positions[-2] - 1:
        raise ValueError(f"{source}: visual_encoder.pos_embed {positions}: {positions[-2] - 1} patches are not a square grid")
    vision = dict(
        hidden_size=width,
        num_hidden_layers=_depth(state, v + "blocks.", source),
        intermediate_size=_shape(state, v + "blocks.0.mlp.fc1.weight", source)[0],
        num_attention_heads=_heads(width, "image encoder", source),
        image_size=grid * patch,
        patch_size=patch,
        layer_norm_eps=VISION_LAYER_NORM_EPS,
        hidden_act="gelu",
    )
    towers = [p for p in ("text_encoder.", "text_decoder.bert.") if p + "embeddings.word_embeddings.weight" in state]
    if not towers:
        raise ValueError(f"{source}: cannot infer the text config: neither text_encoder.* nor text_decoder.bert.* "
                         "word embeddings are in the file; pass config=")
    texts = []
    for t in towers:
        vocab, hidden = _shape(state, t + "embeddings.word_embeddings.weight", source)
        cross = t + "encoder.layer.0.crossattention.self.key.weight"
        texts.append(dict(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=_depth(state, t + "encoder.layer.", source),
            encoder_hidden_size=_shape(state, cross, source)[1] if cross in state else width,
            intermediate_size=_shape(state, t + "encoder.layer.0.intermediate.dense.weight", source)[0],
            max_position_embeddings=_shape(state, t + "embeddings.position_embeddings.weight", source)[0],
        ))
    if len(texts) == 2 and texts[0] != texts[1]:
        raise ValueError(f"{source}: text encoder and decoder differ in shape ({texts[0]} vs {texts[1]}); "
                         "BlipBackbone holds one text config for both")
    text = texts[0]
    if text["encoder_hidden_size"] != width:
        raise ValueError(f"{source}: text cross-attention reads width {text['encoder_hidden_size']} but the image "
                         f"encoder's width is {width}")
    if text["vocab_size"] != BLIP_VOCAB:
        raise ValueError(
            f"{source}: vocabulary of {text['vocab_size']} tokens: the [DEC]/[ENC]/[PAD]/[SEP] ids are known only "
            f"for BLIP's tokenizer ({BLIP_VOCAB} tokens); pass config= with the text_config token ids"
        )
    text.update(num_attention_heads=_heads(text["hidden_size"], "text encoder/decoder", source),
                layer_norm_eps=TEXT_LAYER_NORM_EPS, hidden_act="gelu", hidden_dropout_prob=TEXT_DROPOUT,
                attention_probs_dropout_prob=TEXT_DROPOUT, **BLIP_TOKEN_IDS)
    embed_dim = state["vision_proj.weight"].shape[0] if "vision_proj.weight" in state else DEFAULT_EMBED_DIM
    config = BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=int(embed_dim))
    config.enc_token_id = BLIP_ENC_TOKEN_ID
    return config


# ----------------------------------------------------------------------------- loading
def _display(origin: Mapping[str, str], name: str) -> str:
    original = origin.get(name)
    return name if original in (None, name) else f"{original} (-> {name})"


def _check_against(model: torch.nn.Module, state: Mapping[str, torch.Tensor], origin: Mapping[str, str],
                   source: str, inferred: bool) -> None:
    """Every mapped tensor has a same-shaped model tensor, else an error naming them (original names)."""
    own = model.state_dict()
    unexpected, mismatched = [], []
    for name, tensor in state.items():
        if name.endswith("position_ids"):
            continue
        if name not in own:
            unexpected.append(_display(origin, name))
        elif tuple(own[name].shape) != tuple(tensor.shape):
            mismatched.append(f"{_display(origin, name)}: file {tuple(tensor.shape)} vs model {tuple(own[name].shape)}")
    if unexpected or mismatched:
        lines = []
        if unexpected:
            lines.append(f"{len(unexpected)} tensors the backbone does not have, e.g. {sorted(unexpected)[:8]}")
        if mismatched:
            lines.append(f"{len(mismatched)} shape mismatches, e.g. {mismatched[:8]}")
        advice = ("the config was inferred from the file's shapes" if inferred else
                  "check the config= given against the file")
        raise ValueError(f"{source}: original BLIP checkpoint does not match BlipBackbone ({advice}): " + "; ".join(lines))


def _decoder_tied_in_file(state: Mapping[str, torch.Tensor]) -> bool:
    """Pretraining layout: the decoder's cross-attention and FFN tensors all equal the encoder's."""
    from mflightning.models.blip import TIED_PARTS

    prefix = "text_decoder.bert.encoder.layer."
    pairs = [(n, "text_encoder.encoder.layer." + n[len(prefix):]) for n in state
             if n.startswith(prefix) and n[len(prefix):].split(".")[1] in TIED_PARTS]
    return bool(pairs) and all(
        enc in state and state[enc].shape == state[dec].shape and torch.equal(state[enc], state[dec]) for dec, enc in pairs
    )


def original_decoder_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``text_decoder.*`` tensors of an original checkpoint (for ``decoder_from=``); the rest is not read."""
    original = read_original_state(path)
    mapped, _, _ = convert_original_state(original, str(path))
    decoder = {k: v for k, v in mapped.items() if k.startswith("text_decoder.")}
    if not decoder:  # the kind is read from the original names (visual_encoder.*), not the mapped ones
        raise ValueError(f"{path}: decoder_from= names a checkpoint without text_decoder.* tensors "
                         f"({checkpoint_kind(original)})")
    log.info("%s: taking its %d text_decoder.* tensors as the decoder; its other %d tensors are not used",
             path, len(decoder), len(mapped) - len(decoder))
    return decoder


def load_original(
    cls: type["BlipBackbone"], path: str | os.PathLike, *, config: BlipConfig | Mapping[str, Any] | None,
    image_size: int | None, decoder_from: str | os.PathLike | None, allow_missing: tuple[str, ...],
    tie_decoder: bool | None, hub_kwargs: Mapping[str, Any],
) -> "BlipBackbone":
    """``BlipBackbone.from_pretrained`` for an original ``.pth`` file (documented there)."""
    source = str(path)
    original = read_original_state(path)
    kind = checkpoint_kind(original)
    mapped, origin, skipped = convert_original_state(original, source)
    if skipped:
        log.info("%s (%s): %s", source, kind, summarize_skipped(skipped))
    inferred = config is None
    blip_config = infer_blip_config(original, source) if inferred else copy.deepcopy(as_blip_config(config))
    if image_size is not None:
        blip_config.vision_config.image_size = int(image_size)
    model = cls(blip_config)
    mapped = fit_position_embeddings(model, mapped, f"{source} (visual_encoder.pos_embed)")
    _check_against(model, mapped, origin, source, inferred)
    loaded = load_mapped(model, mapped, source, components=COMPONENTS)
    if decoder_from is not None:
        if any(n.startswith("text_decoder.") for n in loaded):
            log.warning("%s has its own decoder: decoder_from=%s is not used", source, decoder_from)
        else:
            loaded |= load_mapped(model, read_decoder_state(decoder_from, hub_kwargs), str(decoder_from),
                                  components=("text_decoder",))
    if "temp" not in loaded:
        loaded.add("temp")
        log.info("%s has no ITC temperature; starting from %s", source, DEFAULT_TEMP)
    check_missing(
        model, loaded, source, allow_missing=allow_missing,
        note=f"it is a {kind} checkpoint of the original BLIP code; ",
    )
    file_tied = _decoder_tied_in_file(mapped)
    if tie_decoder is None:
        tie_decoder = file_tied  # keep the file's layout: pretraining ties, fine-tunes do not
    elif tie_decoder and not file_tied and any(n.startswith("text_decoder.") for n in mapped):
        log.warning("%s: tie_decoder=True but the file's decoder cross-attention/FFN differ from the encoder's; "
                    "the encoder's weights are shared and the decoder's own copies are dropped", source)
    return set_tied(model, tie_decoder)


# ----------------------------------------------------------------------------- momentum encoders and queues
ITC_QUEUES = ("image_queue", "text_queue")  # (embed_dim, queue_size) each, columns L2-normalised


def load_original_momentum_(copy_: torch.nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load the momentum encoders of an original pretraining or retrieval file into ``copy_`` (a momentum
    copy of a ``BlipBackbone``, e.g. ``RetrievalModule.backbone_m``); return the file's ITC queues as
    ``{"image_queue": (queue_size, embed_dim), "text_queue": ...}`` rows.

    This is what the authors' ``load_checkpoint`` does for retrieval (their model holds
    ``visual_encoder_m``, ``text_encoder_m``, ``vision_proj_m``, ``text_proj_m`` and the two queues under
    the file's names): ``*_m.*`` tensors are renamed as their online twins, the image position
    embeddings resized to ``copy_``'s image size. Every parameter of ``copy_`` must come from the file
    and every momentum tensor of the file must fit it, else an error naming them.
    """
    source = str(path)
    original = read_original_state(path)
    momentum = {}
    for name, tensor in original.items():
        if MOMENTUM.match(name):
            top, dot, rest = name.partition(".")
            momentum[top[: -len("_m")] + dot + rest] = tensor
    missing_queues = [q for q in ITC_QUEUES if q not in original]
    if not momentum or missing_queues:
        raise ValueError(f"{source}: a {checkpoint_kind(original)} checkpoint without "
                         + ("momentum encoders (*_m.*)" if not momentum else f"the ITC queues {missing_queues}")
                         + "; only BLIP's pretraining and retrieval files hold them (momentum_from_checkpoint=False "
                           "starts the momentum encoders as copies of the backbone and the queue empty)")
    mapped, origin, _ = convert_original_state(momentum, source)
    mapped = {name: tensor for name, tensor in mapped.items() if not name.endswith("position_ids")}
    mapped = fit_position_embeddings(copy_, mapped, f"{source} (visual_encoder_m.pos_embed)")
    _check_against(copy_, mapped, origin, source, inferred=False)
    own = dict(copy_.named_parameters())
    loaded = load_mapped(copy_, mapped, source, components=tuple(copy_._modules) + tuple(copy_._parameters))
    missing = sorted(set(own) - loaded)
    if missing:
        raise ValueError(f"{source}: {len(missing)} momentum parameters are not in the file, e.g. {missing[:6]}")
    log.info("%s: loaded the momentum encoders (%d tensors) and the ITC queues", source, len(loaded))
    return {name: original[name].t().contiguous() for name in ITC_QUEUES}
