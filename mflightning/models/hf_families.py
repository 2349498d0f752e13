"""transformers' vision-language classes: modality presets, recognition and calibration adapters.

Importing this module registers four presets; `recognise(model)` (registered, lazily, by the package's
`__init__`) finds them from the model's classes, so `prune(model, modalities=None)` and
`MultiFlowCallback(modalities=None)` need neither a preset name nor a forward. Nothing here imports
transformers: families are matched by class name (the classes' own and their bases'), so a model
nested in a wrapper (a LightningModule holding it as `self.model`) is found too, and the presets'
regexes accept any name prefix (``(^|\\.)``).

| preset | classes | groups (image groups: never PAD-filtered) | dense |
|---|---|---|---|
| ``clip`` | CLIPModel | vision*, text | visual_projection, text_projection, logit_scale, embeddings |
| ``siglip`` | SiglipModel | vision*, text | vision_model.head (MAP head), text_model.head, logit scale/bias, embeddings |
| ``blip2`` | Blip2ForConditionalGeneration, Blip2Model | vision*, qformer*, language | query_tokens, language_projection, LM head, embeddings; Q-Former text FFN (never run) |
| ``llava`` | LlavaForConditionalGeneration, LlavaModel | vision*, projector*, language | LM head, embeddings; vision layers after `vision_feature_layer`, the vision tower's head |

Decisions (the paper keeps "heads" dense: the projections into a shared space, ITM/LM heads):
- CLIP / SigLIP projections and SigLIP's two heads are the models' embedding heads: the vision MAP head
  (attention pooling with a learned probe + MLP) and the text head are the last maps into the
  contrastive space, the counterparts of CLIP's projections and BLIP's ``vision_proj``/``text_proj``,
  so they stay dense. (To prune the MAP head anyway, pass a regex map with ``image_groups``.)
- BLIP-2's ``language_projection`` (one Linear, Q-Former width -> LM width, ~0.1% of the weights) is
  the only path from the image into the LM, like BLIP's projection heads: dense. LLaVA's
  ``multi_modal_projector`` (a two-layer MLP at full LM width) is its own group ``projector``; its
  inputs are image tokens, so it is an image group.
- The Q-Former's self-attention runs over the query tokens only and its cross-attention key/value
  read image tokens: none of it is text, so ``qformer`` is an image group (never PAD-filtered). Its
  text FFN (``intermediate``/``output``, present with ``use_qformer_text_input``) never runs in the
  generation forward: dense.
- LLaVA reads the vision tower's hidden state ``vision_feature_layer`` (default -2). transformers
  5.x runs every layer anyway, so the later layers get real statistics, but their output is thrown
  away: pruning them would spend the vision group's budget (Eq. 7) on weights that change nothing.
  They stay dense (``exclude_for``, per model instance; they are listed in the report's dense
  layers), as does any head of the vision tower (SigLIP's MAP head) for the same reason.
- Language models: every position the attention mask marks real is counted, the image-placeholder
  positions included (the processors put the image tokens in ``input_ids`` with mask 1, and the
  models scatter the image features there, so the LM's sequence is exactly ``attention_mask``'s
  length); padding (mask 0) is left out. A LM-head Linear tied to the word embeddings is dense as
  an embedding; an untied one (Llama's ``lm_head``) is excluded by name.

Adapters (`CalibrationAdapter`, built per model instance): the forward passes only the processor's
keys (``pixel_values``, ``input_ids``, ``attention_mask``, plus LLaVA's ``image_sizes`` when present)
to every matched transformers model in the module (two copies, e.g. a teacher and a student, both run), with ``use_cache=False`` and, for the LMs, ``logits_to_keep=1`` (the
LM head is dense; no (B, L, vocab) logits). Other batch keys (labels, indices) are not passed. A key
the family needs that the batch lacks, or a BLIP-2 batch whose ``input_ids`` do not hold
``num_query_tokens`` image tokens per sample, is an error naming it. The token mask is
``batch["attention_mask"]`` (None when the batch has none, e.g. SigLIP's processor, whose model then
attends every position: nothing is filtered), checked to have ``input_ids``' shape.

`prune()` uses the adapter when no `forward=` is given; `MultiFlowCallback` too, when the
LightningModule has no `calibration_step` and no `forward=` is given (a module holding a CLIP as
`self.model` needs no forward of its own for calibration).

OPT (BLIP-2's usual LM) flattens the tokens to (B*L, D) before ``fc1``/``fc2``; the engine drops
padding from such batch-major flattened inputs too, so their statistics are exact.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn

from mflightning.pruning.presets import CalibrationAdapter, register_preset

_ANY = r"(^|\.)"  # the transformers model may sit anywhere in a wrapper (``model.``, ``student.``)


@dataclass(frozen=True)
class Family:
    """A transformers family: its preset, the classes that belong to it, the batch keys its forward takes."""

    preset: str
    classes: tuple[str, ...]
    required: tuple[str, ...]
    optional: tuple[str, ...]
    language_model: bool  # use_cache=False, and logits_to_keep=1 where it has an LM head (dense: no vocab logits)
    check: Callable[[nn.Module, Mapping[str, Any]], None] | None = None


def _check_blip2(module: nn.Module, batch: Mapping[str, Any]) -> None:
    """BLIP-2 scatters the query outputs onto the image tokens of `input_ids`: exactly `num_query_tokens` per sample."""
    config = module.config
    if not getattr(config, "use_decoder_only_language_model", True):
        raise NotImplementedError(
            f"{type(module).__name__} with an encoder-decoder language model ({type(module.language_model).__name__}): "
            "its decoder runs on another sequence than `attention_mask`, which this adapter does not build; "
            "pass forward= and token_mask= for it"
        )
    token, count = getattr(config, "image_token_index", None), config.num_query_tokens
    if token is None:
        raise ValueError(
            f"{type(module).__name__}: config.image_token_index is None, so the query outputs cannot be placed in "
            f"the language model's input; set it to the processor's image token id (input_ids must hold {count} "
            "such tokens per sample, as Blip2Processor writes them)"
        )
    found = (batch["input_ids"] == token).sum(dim=1)
    if not bool((found == count).all()):
        raise ValueError(
            f"{type(module).__name__}: every sample's input_ids must hold num_query_tokens={count} image tokens "
            f"(id {token}), as Blip2Processor(images=..., text=...) writes them; got {found.tolist()} per sample "
            "(without them the language model never sees the image)"
        )


FAMILIES: dict[str, Family] = {
    "clip": Family("clip", ("CLIPModel",), ("pixel_values", "input_ids"), ("attention_mask",), False),
    "siglip": Family("siglip", ("SiglipModel",), ("pixel_values", "input_ids"), ("attention_mask",), False),
    "blip2": Family(
        "blip2", ("Blip2ForConditionalGeneration", "Blip2Model"), ("pixel_values", "input_ids"),
        ("attention_mask",), True, _check_blip2,
    ),
    "llava": Family(
        "llava",
        ("LlavaForConditionalGeneration", "LlavaModel"),
        ("pixel_values", "input_ids"), ("attention_mask", "image_sizes"), True,
    ),
}
_CLASS_TO_FAMILY = {cls: family for family in FAMILIES.values() for cls in family.classes}


def family_of(module: nn.Module) -> Family | None:
    """The family of `module` itself (its class or a base class of transformers' with a known name), or None."""
    for cls in type(module).__mro__:
        family = _CLASS_TO_FAMILY.get(cls.__name__)
        if family is not None and cls.__module__.startswith("transformers."):
            return family
    return None


def find_family_models(model: nn.Module) -> list[tuple[str, nn.Module, Family]]:
    """Every outermost transformers model of a known family inside `model`: (name prefix, module, family).

    A family model nested in another (LLaVA's LlavaModel inside LlavaForConditionalGeneration) is
    not listed again.
    """
    found: list[tuple[str, nn.Module, Family]] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if any(prefix.startswith(outer) for outer, _, _ in found):  # inside a model already found
            continue
        family = family_of(module)
        if family is not None:
            found.append((prefix, module, family))
    return found


def recognise(model: nn.Module) -> str | None:
    """The preset of the transformers family `model` is or holds; None when it holds none.

    Two different families in one model (a CLIP teacher and a BLIP-2 student) are an error: pass
    `modalities=` yourself.
    """
    return single_preset(find_family_models(model), "transformers models")


def single_preset(found: list[tuple[str, nn.Module, Any]], what: str) -> str | None:
    """The one preset of the `(prefix, module, family)` models found in a model, None when there are none;
    models of several families are an error naming where each sits (the user must pass `modalities=`)."""
    presets = list(dict.fromkeys(family.preset for _, _, family in found))
    if len(presets) > 1:
        where = ", ".join(f"{prefix or '<root>'} ({type(m).__name__})" for prefix, m, _ in found)
        raise ValueError(
            f"the model holds {what} of several families ({where}): presets {presets}; "
            "pass modalities= (a preset name or a map group -> regex) to say how to group its layers"
        )
    return presets[0] if presets else None


# ---------------------------------------------------------------------------------------- adapters


def _inputs(family: Family, module: nn.Module, batch: Any) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"the {family.preset} calibration adapter expects a processor's dict batch (pixel_values, input_ids, "
            f"attention_mask), got {type(batch).__name__}; pass forward= for other batches"
        )
    missing = [key for key in family.required if key not in batch]
    if missing:
        raise KeyError(
            f"the {family.preset} calibration adapter ({type(module).__name__}) needs batch keys {list(family.required)}; "
            f"missing {missing} (batch keys: {sorted(batch)})"
        )
    inputs = {key: batch[key] for key in (*family.required, *family.optional) if batch.get(key) is not None}
    if family.check is not None:
        family.check(module, inputs)
    if family.language_model:
        inputs["use_cache"] = False
        if hasattr(module, "lm_head") or hasattr(getattr(module, "language_model", None), "lm_head"):
            inputs["logits_to_keep"] = 1  # the LM head is dense: no (B, L, vocab) logits
    return inputs


