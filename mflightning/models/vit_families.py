"""Vision transformers nobody here wrote: modality presets, recognition, calibration adapters, features.

Importing this module registers three presets, each with one group ``vision`` (an image group: its
statistics are never PAD-filtered) and its classifier / pooler heads dense; `recognise(model)`
(registered, lazily, by the package's `__init__`) finds them from the model's classes, so
`prune(model, calibration=images)` needs neither a preset name nor a forward.

| preset | classes | vision group | dense |
|---|---|---|---|
| ``vit`` | transformers ViTModel / ViTForImageClassification (DINO, plain ViT), DeiT*, Dinov2Model / Dinov2ForImageClassification | encoder layers | classifier(s), pooler, patch embedding |
| ``timm_vit`` | timm VisionTransformer (and subclasses) | ``blocks.N`` | head, head_dist, attn_pool (MAP head), patch embedding |
| ``torchvision_vit`` | torchvision VisionTransformer | ``encoder.layers`` (nn.MultiheadAttention + MLP) | heads, conv stem |

Every preset also keeps a layer named ``head`` dense (`ImageClassificationModule`'s fresh classifier).
Classes are matched by name in the class's MRO and by the library it comes from, so nothing here
imports transformers, timm or torchvision. A model is recognised only when every prunable layer it
holds lies inside the vision model found or is one of the preset's dense heads: a ViT inside a
larger model (XVLM's timm layout, a VL wrapper) is not taken for a vision-only model.

Adapters: calibration batches may be an image tensor ``(B, 3, H, W)``, a dict with ``pixel_values``
or ``image``, or an ``(images, labels)`` pair (torchvision's ImageFolder); labels and other keys are
ignored. transformers' ViT/DeiT get ``interpolate_pos_encoding=True`` when the images' size is not
the config's (Dinov2 always interpolates). No token mask: every image token counts.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from mflightning.models.hf_families import single_preset
from mflightning.pruning.presets import CalibrationAdapter, register_preset

_ANY = r"(^|\.)"  # the vision model may sit anywhere in a wrapper (``backbone.``, ``model.``)
# `ImageClassificationModule`'s classifier is ``head``: dense under every preset.
_TASK_HEAD = _ANY + r"head\."


@dataclass(frozen=True)
class VisionFamily:
    """A vision-transformer family: its preset, the library and class names that belong to it, and how to run it."""

    preset: str
    library: str  # module prefix of the classes ("transformers.", "timm.", "torchvision.")
    classes: tuple[str, ...]
    run: Callable[[nn.Module, Tensor], Any]  # the whole model on images (calibration)
    features: Callable[[nn.Module, Tensor], Tensor]  # (B, D) image features of the bare encoder
    feature_dim: Callable[[nn.Module], int]
    encoder: Callable[[nn.Module], nn.Module]  # the bare encoder (without the family's own classifier)


# ----------------------------------------------------------------------------------- transformers


def _hf_kwargs(module: nn.Module, images: Tensor) -> dict[str, Any]:
    """``interpolate_pos_encoding=True`` for ViT/DeiT when the images are not the config's size."""
    size = getattr(module.config, "image_size", None)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    takes = "interpolate_pos_encoding" in inspect.signature(module.forward).parameters
    return {"interpolate_pos_encoding": True} if takes and tuple(images.shape[-2:]) != size else {}


