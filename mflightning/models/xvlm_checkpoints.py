"""Reading and writing ``XVLMBackbone`` checkpoints: a ``save_pretrained`` directory (``config.json`` +
``model.safetensors``) or a bare state-dict file (safetensors or torch, as the XVLM authors ship them).

Kept apart from ``xvlm.py`` so the backbone module holds the architecture and the interface only;
``XVLMBackbone.save_pretrained`` / ``from_pretrained`` / ``load_state_dict_file`` call these functions.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from mflightning.models.state import dedupe_aliases
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
    config.update(architecture=ARCHITECTURE, vision_pretrained=False, vision_checkpoint=None)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    aliases = tied_aliases(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in aliases}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def load_backbone(cls: type["XVLMBackbone"], path: str | os.PathLike,
                  config: XVLMConfig | Mapping[str, Any] | None, strict: bool) -> "XVLMBackbone":
    """``XVLMBackbone.from_pretrained`` (documented there): a directory or a state-dict file."""
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} in the directory" if path.is_dir()
                                else f"XVLM checkpoint {str(path)!r} does not exist")
    if config is None:
        config_file = weights.parent / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{weights}: no config given and no {CONFIG_NAME} beside it")
        raw = json.loads(config_file.read_text())
        if raw.pop("architecture", ARCHITECTURE) != ARCHITECTURE:
            raise ValueError(f"{config_file}: not an {ARCHITECTURE} config")
        config = raw
    config = as_xvlm_config(config)
    config.vision_pretrained, config.vision_checkpoint = False, None
    state = read_state_dict(weights)
    config.decoder = config.decoder or any(k.startswith("text_decoder.") for k in state)
    model = cls(config)
    load_state(model, state, strict=strict, source=str(weights))
    return model


def load_state(model: torch.nn.Module, path: str | os.PathLike | Mapping[str, torch.Tensor], strict: bool = True,
               source: str | None = None) -> dict[str, list[str]]:
    """``XVLMBackbone.load_state_dict_file`` (documented there): copy a state dict into ``model``."""
    state = read_state_dict(path) if not isinstance(path, Mapping) else dict(path)
    source = source or (str(path) if not isinstance(path, Mapping) else "state dict")
    if state and all(k.startswith("backbone.") for k in state):  # a task module's checkpoint
        state = {k[len("backbone."):]: v for k, v in state.items()}
    own = model.state_dict(keep_vars=True)
    aliases = tied_aliases(model)
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and k not in aliases)
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    untied = [k for k in state if k in aliases and aliases[k] in state
              and state[k].shape == state[aliases[k]].shape and not torch.equal(state[k], state[aliases[k]])]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {mismatched[:10]}")
    if untied:
        problems.append(f"tied weights differ from their source: {untied}")
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