def _token_mask(batch: Any) -> Tensor | None:
    """`batch["attention_mask"]`, which must have `input_ids`' shape (the LM sequence is the tokenised one)."""
    if not isinstance(batch, Mapping) or batch.get("attention_mask") is None:
        return None
    mask, ids = batch["attention_mask"], batch.get("input_ids")
    if isinstance(ids, Tensor) and tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"attention_mask {tuple(mask.shape)} and input_ids {tuple(ids.shape)} differ in shape: the token mask "
            "must mark every position of the text / language-model sequence (image tokens included)"
        )
    return mask


def _adapter(preset: str) -> Callable[[nn.Module], CalibrationAdapter]:
    def build(model: nn.Module) -> CalibrationAdapter:
        members = [(prefix, module, family) for prefix, module, family in find_family_models(model)
                   if family.preset == preset]
        if not members:
            raise ValueError(
                f"preset {preset!r}: the model ({type(model).__name__}) holds none of "
                f"{list(FAMILIES[preset].classes)}, so its calibration adapter cannot run it; pass forward="
            )

        def forward(_: nn.Module, batch: Any) -> list[Any]:
            return [module(**_inputs(family, module, batch)) for _, module, family in members]

        where = ", ".join(f"{prefix or ''}{type(m).__name__}" for prefix, m, _ in members)
        forward.__qualname__ = forward.__name__ = f"{preset} adapter: {where}(pixel_values, input_ids, attention_mask)"
        return CalibrationAdapter(forward, _token_mask, f"{preset}: {where}")

    return build


