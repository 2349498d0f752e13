"""Reading and writing ``XVLMBackbone`` checkpoints: a ``save_pretrained`` directory (``config.json`` +
``model.safetensors``), a bare state-dict file in this backbone's names, or the XVLM_CLIP authors'
checkpoint (``torch.load(f)["model"]``, read by ``convert_authors_state``; its config is inferred
from the tensor shapes by ``infer_authors_config``).

The authors' layout, and where each part goes here:

- ``vision_encoder.*`` (CLIP ViT, the authors' names): kept as it is (``CLIPVisionEncoder`` has the
  same names); the ``vision_encoder.position_ids`` buffer is dropped.
- ``text_encoder.bert.embeddings.*`` (pretraining) or ``text_encoder.embeddings.*`` (fine-tuning
  files drop the ``bert.`` level) -> ``text_encoder.embeddings.*`` (``position_ids`` /
  ``token_type_ids`` buffers dropped).
- ``text_encoder[.bert].encoder.layer.N.*``: the layers without ``crossattention.*`` (0-5) ->
  ``text_encoder.encoder.layer.N.*``; the layers with it (6-11) -> ``fusion_encoder.layer.N.*``.
- ``text_encoder.cls.predictions.*`` (MLM head), ``vision_proj``, ``text_proj``, ``itm_head``,
  ``bbox_head`` (``.0`` Linear, ``.1`` LayerNorm, ``.3`` Linear), ``temp``: same names.
- training-only tensors (momentum copies ``*_m.*``, queues ``*_queue``, ``queue_ptr``) are skipped
  with one info line naming them; any other tensor is an error naming it and the file.

Kept apart from ``xvlm.py`` so the backbone module holds the architecture and the interface only;
``XVLMBackbone.save_pretrained`` / ``from_pretrained`` / ``load_state_dict_file`` call these functions.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from mflightning.models.state import dedupe_aliases, fold_aliases, resize_position_embeddings
from mflightning.models.xvlm_config import XVLMConfig, as_xvlm_config

if TYPE_CHECKING:
    from mflightning.models.xvlm import XVLMBackbone

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
ARCHITECTURE = "XVLMBackbone"


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Tied state-dict names -> the first name of the same storage (the LM heads' decoders)."""
    return dedupe_aliases(model.state_dict(keep_vars=True))[1]


def save_backbone(model: "XVLMBackbone", directory: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (tied aliases stored once)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.update(architecture=ARCHITECTURE, vision_pretrained=False, vision_checkpoint=None, clip_vision_model=None)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    aliases = tied_aliases(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in aliases}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def load_backbone(cls: type["XVLMBackbone"], path: str | os.PathLike,
                  config: XVLMConfig | Mapping[str, Any] | None, strict: bool,
                  image_size: int | None = None) -> "XVLMBackbone":
    """``XVLMBackbone.from_pretrained`` (documented there): a directory or a state-dict file."""
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} in the directory" if path.is_dir()
                                else f"XVLM checkpoint {str(path)!r} does not exist")
    state = read_state_dict(weights)
    if is_authors_layout(state):
        return load_authors_checkpoint(cls, state, str(weights), config, strict, image_size)
    if config is None:
        config_file = weights.parent / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{weights}: no config given and no {CONFIG_NAME} beside it")
        raw = json.loads(config_file.read_text())
        if raw.pop("architecture", ARCHITECTURE) != ARCHITECTURE:
            raise ValueError(f"{config_file}: not an {ARCHITECTURE} config")
        raw.setdefault("vision_layout", "timm")  # written before the CLIP layout existed: a timm ViT
        config = raw
    config = as_xvlm_config(config)
    config.vision_pretrained, config.vision_checkpoint, config.clip_vision_model = False, None, None
    config.decoder = config.decoder or any(k.startswith("text_decoder.") for k in state)
    if image_size is not None:
        state = resize_vision_positions(state, config, image_size, str(weights))
    model = cls(config)
    load_state(model, state, strict=strict, source=str(weights))
    return model


