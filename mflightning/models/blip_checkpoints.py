"""Reading and writing ``BlipBackbone`` checkpoints: its own ``save_pretrained`` format, the
Salesforce BLIP checkpoints in transformers format (hub name or local directory) and, through
``blip_original.py``, the authors' original ``.pth`` files.

Kept apart from ``blip.py`` so the backbone module holds the architecture and the interface only;
``BlipBackbone.save_pretrained`` / ``from_pretrained`` call these functions.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from transformers import BlipConfig

from mflightning.models.state import dedupe_aliases, fold_aliases, resize_position_embeddings

if TYPE_CHECKING:
    from mflightning.models.blip import BlipBackbone

log = logging.getLogger(__name__)

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


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied aliases (same storage seen under two names keeps its first name)."""
    return dedupe_aliases(model.state_dict())[0]


def save_backbone(model: "BlipBackbone", directory: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (tied LM-head aliases stored once)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = [BACKBONE_ARCHITECTURE]
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))
    state = {name: t.detach().contiguous().cpu() for name, t in unique_state(model).items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def load_backbone(
    cls: type["BlipBackbone"], name_or_path: str | os.PathLike, decoder_from: str | os.PathLike | None,
    allow_missing: tuple[str, ...], tie_decoder: bool | None, hub_kwargs: Mapping[str, Any],
    *, config: BlipConfig | Mapping[str, Any] | None = None, image_size: int | None = None,
) -> "BlipBackbone":
    """``BlipBackbone.from_pretrained`` (documented there): own format, a Salesforce HF checkpoint or an
    original BLIP ``.pth`` file (``blip_original.load_original``)."""
    from mflightning.models.blip_original import is_original_checkpoint, load_original

    source = str(name_or_path)
    if is_original_checkpoint(source):
        return load_original(cls, source, config=config, image_size=image_size, decoder_from=decoder_from,
                             allow_missing=allow_missing, tie_decoder=tie_decoder, hub_kwargs=hub_kwargs)
    if config is not None:
        raise ValueError(f"{source}: config= applies to original BLIP .pth files only; a transformers-format "
                         "checkpoint is built from its own config.json")
    raw_config = _read_json(source, "config.json", hub_kwargs)
    if image_size is not None:
        raw_config.setdefault("vision_config", {})["image_size"] = int(image_size)
    architectures = raw_config.get("architectures") or []
    if BACKBONE_ARCHITECTURE in architectures:
        model = cls(BlipConfig.from_dict(raw_config))
        state = fit_position_embeddings(model, _read_state_dict(source, hub_kwargs), source)
        loaded = load_mapped(model, state, source, components=COMPONENTS)
        check_missing(model, loaded, source, allow_missing=allow_missing)
        return set_tied(model, tie_decoder)
    architecture = next((a for a in architectures if a in HF_ARCHITECTURES), None)
    if architecture is None:
        raise ValueError(
            f"{source}: config.json architectures {architectures} is not a supported BLIP checkpoint; "
            f"expected one of {list(HF_ARCHITECTURES)} or {BACKBONE_ARCHITECTURE}"
        )
    model = cls(BlipConfig.from_dict(raw_config))
    state = fit_position_embeddings(model, _read_state_dict(source, hub_kwargs), source)
    loaded = load_mapped(model, state, source, components=COMPONENTS)
    has_decoder = any(name.startswith("text_decoder.") for name in loaded)
    if has_decoder and decoder_from is not None:
        log.warning("%s has its own decoder: decoder_from=%s is not used", source, decoder_from)
    if not has_decoder:
        decoder_from = decoder_from or DEFAULT_DECODER_SOURCE.get(source)
        if decoder_from is not None:
            loaded |= load_mapped(model, read_decoder_state(decoder_from, hub_kwargs), str(decoder_from),
                                  components=("text_decoder",))
    if not any(name == "temp" for name in loaded):
        loaded.add("temp")
        log.info("%s has no ITC temperature; starting from %s", source, DEFAULT_TEMP)
    check_missing(model, loaded, source, allow_missing=allow_missing)
    return set_tied(model, tie_decoder)


def read_decoder_state(decoder_from: str | os.PathLike, hub_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors ``decoder_from=`` gives: an original ``.pth`` file's ``text_decoder.*``, or a transformers
    checkpoint's tensors without its image encoder (``load_mapped`` then accepts ``text_decoder.*`` only)."""
    from mflightning.models.blip_original import is_original_checkpoint, original_decoder_state

    if is_original_checkpoint(decoder_from):
        return original_decoder_state(decoder_from)
    state = _read_state_dict(str(decoder_from), hub_kwargs)
    return {k: v for k, v in state.items() if not k.startswith("vision_model.")}


POSITION_EMBEDDING = "vision_model.embeddings.position_embedding"


def fit_position_embeddings(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state`` with its image position embeddings resized to ``model``'s patch grid when the two differ.

    The CLS entry is kept, the patch grid resized bicubically (``align_corners=False``), as the original
    BLIP loader does (``resize_position_embeddings``); logged. A different width is left for the shape check.
    """
    state = dict(state)
    pos = state.get(POSITION_EMBEDDING)
    target = model.state_dict().get(POSITION_EMBEDDING)
    if pos is None or target is None or pos.shape == target.shape or pos.shape[-1] != target.shape[-1]:
        return state
    if pos.dim() != target.dim():
        return state  # a layout the shape check reports
    num_patches = target.shape[-2] - 1
    state[POSITION_EMBEDDING] = resize_position_embeddings(pos, num_patches, where=source)
    old_side, new_side = math.isqrt(pos.shape[-2] - 1), math.isqrt(num_patches)
    log.info("%s: resized the image position embeddings from a %dx%d to a %dx%d patch grid (CLS kept, bicubic)",
             source, old_side, old_side, new_side, new_side)
    return state


def load_mapped(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                components: tuple[str, ...]) -> set[str]:
    """Copy checkpoint tensors into same-named parameters/buffers; returns the names loaded.

    A tied alias (the LM head's decoder weight/bias) is loaded under the first name of its tensor when
    the file lacks that name, and must equal it otherwise (``state.fold_aliases``); the non-persistent
    ``position_ids`` buffers are accepted and skipped; any other key that does not map is an error.
    """
    own = model.state_dict(keep_vars=True)
    unique_names, aliases = dedupe_aliases(own)
    unique = set(unique_names)
    state = fold_aliases(state, aliases, source)
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


def check_missing(model: torch.nn.Module, loaded: set[str], source: str, allow_missing: tuple[str, ...],
                  note: str = "") -> None:
    """Raise naming the components (and a few keys) that no checkpoint provided (``note`` precedes the advice)."""
    missing = [k for k in unique_state(model) if k not in loaded]
    missing = [k for k in missing if k.split(".", 1)[0] not in allow_missing]
    if missing:
        parts = sorted({k.split(".", 1)[0] for k in missing})
        raise ValueError(
            f"{source}: {len(missing)} backbone weights missing from the checkpoint (components "
            f"{parts}, e.g. {missing[:6]}); {note}pass decoder_from=<captioning/VQA checkpoint> for the "
            f"decoder or allow_missing={tuple(parts)} to keep them randomly initialised"
        )


def set_tied(model: "BlipBackbone", tie_decoder: bool | None) -> "BlipBackbone":
    """Tie (True), untie (False) or keep (None) the loaded model's decoder layout."""
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