# ------------------------------------------------------------------------------- unused layers


def _layer_list(tower: nn.Module, count: int) -> tuple[str, nn.ModuleList] | None:
    """The vision tower's list of `count` encoder layers: (name, list)."""
    for name, module in tower.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and re.search(r"(^|\.)layers?$", name):
            return name, module
    return None


def llava_unused_vision(model: nn.Module) -> list[str]:
    """Regexes for each LLaVA's vision layers after the hidden state it reads, and its vision tower's head(s).

    Hidden state k is the output of layer k-1 (0: the embeddings); negative k counts from the end.
    Prunable layers of the tower outside its encoder layers (SigLIP's MAP head) feed nothing LLaVA uses.
    """
    patterns: list[str] = []
    for prefix, module, family in find_family_models(model):
        if family.preset != "llava":
            continue
        inner = getattr(module, "model", module)
        tower = inner.vision_tower
        tower_prefix = prefix + ("model." if inner is not module else "") + "vision_tower."
        config = module.config
        count = config.vision_config.num_hidden_layers
        found = _layer_list(tower, count)
        if found is None:
            raise ValueError(
                f"{prefix or ''}{type(module).__name__}: cannot find the vision tower's {count} encoder layers "
                f"({type(tower).__name__}) to keep those after vision_feature_layer dense; pass modalities= and exclude="
            )
        list_name, _ = found
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        used = max(k if k >= 0 else k + count + 1 for k in layers)  # hidden states 0..used are needed
        unused = list(range(used, count))
        if unused:
            patterns.append(
                "^" + re.escape(tower_prefix + list_name) + r"\.(" + "|".join(map(str, unused)) + r")\."
            )
        patterns.extend(
            "^" + re.escape(tower_prefix + name) + r"\."
            for name, sub in tower.named_modules()
            if isinstance(sub, (nn.Linear, nn.MultiheadAttention)) and not name.startswith(list_name + ".")
        )
    return patterns