def resize_vision_positions(state: Mapping[str, torch.Tensor], config: XVLMConfig, image_size: int,
                            source: str) -> dict[str, torch.Tensor]:
    """``state`` with its vision position table resized for ``image_size`` (CLS kept, bicubic), and
    ``config.image_size`` set to it."""
    patch = config.patch_size if config.vision_layout == "clip" else int(config.vision_kwargs.get("patch_size", 16))
    if image_size <= 0 or image_size % patch:
        raise ValueError(f"{source}: image_size {image_size} is not a positive multiple of the patch size {patch}")
    key = "vision_encoder.pos_embed.weight" if config.vision_layout == "clip" else "vision_encoder.pos_embed"
    state = dict(state)
    if key not in state:
        raise ValueError(f"{source}: no {key} to resize for image_size={image_size}")
    state[key] = resize_position_embeddings(state[key], (image_size // patch) ** 2, where=f"{source}: {key}")
    config.image_size = image_size
    return state


# ------------------------------------------------------------------------------------ the authors' layout
_QUEUE = re.compile(r"^[^.]*(_queue|queue_ptr|ptr_queue)$")
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_BUFFERS = ("position_ids", "token_type_ids")
_SAME_NAME = ("vision_encoder.", "vision_proj.", "text_proj.", "itm_head.", "bbox_head.", "text_encoder.cls.")


def is_authors_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """True for the XVLM authors' layout: text and fusion layers both under ``text_encoder``, no ``fusion_encoder.``."""
    if any(k.startswith(("fusion_encoder.", "backbone.fusion_encoder.")) for k in state):
        return False
    return any(k.startswith("text_encoder.bert.") for k in state) or any(
        k.startswith("text_encoder.encoder.layer.") and ".crossattention." in k for k in state)


def _is_training_only(key: str) -> bool:
    return key.split(".")[0].endswith("_m") or bool(_QUEUE.match(key))


def convert_authors_state(state: Mapping[str, torch.Tensor], source: str) -> tuple[dict, dict, list, list]:
    """The authors' state dict in ``XVLMBackbone``'s names (the layout is in the module docstring).

    Returns ``(state, origin, training_only, buffers)``: ``origin`` maps each new name to the file's
    name; ``training_only`` and ``buffers`` list the file's names left out. Unknown names, a file
    mixing ``text_encoder.bert.`` with ``bert``-less text names, or text layers whose cross-attention
    does not start at one index and last to the end are errors naming the file.
    """
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    training_only, buffers, unknown = [], [], []
    layers: dict[int, dict[str, tuple[str, torch.Tensor]]] = {}
    levels = set()
    for key, value in state.items():
        if _is_training_only(key):
            training_only.append(key)
            continue
        if key == "vision_encoder.position_ids":
            buffers.append(key)
            continue
        if key.startswith(_SAME_NAME) or key == "temp":
            out[key], origin[key] = value, key
            continue
        if not key.startswith("text_encoder."):
            unknown.append(key)
            continue
        rest = key[len("text_encoder."):]
        if rest.startswith("bert."):
            rest = rest[len("bert."):]
            levels.add("bert")
        elif rest.startswith(("embeddings.", "encoder.")):
            levels.add("")
        if rest.startswith("embeddings."):
            if rest.rsplit(".", 1)[-1] in _BUFFERS:
                buffers.append(key)
            else:
                out["text_encoder." + rest], origin["text_encoder." + rest] = value, key
            continue
        match = _LAYER.match(rest)
        if match is None:
            unknown.append(key)
            continue
        layers.setdefault(int(match.group(1)), {})[match.group(2)] = (key, value)
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} tensors that XVLMBackbone does not have: {_listing(sorted(unknown))}")
    if len(levels) > 1:
        raise ValueError(f"{source}: mixes text_encoder.bert.* names with text_encoder.* names without the bert level")
    if not layers:
        raise ValueError(f"{source}: no text_encoder[.bert].encoder.layer.* tensors: not an XVLM checkpoint")
    indices = sorted(layers)
    if indices != list(range(len(indices))):
        raise ValueError(f"{source}: text layers {indices} are not numbered 0..{len(indices) - 1}")
    fusion = [i for i in indices if any(n.startswith("crossattention.") for n in layers[i])]
    first = fusion[0] if fusion else len(indices)
    if fusion != list(range(first, len(indices))):
        raise ValueError(f"{source}: the layers with crossattention.* ({fusion}) must be the last ones "
                         f"(XVLM: text layers, then fusion layers)")
    for index, names in layers.items():
        prefix = f"text_encoder.encoder.layer.{index}." if index < first else f"fusion_encoder.layer.{index}."
        for name, (key, value) in names.items():
            out[prefix + name], origin[prefix + name] = value, key
    return out, origin, training_only, buffers


def _heads(width: int) -> int | None:
    return {768: 12, 1024: 16}.get(width)


def infer_authors_config(state: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Config fields read off a converted authors' state dict's shapes (heads: 12 at width 768, 16 at
    1024, None otherwise). ``image_size`` is the file's (from its position table and patch size)."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ValueError(f"{source}: no {key}, needed to infer the XVLM config (pass config=)")
        return tuple(state[key].shape)

    def count(pattern: str) -> int:
        found = {int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m}
        return len(found)

    width = shape("vision_encoder.class_embedding")[0]
    patch = shape("vision_encoder.patch_embed.weight")[-1]
    positions = shape("vision_encoder.pos_embed.weight")[0] - 1
    side = math.isqrt(positions)
    if side * side != positions:
        raise ValueError(f"{source}: vision_encoder.pos_embed.weight has {positions} patch entries, not a square grid")
    vocab, hidden = shape("text_encoder.embeddings.word_embeddings.weight")
    text_layers = count(r"^text_encoder\.encoder\.layer\.(\d+)\.")
    fusion_layers = count(r"^fusion_encoder\.layer\.(\d+)\.")
    first = "text_encoder.encoder.layer.0." if text_layers else f"fusion_encoder.layer.{text_layers}."
    return dict(
        vocab_size=vocab, hidden_size=hidden, num_attention_heads=_heads(hidden),
        intermediate_size=shape(first + "intermediate.dense.weight")[0],
        num_text_layers=text_layers, num_fusion_layers=fusion_layers,
        max_position_embeddings=shape("text_encoder.embeddings.position_embeddings.weight")[0],
        type_vocab_size=shape("text_encoder.embeddings.token_type_embeddings.weight")[0],
        vision_layout="clip", vision_width=width, vision_layers=count(r"^vision_encoder\.encoder\.layers\.(\d+)\."),
        vision_heads=_heads(width),
        vision_intermediate_size=shape("vision_encoder.encoder.layers.0.mlp.fc1.weight")[0],
        patch_size=patch, image_size=side * patch, embed_dim=shape("vision_proj.weight")[0],
        bbox_head=any(k.startswith("bbox_head.") for k in state),
    )


def authors_name(name: str, bert_level: bool) -> str:
    """The authors' name of one of this backbone's names (for messages about missing tensors)."""
    level = "bert." if bert_level else ""
    for ours, theirs in (("fusion_encoder.layer.", f"text_encoder.{level}encoder.layer."),
                         ("text_encoder.encoder.", f"text_encoder.{level}encoder."),
                         ("text_encoder.embeddings.", f"text_encoder.{level}embeddings.")):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def load_authors_checkpoint(cls: type["XVLMBackbone"], state: Mapping[str, torch.Tensor], source: str,
                            config: XVLMConfig | Mapping[str, Any] | None, strict: bool,
                            image_size: int | None) -> "XVLMBackbone":
    """An ``XVLMBackbone`` holding the authors' checkpoint ``state`` (read from ``source``)."""
    bert_level = any(k.startswith("text_encoder.bert.") for k in state)
    converted, origin, training_only, buffers = convert_authors_state(state, source)
    if isinstance(config, XVLMConfig):
        config = as_xvlm_config(config)
    else:
        inferred = infer_authors_config(converted, source)
        inferred.update(dict(config or {}))
        undecided = [k for k in ("num_attention_heads", "vision_heads") if inferred[k] is None]
        if undecided:
            raise ValueError(f"{source}: cannot tell the number of attention heads from the widths (text "
                             f"{inferred['hidden_size']}, vision {inferred['vision_width']}; known: 768 -> 12, "
                             f"1024 -> 16): pass config={{{', '.join(repr(k) + ': ...' for k in undecided)}}}")
        config = as_xvlm_config(inferred)
    config.vision_pretrained, config.vision_checkpoint, config.clip_vision_model = False, None, None
    if config.vision_layout != "clip":
        raise ValueError(f"{source}: the authors' XVLM_CLIP checkpoint needs vision_layout='clip', "
                         f"got {config.vision_layout!r}")
    if "vision_encoder.pos_embed.weight" in converted:
        converted = resize_vision_positions(converted, config, image_size or config.image_size, source)
    model = cls(config)
    own = model.state_dict()
    aliases = tied_aliases(model)
    origin = {**origin, **{first: origin[alias] for alias, first in aliases.items()
                           if alias in converted and first not in converted}}
    converted = fold_aliases(converted, aliases, source)  # e.g. an LM-head bias kept only as decoder.bias
    mismatched = [f"{origin[k]}: file {tuple(v.shape)} vs model {tuple(own[k].shape)} ({k})"
                  for k, v in converted.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise ValueError(f"{source}: {len(mismatched)} tensors of the wrong shape for the XVLM config: "
                         f"{_listing(mismatched)}")
    if strict:
        missing = sorted(authors_name(k, bert_level) for k in own if k not in converted and k not in aliases)
        unexpected = sorted(origin[k] for k in converted if k not in own)
        problems = [f"{len(missing)} tensors missing from the file: {_listing(missing)}"] if missing else []
        if unexpected:
            problems.append(f"{len(unexpected)} tensors the model does not have: {_listing(unexpected)}")
        if problems:
            raise ValueError(f"{source}: does not match XVLMBackbone({_config_summary(config)}): " + "; ".join(problems)
                             + " (strict=False loads what matches)")
    if training_only or buffers:
        log.info("%s: skipped %d training-only tensors (%s) and %d position/token-type id buffers (%s)", source,
                 len(training_only), _prefix_summary(training_only), len(buffers), ", ".join(buffers) or "none")
    load_state(model, converted, strict=strict, source=source)
    return model


def _prefix_summary(keys: list[str]) -> str:
    """``vision_encoder_m.* (22), image_queue`` for a list of names: counts per first name component."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split(".")[0], []).append(key)
    return ", ".join(names[0] if names == [head] else f"{head}.* ({len(names)})"
                     for head, names in groups.items()) or "none"


def _config_summary(config: XVLMConfig) -> str:
    return (f"text {config.num_text_layers}+{config.num_fusion_layers} layers x {config.hidden_size}, vision "
            f"{config.vision_layers} layers x {config.vision_width}, {config.image_size} px")


def load_state(model: torch.nn.Module, path: str | os.PathLike | Mapping[str, torch.Tensor], strict: bool = True,
               source: str | None = None) -> dict[str, list[str]]:
    """``XVLMBackbone.load_state_dict_file`` (documented there): copy a state dict into ``model``."""
    state = read_state_dict(path) if not isinstance(path, Mapping) else dict(path)
    source = source or (str(path) if not isinstance(path, Mapping) else "state dict")
    if state and all(k.startswith("backbone.") for k in state):  # a task module's checkpoint
        state = {k[len("backbone."):]: v for k, v in state.items()}
    own = model.state_dict(keep_vars=True)
    aliases = tied_aliases(model)
    state = fold_aliases(state, aliases, source)  # a tied tensor held only under its alias loads; two values: error
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and k not in aliases)
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {mismatched[:10]}")
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
