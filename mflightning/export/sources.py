"""What an export reads: the tensors of a module, a state dict or a checkpoint file, and their masks by name.

Tied tensors (one storage under several names: a tied LM head, a decoder sharing the encoder's
layers) are kept once, under the first name, and the other names are recorded as aliases, the
way `save_pretrained` stores them; masks given under an alias name are moved to that first name.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from ..models.state import dedupe_aliases  # noqa: F401  (re-exported for the export package)
from ..pruning.result import PruningResult, _add_inherited, _match_names

MaskSource = Union[PruningResult, Mapping[str, Tensor], str, os.PathLike, None]
ModelSource = Union[nn.Module, Mapping[str, Tensor], str, os.PathLike]


@dataclass
class Source:
    """The tensors to export (each stored once), their aliases, the masks by tensor name, and provenance."""

    state: dict[str, Tensor]
    masks: dict[str, Tensor]
    aliases: dict[str, str] = field(default_factory=dict)  # alias name -> the name it is stored under
    description: str = "the model"
    model_config: dict[str, Any] | None = None
    mask_info: dict[str, Any] = field(default_factory=dict)


def read_source(
    source: ModelSource,
    masks: MaskSource,
    *,
    prefix: str | None = None,
    partial: bool = False,
    weights_only: bool = True,
) -> Source:
    """Tensors and masks of `source`, with masks matched to the tensor names (shapes checked).

    `source` is an nn.Module (a task LightningModule, a backbone...), a state dict, a
    `save_pretrained` folder (`model.safetensors`, its `config.json` kept as the model config), or a
    file: a Lightning checkpoint or torch file holding a `state_dict` (or being one), or a
    safetensors file. `masks` is a PruningResult, a mask file, a name -> bool mask mapping (True = kept), or
    None for a Lightning checkpoint whose MultiFlowCallback state holds the masks. `prefix` and
    `partial` are those of `PruningResult.masks_for`; the coverage check (`partial=False`) needs a
    module, so it applies to module sources only.
    """
    checkpoint_masks: dict[str, Tensor] | None = None
    model_config = None
    if isinstance(source, nn.Module):
        description = f"module {type(source).__name__}"
        state = dict(source.state_dict())
        model_config = _model_config(source)
    elif isinstance(source, Mapping):
        description = "the state dict"
        state = dict(source)
    elif isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        description = f"folder {str(source)!r}"
        state, model_config = read_pretrained_dir(Path(source))
    elif isinstance(source, (str, os.PathLike)):
        description = f"file {str(source)!r}"
        state, checkpoint_masks = read_state_file(Path(source), weights_only=weights_only)
    else:
        raise TypeError(
            f"cannot export a {type(source).__name__}: pass an nn.Module, a state dict or a checkpoint path"
        )
    _check_tensors(state, description)
    unique, aliases = dedupe_aliases(state)
    resolved, info = _resolve_masks(source, masks, checkpoint_masks, state, prefix, partial, description)
    by_storage = _move_to_stored_names(resolved, aliases, description)
    for name, mask in by_storage.items():
        shape = tuple(unique[name].shape)
        if tuple(mask.shape) != shape:
            raise ValueError(f"{description}: the mask of {name!r} has shape {tuple(mask.shape)}, the tensor {shape}")
    return Source(
        state={n: t.detach() for n, t in unique.items()},
        masks=by_storage,
        aliases=aliases,
        description=description,
        model_config=model_config,
        mask_info=info,
    )


def read_pretrained_dir(directory: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """The tensors of a `save_pretrained` folder's `model.safetensors`, and its `config.json` (None when absent)."""
    import json

    from safetensors.torch import load_file

    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"folder {str(directory)!r} has no model.safetensors (a save_pretrained folder has one)"
        )
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else None
    if isinstance(config, dict) and "quantization_config" in config:
        raise ValueError(
            f"{str(directory)!r} is already a compressed export (its config.json has a quantization_config)"
        )
    return dict(load_file(str(weights))), config