def _hf_encoder(module: nn.Module) -> nn.Module:
    """ViTModel / Dinov2Model / DeiTModel itself, or the one inside a *ForImageClassification."""
    for name in ("vit", "dinov2", "deit"):
        inner = getattr(module, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return module


def _hf_features(module: nn.Module, images: Tensor) -> Tensor:
    """The final-LayerNorm'd CLS token, what ViTForImageClassification's classifier reads."""
    encoder = _hf_encoder(module)
    return encoder(pixel_values=images, **_hf_kwargs(encoder, images)).last_hidden_state[:, 0]


def _hf_run(module: nn.Module, images: Tensor) -> Any:
    return module(pixel_values=images, **_hf_kwargs(module, images))


# ------------------------------------------------------------------------------------------- timm


def _timm_features(module: nn.Module, images: Tensor) -> Tensor:
    """timm's pooled pre-logits features (its ``global_pool``: CLS token, mean or MAP head)."""
    return module.forward_head(module.forward_features(images), pre_logits=True)


def _timm_dim(module: nn.Module) -> int:
    return int(getattr(module, "head_hidden_size", None) or module.num_features)


# ------------------------------------------------------------------------------------ torchvision


def _torchvision_features(module: nn.Module, images: Tensor) -> Tensor:
    """The encoder's CLS token (torchvision's forward up to its ``heads``)."""
    tokens = module._process_input(images)
    cls = module.class_token.expand(tokens.shape[0], -1, -1)
    return module.encoder(torch.cat([cls, tokens], dim=1))[:, 0]


def _call(module: nn.Module, images: Tensor) -> Any:
    return module(images)


FAMILIES: dict[str, VisionFamily] = {
    "vit": VisionFamily(
        "vit", "transformers.",
        ("ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification",
         "DeiTForImageClassificationWithTeacher", "Dinov2Model", "Dinov2ForImageClassification"),
        _hf_run, _hf_features, lambda m: int(m.config.hidden_size), _hf_encoder,
    ),
    "timm_vit": VisionFamily(
        "timm_vit", "timm.", ("VisionTransformer",), _call, _timm_features, _timm_dim, lambda m: m,
    ),
    "torchvision_vit": VisionFamily(
        "torchvision_vit", "torchvision.", ("VisionTransformer",), _call, _torchvision_features,
        lambda m: int(m.hidden_dim), lambda m: m,
    ),
}

GROUPS = {
    "vit": {"vision": _ANY + r"(encoder\.)?layers?\.\d+\."},
    "timm_vit": {"vision": _ANY + r"blocks\.\d+\."},
    "torchvision_vit": {"vision": _ANY + r"encoder\.layers\."},
}
HEADS = {
    "vit": (_ANY + r"(classifier|cls_classifier|distillation_classifier|pooler)\.", _TASK_HEAD),
    "timm_vit": (_ANY + r"(head|head_dist|attn_pool)\.",),
    "torchvision_vit": (_ANY + r"heads?\.",),
}
# The parts of an encoder its `features` never run (frozen by `load_vision_backbone`).
UNUSED_BY_FEATURES = {
    "vit": r"^(pooler\.|embeddings\.mask_token$)",  # the mask token: masked-image pretraining only
    "timm_vit": r"^(head|head_dist)\.",
    "torchvision_vit": r"^heads\.",
}


def family_of(module: nn.Module) -> VisionFamily | None:
    """The vision family of `module` itself (its class or a base class, from the family's library), or None."""
    for cls in type(module).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ in family.classes and cls.__module__.startswith(family.library):
                return family
    return None


def find_vision_models(model: nn.Module) -> list[tuple[str, nn.Module, VisionFamily]]:
    """Every outermost vision transformer of a known family inside `model`: (name prefix, module, family)."""
    found: list[tuple[str, nn.Module, VisionFamily]] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if any(prefix.startswith(outer) for outer, _, _ in found):
            continue
        family = family_of(module)
        if family is not None:
            found.append((prefix, module, family))
    return found


def _outside(model: nn.Module, found: list[tuple[str, nn.Module, VisionFamily]], preset: str) -> list[str]:
    """Prunable layers of `model` neither inside a found vision model nor one of the preset's dense heads."""
    heads = [re.compile(p) for p in HEADS[preset]]
    return [
        name for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.MultiheadAttention))
        and not any(f"{name}.".startswith(prefix) for prefix, _, _ in found)
        and not any(h.search(f"{name}.") for h in heads)
    ]


def recognise(model: nn.Module) -> str | None:
    """The preset of the vision transformer `model` is or holds; None when it holds none, or when prunable
    layers outside it (other than dense heads) say it is part of a larger model. Two families: an error."""
    found = find_vision_models(model)
    preset = single_preset(found, "vision transformers")
    if preset is None or _outside(model, found, preset):
        return None
    return preset


def images_of(batch: Any) -> Tensor:
    """The image tensor of a calibration batch: the batch itself, ``pixel_values`` / ``image`` of a dict,
    or the first item of an ``(images, labels)`` pair."""
    if isinstance(batch, Mapping):
        for key in ("pixel_values", "image"):
            if batch.get(key) is not None:
                images = batch[key]
                break
        else:
            raise KeyError(f"an image batch needs 'pixel_values' or 'image'; batch keys: {sorted(batch)}")
    elif isinstance(batch, (tuple, list)) and batch:
        images = batch[0]
    else:
        images = batch
    if not isinstance(images, Tensor) or images.ndim != 4:
        what = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected images as a (B, C, H, W) tensor, got {what}")
    return images