# ------------------------------------------------------------------------------------- presets

CLIP_GROUPS = {"vision": _ANY + r"vision_model\.", "text": _ANY + r"text_model\."}
register_preset(
    "clip",
    groups=CLIP_GROUPS,
    exclude=(_ANY + r"(visual_projection|text_projection)\.",),
    image_groups=("vision",),
    adapter=_adapter("clip"),
    description="transformers CLIPModel: vision = vision_model, text = text_model (PAD-filtered); "
    "visual/text projections dense",
)
register_preset(
    "siglip",
    groups=CLIP_GROUPS,
    exclude=(_ANY + r"(vision_model|text_model)\.head\.",),
    image_groups=("vision",),
    adapter=_adapter("siglip"),
    description="transformers SiglipModel: vision = vision_model, text = text_model (PAD-filtered where the "
    "batch has an attention_mask); the vision MAP head and the text head dense",
)
register_preset(
    "blip2",
    groups={
        "vision": _ANY + r"vision_model\.",
        "qformer": _ANY + r"qformer\.",
        "language": _ANY + r"language_model\.",
    },
    exclude=(
        _ANY + r"language_projection\.",
        _ANY + r"lm_head\.",  # an untied LM head (a tied one is an embedding and dense anyway)
        _ANY + r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.",  # Q-Former text FFN: never run here
    ),
    unfiltered=(r"crossattention\.attention\.(key|value)\.weight$",),
    image_groups=("vision", "qformer"),
    adapter=_adapter("blip2"),
    description="transformers BLIP-2: vision = ViT, qformer = Q-Former (query tokens + cross-attention on image "
    "tokens, never filtered), language = LM (PAD-filtered, image tokens counted); query tokens, "
    "language_projection and LM head dense",
)
register_preset(
    "llava",
    groups={
        "vision": _ANY + r"vision_tower\.",
        "projector": _ANY + r"multi_modal_projector\.",
        "language": _ANY + r"language_model\.",
    },
    exclude=(_ANY + r"lm_head\.",),
    image_groups=("vision", "projector"),
    exclude_for=llava_unused_vision,
    adapter=_adapter("llava"),
    description="transformers LLaVA: vision = vision tower (layers up to vision_feature_layer; later ones and its "
    "head dense, unused), projector = multi_modal_projector (image tokens), language = LM (PAD-filtered, "
    "image tokens counted); LM head dense",
)