def read_state_file(path: Path, *, weights_only: bool = True) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """The state dict of a checkpoint file, and the masks of its MultiFlowCallback state (None when it has none)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path))), None
    try:
        content = torch.load(str(path), map_location="cpu", weights_only=weights_only)
    except Exception as err:  # an unpickling refusal, or not a torch file at all
        hint = " (weights_only=False loads any pickle: only for a file you trust)" if weights_only else ""
        raise ValueError(f"{str(path)!r} is not a readable torch checkpoint: {err}{hint}") from err
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        return dict(content["state_dict"]), checkpoint_callback_masks(content, str(path))
    if isinstance(content, Mapping) and content and all(isinstance(v, Tensor) for v in content.values()):
        return dict(content), None
    raise ValueError(f"{str(path)!r} holds neither a `state_dict` (a Lightning checkpoint) nor a plain state dict")


def checkpoint_callback_masks(checkpoint: Mapping[str, Any], where: str) -> dict[str, Tensor] | None:
    """The masks a MultiFlowCallback saved in a Lightning checkpoint (bit-packed or bool), or None."""
    from ..pruning.upkeep import unpack_mask

    states = {
        key: state for key, state in (checkpoint.get("callbacks") or {}).items()
        if isinstance(state, Mapping) and (state.get("packed_masks") or state.get("masks"))
    }
    if not states:
        return None
    if len(states) > 1:
        raise ValueError(f"{where} holds masks of {len(states)} callbacks ({sorted(states)}): pass masks= to choose")
    state = next(iter(states.values()))
    if state.get("packed_masks"):
        shapes = state["mask_shapes"]
        return {name: unpack_mask(packed, shapes[name]) for name, packed in state["packed_masks"].items()}
    return {name: torch.as_tensor(mask).bool() for name, mask in state["masks"].items()}


def _resolve_masks(
    source: ModelSource,
    masks: MaskSource,
    checkpoint_masks: dict[str, Tensor] | None,
    state: Mapping[str, Tensor],
    prefix: str | None,
    partial: bool,
    description: str,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The masks keyed by `state`'s names, and what to record about them (method, sparsity, file)."""
    if masks is None:
        if checkpoint_masks is None:
            raise ValueError(
                f"no masks for {description}: pass masks= (a PruningResult, a mask file, or a name -> bool mask "
                "dict); only a Lightning checkpoint with MultiFlowCallback state carries its own"
            )
        return _match(checkpoint_masks, state, prefix, None, description), {"from": "checkpoint callback state"}
    if isinstance(masks, (str, os.PathLike)):
        masks = PruningResult.load(masks)
    if isinstance(masks, PruningResult):
        info = {"from": masks.source or "PruningResult", "method": masks.method,
                "target_sparsity": masks.target_sparsity, "preset": masks.preset}
        if isinstance(source, nn.Module):
            return dict(masks.masks_for(source, prefix=prefix, partial=partial)), info
        return _match(masks.masks, state, prefix, masks.preset, masks._where()), info
    if isinstance(masks, Mapping):
        plain = {name: torch.as_tensor(mask).bool() for name, mask in masks.items()}
        return _match(plain, state, prefix, None, "the masks"), {"from": "mask dict"}
    raise TypeError(
        f"masks must be a PruningResult, a mask file, a name -> mask dict or None, not {type(masks).__name__}"
    )


def _match(
    masks: Mapping[str, Tensor], state: Mapping[str, Tensor], prefix: str | None, preset: str | None, where: str
) -> dict[str, Tensor]:
    """Masks renamed to `state`'s names (exact, or under the one common prefix that fits), plus inherited ones."""
    strip, add = _match_names(list(masks), state, prefix, where)
    resolved = {add + name[len(strip):]: mask.detach().to("cpu", torch.bool) for name, mask in masks.items()}
    if preset:
        _add_inherited(preset, state, resolved)
    return resolved


def _move_to_stored_names(masks: Mapping[str, Tensor], aliases: Mapping[str, str], description: str
                          ) -> dict[str, Tensor]:
    """Masks keyed by the name each tensor is stored under; two different masks for one tensor are an error."""
    out: dict[str, Tensor] = {}
    for name, mask in masks.items():
        stored = aliases.get(name, name)
        mask = mask.detach().to("cpu", torch.bool)
        if stored in out and not torch.equal(out[stored], mask):
            raise ValueError(f"{description}: {name!r} and {stored!r} are one tensor but their masks differ")
        out[stored] = mask
    return out


def _check_tensors(state: Mapping[str, Any], description: str) -> None:
    """Raise naming the first entry that is not a tensor (safetensors stores tensors only)."""
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{description}: state entry {name!r} is a {type(value).__name__}, not a tensor")
        if value.is_meta:
            raise ValueError(f"{description}: tensor {name!r} is on the meta device (no data): load the weights first")


def _model_config(module: nn.Module) -> dict[str, Any] | None:
    """The module's Hugging Face-style config as a dict (`module.config.to_dict()`), when it has one."""
    to_dict = getattr(getattr(module, "config", None), "to_dict", None)
    if not callable(to_dict):
        return None
    try:
        config = to_dict()
    except Exception:  # an object that merely has the attribute: no config to record
        return None
    return config if isinstance(config, dict) else None