def _adapter(preset: str) -> Callable[[nn.Module], CalibrationAdapter]:
    def build(model: nn.Module) -> CalibrationAdapter:
        members = [(p, m, f) for p, m, f in find_vision_models(model) if f.preset == preset]
        if not members:
            raise ValueError(
                f"preset {preset!r}: the model ({type(model).__name__}) holds no {FAMILIES[preset].library.rstrip('.')} "
                f"{list(FAMILIES[preset].classes)}, so its calibration adapter cannot run it; pass forward="
            )

        def forward(_: nn.Module, batch: Any) -> list[Any]:
            images = images_of(batch)
            return [family.run(module, images) for _, module, family in members]

        where = ", ".join(f"{prefix}{type(m).__name__}" for prefix, m, _ in members)
        forward.__qualname__ = forward.__name__ = f"{preset} adapter: {where}(images)"
        return CalibrationAdapter(forward, lambda batch: None, f"{preset}: {where}")

    return build


_DESCRIPTIONS = {
    "vit": "transformers ViT / DeiT / Dinov2 (bare or *ForImageClassification): vision = encoder layers (image "
    "tokens, never filtered); classifier(s), pooler and a task `head` dense",
    "timm_vit": "timm VisionTransformer: vision = blocks (image tokens, never filtered); head, head_dist, attn_pool "
    "(MAP head) and a task `head` dense",
    "torchvision_vit": "torchvision VisionTransformer: vision = encoder layers (nn.MultiheadAttention + MLP, image "
    "tokens); heads and a task `head` dense",
}
for _name in FAMILIES:
    register_preset(
        _name, groups=GROUPS[_name], exclude=HEADS[_name], image_groups=("vision",), adapter=_adapter(_name),
        description=_DESCRIPTIONS[_name],
    )


# ------------------------------------------------------------------------------------ backbones

BUILDERS = ("vit", "dinov2", "timm", "torchvision")


def _from_config(spec: Mapping[str, Any]) -> nn.Module:
    """A randomly initialised encoder from ``{"family": vit|dinov2|timm|torchvision, **its config}`` (tests, benchmarks)."""
    kwargs = dict(spec)
    family = kwargs.pop("family", None)
    if family == "vit":
        from transformers import ViTConfig, ViTModel

        return ViTModel(ViTConfig(**kwargs), add_pooling_layer=False)
    if family == "dinov2":
        from transformers import Dinov2Config, Dinov2Model

        return Dinov2Model(Dinov2Config(**kwargs))
    if family == "timm":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(**{"num_classes": 0, **kwargs})
    if family == "torchvision":
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(**kwargs)
    raise ValueError(f"backbone config: 'family' must be one of {list(BUILDERS)}, got {family!r}")


def _from_name(name: str) -> nn.Module:
    """``timm:<name>`` (timm.create_model, pretrained, no classifier), ``torchvision:<name>`` (default weights), else a
    transformers hub name or local directory (AutoModel; ViT/DeiT without their pooler)."""
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[len("timm:"):], pretrained=True, num_classes=0)
    if name.startswith("torchvision:"):
        from torchvision.models import get_model

        return get_model(name[len("torchvision:"):], weights="DEFAULT")
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(name)
    options = {"add_pooling_layer": False} if config.model_type in ("vit", "deit") else {}
    return AutoModel.from_pretrained(name, **options)


def load_vision_backbone(spec: Any) -> tuple[nn.Module, VisionFamily]:
    """(encoder, family) from a model instance, a name (`_from_name`) or a config dict (`_from_config`).

    A transformers *ForImageClassification gives its encoder (its classifier is left out). The encoder's own
    classifier, pooler or MAP head (timm's ``head``, torchvision's ``heads``, ViTModel's ``pooler``) is frozen:
    image features are read before them, so they get no gradient (plain DDP needs every trainable one used).
    """
    if isinstance(spec, str):
        module = _from_name(spec)
    elif isinstance(spec, Mapping):
        module = _from_config(spec)
    elif isinstance(spec, nn.Module):
        module = spec
    else:
        raise TypeError(f"backbone must be a model, a name or a config dict, got {type(spec).__name__}")
    family = family_of(module)
    if family is None:
        supported = {f.library.rstrip("."): list(f.classes) for f in FAMILIES.values()}
        raise TypeError(f"backbone {type(module).__module__}.{type(module).__name__} is not a supported vision "
                        f"transformer; supported: {supported}")
    encoder = family.encoder(module)
    unused = re.compile(UNUSED_BY_FEATURES[family.preset])
    for name, param in encoder.named_parameters():
        if unused.search(name):
            param.requires_grad_(False)
    return encoder, family
