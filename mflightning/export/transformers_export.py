"""A pruned model as a folder transformers loads: fine-tuned BLIP task modules as transformers' Blip* classes,
transformers' own families (CLIP, SigLIP, BLIP-2, LLaVA) through `save_pretrained`; each with its processor,
a model card (`README.md`) and the mask file beside the weights.

    from mflightning.export import export_transformers

    export = export_transformers(captioning_module, "out/", masks="masks.safetensors")
    print(export.summary())
    # then anywhere: BlipForConditionalGeneration.from_pretrained("out/"), BlipProcessor.from_pretrained("out/")

Our BLIP backbone is built from transformers' BLIP components under their parameter names, so a task
module maps onto `BlipForImageTextRetrieval` (retrieval), `BlipForConditionalGeneration` (captioning) or
`BlipForQuestionAnswering` (VQA) name for name. Where the two cannot compute the same function the export
refuses, naming the difference (an LM head not tied to its word embeddings, a parameter transformers'
class lacks or shapes differently, a non-BLIP backbone); what stays equal only with the right inputs is
written into the model card. Every folder is reloaded with `from_pretrained` before it is put in place:
no missing, unexpected or mis-shaped key, every tensor bit-equal to the module's, the pruned weights exact zeros.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .sources import MaskSource, checkpoint_callback_masks, read_source
from .writer import check_zeros

MASKS_NAME = "masks.safetensors"
CARD_NAME = "README.md"
BLIP_CLASSES = {
    "retrieval": "BlipForImageTextRetrieval",
    "captioning": "BlipForConditionalGeneration",
    "vqa": "BlipForQuestionAnswering",
}
PIPELINE_TAGS = {"captioning": "image-to-text", "vqa": "visual-question-answering"}
# the beam search a captioning export keeps in generation_config.json (BLIP's generate passes the token ids itself)
CAPTION_GENERATION_KEYS = ("num_beams", "min_length", "max_length", "repetition_penalty", "do_sample")
# transformers ties these in every BLIP class with a decoder: the module must hold them tied (or equal)
TIED_IN_TRANSFORMERS = {
    "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
}


@dataclass
class TransformersExport:
    """What `export_transformers` wrote: the folder, the class that loads it, the mask file and the card's figures."""

    directory: Path
    architecture: str
    task: str | None
    masks_file: Path
    masks_sha256: str
    group_sparsity: dict[str, float]
    notes: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # module parts the transformers class has no place for

    @property
    def card(self) -> Path:
        return self.directory / CARD_NAME

    def summary(self) -> str:
        groups = ", ".join(f"{g} {s:.1%}" for g, s in self.group_sparsity.items())
        lines = [f"wrote {self.directory} ({self.architecture}{', ' + self.task if self.task else ''}): "
                 f"reloaded with from_pretrained, no missing or unexpected keys, every tensor equal",
                 f"  sparsity per group: {groups}; masks {self.masks_file.name} sha256 {self.masks_sha256}"]
        if self.left_out:
            lines.append(f"  not in {self.architecture} (not exported): {', '.join(self.left_out)}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def export_transformers(
    source: Any,
    out_dir: str | os.PathLike,
    *,
    masks: MaskSource = None,
    task: str | None = None,
    processor: Any = None,
    metrics: Mapping[str, float] | None = None,
    base_checkpoint: str | None = None,
    image_mean: tuple[float, ...] | None = None,
    image_std: tuple[float, ...] | None = None,
    weights_only: bool = True,
) -> TransformersExport:
    """Write `source` as a transformers model folder: weights, config, processor, `README.md` card, `masks.safetensors`.

    Args:
        source: a BLIP task module (`RetrievalModule`, `CaptioningModule`, `VQAModule`), a Lightning
            checkpoint of one (its class read from the hyperparameters, or `task=`), or a transformers
            model (CLIP, SigLIP, BLIP-2, LLaVA...: bare, held by a module as `model`, or a
            `save_pretrained` folder of one).
        masks: a PruningResult, a mask file, a name -> bool mask dict, or None: a checkpoint's
            MultiFlowCallback state, or the callback of the trainer the module is attached to.
            Every masked weight must already be exactly zero: a module whose masks and weights disagree
            is refused (naming the layer) and nothing is written.
        task: "retrieval", "captioning" or "vqa" (default: the module's).
        processor: transformers families: the processor to save beside the model (BLIP builds its own).
        metrics: figures for the card (default: the module's `eval_results`, when it has any).
        base_checkpoint: what the card names as the starting point (default: the module's `backbone` argument).
        image_mean, image_std: the image processor's normalisation (default: the CLIP mean/std our transforms use).
        weights_only: `torch.load`'s flag for a checkpoint file.

    The folder is built under a temporary name, reloaded with `from_pretrained` and checked, then renamed to
    `out_dir` (which must not exist, or be empty).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out_dir {str(out)!r} exists and is not an empty folder: choose a new one")
    checkpoint_masks, checkpoint_info = None, None
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        source = load_transformers_folder(Path(source))
    elif isinstance(source, (str, os.PathLike)):
        source, checkpoint_masks, checkpoint_info = load_task_checkpoint(Path(source), task, weights_only=weights_only)
    provenance = _provenance(masks, source, checkpoint_info)
    if masks is None:
        masks = checkpoint_masks if checkpoint_masks is not None else _trainer_masks(source)
    if masks is None:
        raise ValueError("no masks: pass masks= (a PruningResult, a mask file or a name -> bool mask dict), export "
                         "a Lightning checkpoint with MultiFlowCallback state, or a module attached to a trainer "
                         "with one")
    hf_model = _transformers_model(source)
    temporary = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
    temporary.mkdir(parents=True)
    try:
        if hf_model is not None:
            export = _export_family(hf_model, temporary, masks, provenance, processor, metrics, base_checkpoint)
        else:
            export = _export_blip(source, temporary, masks, provenance, task, metrics, base_checkpoint,
                                  image_mean, image_std)
        if out.exists():
            out.rmdir()
        os.replace(temporary, out)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
    export.directory = out
    export.masks_file = out / MASKS_NAME
    return export


# ----------------------------------------------------------------------------------------------- BLIP


def _export_blip(module: Any, out: Path, masks: MaskSource, provenance: Mapping[str, Any], task: str | None,
                 metrics: Mapping[str, float] | None, base_checkpoint: str | None, image_mean, image_std
                 ) -> TransformersExport:
    import transformers

    from ..models.blip import BlipBackbone

    backbone = getattr(module, "backbone", module)
    if not isinstance(backbone, BlipBackbone):
        raise ValueError(
            f"{type(backbone).__name__} has no transformers class: only BLIP backbones map onto transformers' "
            "Blip* classes (an XVLM module: use save_pretrained or export_compressed)"
        )
    task = task or getattr(module, "task", None)
    if task not in BLIP_CLASSES:
        raise ValueError(f"task {task!r}: pass task= one of {sorted(BLIP_CLASSES)}")
    architecture = BLIP_CLASSES[task]
    if task == "captioning" and getattr(module, "length_normalisation", "generated") != "generated":
        raise ValueError(
            f"the captioning module scores beams with length_normalisation={module.length_normalisation!r} "
            "(transformers 4.31's, the authors'): transformers 5's generate divides by the generated tokens, so the "
            "exported model would caption differently; set module.length_normalisation = 'generated' (and "
            "re-evaluate) to export it"
        )
    src = read_source(backbone, _backbone_masks(masks), partial=True)
    state = dict(backbone.state_dict())
    for name, mask in src.masks.items():
        check_zeros(name, src.state[name], mask, f"{type(module).__name__}'s backbone")
    hf_class = getattr(transformers, architecture)
    config = _hf_config(backbone.config, architecture)
    hf = hf_class(config)
    expected = _map_state(hf, state, architecture)
    missing, unexpected = hf.load_state_dict(expected, strict=False)
    if missing or unexpected:  # _map_state has named every key: this is a guard for transformers' own checks
        raise ValueError(f"{architecture}: load_state_dict reports missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.eval()
    if task == "captioning":
        hf.generation_config = _caption_generation_config(module, config)
    hf.save_pretrained(out)
    tokenizer = _task_tokenizer(module, backbone, task)
    blip_processor = _blip_processor(tokenizer, backbone.image_size, image_mean, image_std)
    blip_processor.save_pretrained(out)
    _verify_reload(hf_class, out, expected, architecture)
    _verify_processor(out, backbone, task, module.tokenizer)
    by_name = {**src.masks, **{a: src.masks[s] for a, s in src.aliases.items() if s in src.masks}}
    exported_masks = {name: mask for name, mask in by_name.items() if name in expected}
    result = _masks_result(exported_masks, provenance, preset="blip")
    digest = _save_masks(result, out)
    groups = result.group_sparsity()
    left_out = sorted({name.split(".", 1)[0] for name in state if name not in expected})
    notes = _blip_notes(task, backbone)
    card = _card(
        architecture=architecture, task=task, result=result, digest=digest, groups=groups,
        tensors_digest=stored_checksum(out / MASKS_NAME),
        base=base_checkpoint or _base_checkpoint(module), metrics=_metrics(module, metrics), notes=notes,
        left_out=left_out, usage=_blip_usage(task, module, architecture),
        extra={"ITC temperature (not in transformers' class)": f"{backbone.temp.item():.6g}"}
        if task == "retrieval" else {},
    )
    (out / CARD_NAME).write_text(card)
    return TransformersExport(directory=out, architecture=architecture, task=task, masks_file=out / MASKS_NAME,
                              masks_sha256=digest, group_sparsity=groups, notes=notes, left_out=left_out)


def _hf_config(config: Any, architecture: str) -> Any:
    """The backbone's BlipConfig as the transformers class's: `architectures` set, our layout flag dropped.

    `enc_token_id` stays (data only: the [ENC] id BLIP puts first in image-grounded texts).
    """
    config = copy.deepcopy(config)
    if hasattr(config, "tie_decoder"):  # a tied decoder is written as separate equal copies, transformers' layout
        del config.tie_decoder
    if not getattr(config.text_config, "is_decoder", False):
        raise ValueError("the backbone's text config has is_decoder=False: transformers' BLIP text layers would "
                         "then have no cross-attention")
    config.architectures = [architecture]
    return config


def _map_state(hf: nn.Module, state: Mapping[str, Tensor], architecture: str) -> dict[str, Tensor]:
    """The module's tensors under `hf`'s names (the same names); an error names any key or shape that differs.

    transformers ties the decoder's LM head to its word embeddings (and its two biases): a module whose
    head holds other values would silently change, so it is refused.
    """
    own = hf.state_dict()
    absent = [k for k in own if k not in state and not k.endswith("position_ids")]
    shapes = [f"{k}: module {tuple(state[k].shape)} vs {architecture} {tuple(v.shape)}"
              for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if absent or shapes:
        raise ValueError(f"the module does not map onto {architecture}: "
                         + "; ".join(filter(None, [absent and f"{len(absent)} keys the module lacks, e.g. {absent[:5]}",
                                                    shapes and f"{len(shapes)} shapes differ, e.g. {shapes[:3]}"])))
    for alias, target in TIED_IN_TRANSFORMERS.items():
        if alias in own and not torch.equal(state[alias], state[target]):
            raise ValueError(
                f"{alias} differs from {target}: transformers' {architecture} ties the two, so the exported model "
                "would compute another function; tie them (or export with our save_pretrained)"
            )
    return {k: state[k].detach().cpu().clone() for k in own if k in state}


def _verify_reload(hf_class: type, out: Path, expected: Mapping[str, Tensor], architecture: str) -> None:
    """Reload the folder as transformers would and require every tensor back, bit-equal, and nothing else."""
    reloaded, info = hf_class.from_pretrained(out, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ValueError(f"{architecture}.from_pretrained on the export reports {problems}")
    state = reloaded.state_dict()
    different = [k for k, v in expected.items() if k not in state or not torch.equal(state[k], v)]
    if different:
        raise ValueError(f"{architecture}.from_pretrained gives other values for {different[:5]}")


def _task_tokenizer(module: Any, backbone: Any, task: str) -> Any:
    """The module's tokenizer; for VQA one whose first token is [ENC], as BLIP's question encoder reads it.

    transformers' VQA class encodes `input_ids` as given while BLIP puts [ENC] first: a processor that
    writes [ENC] makes `processor(image, question)` -> `generate` equal to the module.
    """
    tokenizer = getattr(module, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("the module has no tokenizer to write the processor from")
    if task != "vqa":
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.cls_token = tokenizer.convert_ids_to_tokens(backbone.enc_token_id)
    return tokenizer


def _blip_processor(tokenizer: Any, image_size: int, image_mean, image_std) -> Any:
    """BlipProcessor: the tokenizer, and our eval transform (bicubic resize to the model's size, CLIP mean/std)."""
    from transformers import BlipImageProcessor, BlipProcessor
    from transformers.image_utils import PILImageResampling

    from ..data.transforms import CLIP_MEAN, CLIP_STD

    images = BlipImageProcessor(
        do_resize=True, size={"height": int(image_size), "width": int(image_size)},
        resample=PILImageResampling.BICUBIC, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(image_mean or CLIP_MEAN), image_std=list(image_std or CLIP_STD), do_convert_rgb=True,
    )
    return BlipProcessor(images, tokenizer)


def _verify_processor(out: Path, backbone: Any, task: str, module_tokenizer: Any) -> None:
    """The saved processor's texts start as the module's do: [ENC] for VQA questions, else [CLS]."""
    from transformers import BlipProcessor

    tokenizer = BlipProcessor.from_pretrained(out).tokenizer
    first = tokenizer("a").input_ids[0]
    want = backbone.enc_token_id if task == "vqa" else module_tokenizer.cls_token_id
    if first != want or tokenizer.convert_tokens_to_ids("[DEC]") != backbone.dec_token_id:
        raise ValueError(f"the exported tokenizer starts texts with id {first} (wanted {want}) or lost [DEC]: "
                         "its processor would feed the model other tokens than the module")


def _caption_settings(module: Any) -> dict[str, Any]:
    """The module's beam search (`CAPTION_GENERATION_KEYS`; lengths count the prompt, as the module's do)."""
    return {"num_beams": int(module.num_beams), "min_length": int(module.min_generated_length),
            "max_length": int(module.max_generated_length), "repetition_penalty": float(module.repetition_penalty),
            "do_sample": False}


def _caption_generation_config(module: Any, config: Any) -> Any:
    """The module's beam search as the folder's generation_config.json, with BLIP's token ids."""
    from transformers import GenerationConfig

    text = config.text_config
    return GenerationConfig(**_caption_settings(module), bos_token_id=text.bos_token_id,
                            eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id)


def generation_settings(model: Any) -> dict[str, Any]:
    """The exported beam search as `generate` keywords: `model.generate(**inputs, **generation_settings(model))`.

    transformers' BlipForConditionalGeneration.generate hands its keywords to the text decoder, whose own
    generation config is greedy, and passes the token ids itself: these settings must be given explicitly.
    """
    return {key: getattr(model.generation_config, key) for key in CAPTION_GENERATION_KEYS}


def _blip_notes(task: str, backbone: Any) -> list[str]:
    """What holds only with the right inputs (written into the card and the summary)."""
    notes = []
    drop_path = float(getattr(backbone.config.vision_config, "drop_path_rate", 0.0) or 0.0)
    if drop_path:
        notes.append(f"the ViT's stochastic depth (drop_path_rate={drop_path:g}) is a training setting transformers' "
                     "BlipVisionModel lacks: inference is the same, further training there runs without it")
    if task == "retrieval":
        notes.append(f"ITM: BLIP's grounded encoder reads [ENC] (id {backbone.enc_token_id}) first: set "
                     "input_ids[:, 0] to config.enc_token_id for use_itm_head=True; ITC (use_itm_head=False) "
                     "reads the processor's [CLS] as is. transformers' itm_score for ITC is the cosine, not "
                     "divided by the temperature")
    if task == "vqa":
        notes.append("the processor writes [ENC] first (BLIP's question encoder); transformers' decoder "
                     "cross-attention ignores the question's padding mask (its BlipTextAttention drops "
                     "encoder_attention_mask), so answers equal the module's for one question per call or for "
                     "questions of equal length; mflightning.models.blip.honour_cross_attention_masks("
                     "model.text_decoder) restores the mask. The module ranks a fixed answer list; generate() "
                     "decodes freely")
    if task == "captioning":
        notes.append("captions equal the module's with its prompt as text (processor(images=image, text=prompt)) and "
                     "its beam search passed to generate explicitly (the values in generation_config.json; "
                     "lengths count the prompt): transformers' BlipForConditionalGeneration.generate hands its "
                     "keywords to the text decoder, whose own generation config is greedy (a pipeline: "
                     "generate_kwargs=the same keywords)")
    return notes


# ----------------------------------------------------------------------------------------------- transformers families


def _transformers_model(source: Any) -> Any:
    """`source` itself or its `model` when it is a transformers PreTrainedModel (a family export), else None."""
    from transformers import PreTrainedModel

    for candidate in (source, getattr(source, "model", None)):
        if isinstance(candidate, PreTrainedModel):
            return candidate
    return None


def _export_family(model: Any, out: Path, masks: MaskSource, provenance: Mapping[str, Any], processor: Any,
                   metrics: Mapping[str, float] | None, base_checkpoint: str | None) -> TransformersExport:
    from ..models.hf_families import recognise

    src = read_source(model, masks, partial=True)
    for name, mask in src.masks.items():
        check_zeros(name, src.state[name], mask, type(model).__name__)
    architecture = type(model).__name__
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    _verify_reload(type(model), out, expected, architecture)
    preset = recognise(model)
    result = _masks_result(src.masks, provenance, preset=preset)
    digest = _save_masks(result, out)
    groups = result.group_sparsity()
    notes = [] if processor is not None else ["no processor was given: use the base checkpoint's"]
    card = _card(architecture=architecture, task=None, result=result, digest=digest, groups=groups,
                 tensors_digest=stored_checksum(out / MASKS_NAME),
                 base=base_checkpoint or getattr(model.config, "_name_or_path", "") or "unknown",
                 metrics=dict(metrics or {}), notes=notes, left_out=[], usage=_family_usage(architecture), extra={})
    (out / CARD_NAME).write_text(card)
    return TransformersExport(directory=out, architecture=architecture, task=None, masks_file=out / MASKS_NAME,
                              masks_sha256=digest, group_sparsity=groups, notes=notes)


# ----------------------------------------------------------------------------------------------- masks and sources


def load_task_checkpoint(path: Path, task: str | None, *, weights_only: bool = True
                         ) -> tuple[Any, dict | None, dict[str, Any]]:
    """A task module rebuilt from a Lightning checkpoint (class from `task=` or its hyperparameters), the masks of
    its MultiFlowCallback state (None when it has none) and what that state says of them (method, sparsity)."""
    from ..tasks import CaptioningModule, RetrievalModule, VQAModule

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        content = torch.load(str(path), map_location="cpu", weights_only=weights_only)
    except Exception as err:  # an unpickling refusal, or not a torch file at all
        raise ValueError(f"{str(path)!r} is not a readable Lightning checkpoint: {err}") from err
    if not isinstance(content, Mapping) or not isinstance(content.get("state_dict"), Mapping):
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no state_dict): export a task module or a "
                         "Lightning checkpoint of one")
    hparams = dict(content.get("hyper_parameters") or {})
    if hparams.get("backbone") is None:
        raise ValueError(f"{str(path)!r}: its hyperparameters hold no backbone spec (the module was given a backbone "
                         "object): build the module yourself and export it")
    classes = {"retrieval": RetrievalModule, "captioning": CaptioningModule, "vqa": VQAModule}
    task = task or _task_from_hparams(hparams, str(path))
    if task not in classes:
        raise ValueError(f"task {task!r}: choose one of {sorted(classes)}")
    module = classes[task](**hparams)
    module.load_state_dict(content["state_dict"], strict=True)
    states = [s for s in (content.get("callbacks") or {}).values() if isinstance(s, Mapping) and "method" in s]
    info = {k: states[0].get(k) for k in ("method", "target_sparsity")} if len(states) == 1 else {}
    return module.eval(), checkpoint_callback_masks(content, str(path)), info


def load_transformers_folder(path: Path) -> Any:
    """The transformers model of a `save_pretrained` folder, by the class its config.json names (a transformers
    PreTrainedModel class, looked up by name in the transformers package: nothing else is imported)."""
    import transformers

    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"folder {str(path)!r} has no config.json (a transformers save_pretrained folder "
                                "has one)")
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise ValueError(f"{config_file}: architectures {architectures} names no transformers model class")
    return model_class.from_pretrained(path).eval()


def _task_from_hparams(hparams: Mapping[str, Any], where: str) -> str:
    """The task a checkpoint's hyperparameters belong to (each task module has arguments of its own)."""
    if "prompt" in hparams:
        return "captioning"
    if "answer_list" in hparams or "rank_batch_size" in hparams:
        return "vqa"
    if "itm_batch_size" in hparams:
        return "retrieval"
    raise ValueError(f"{where}: cannot tell the task from the checkpoint's hyperparameters; pass task=")


def _trainer_masks(module: Any) -> dict[str, Tensor] | None:
    """The kept masks of the MultiFlowCallback of the trainer `module` is attached to, if any."""
    trainer = getattr(module, "_trainer", None)
    for callback in getattr(trainer, "callbacks", None) or ():
        kept = getattr(callback, "kept_masks", None)
        if isinstance(kept, Mapping) and kept:
            return dict(kept)
    return None


def _backbone_masks(masks: MaskSource) -> MaskSource:
    """A module-level mask dict (names under `backbone.`, copies such as `backbone_m.`) as the backbone's masks."""
    if isinstance(masks, Mapping) and any(str(k).startswith("backbone.") for k in masks):
        return {k[len("backbone."):]: v for k, v in masks.items() if k.startswith("backbone.")}
    return masks


def _masks_result(exported: Mapping[str, Tensor], provenance: Mapping[str, Any], preset: str | None) -> Any:
    """A PruningResult of the exported model's masks under its names, with the provenance of the masks given."""
    from ..pruning.presets import get_preset
    from ..pruning.result import PruningResult

    if not exported:
        raise ValueError("no masked weight is part of the exported model: nothing pruned to export")
    patterns = get_preset(preset).groups if preset else {}
    groups = {name: next((g for g, rx in patterns.items() if re.search(rx, name)), "all") for name in exported}
    return PruningResult(
        masks={n: m.detach().to("cpu", torch.bool).contiguous() for n, m in exported.items()}, groups=groups,
        method=str(provenance.get("method") or "unknown"),
        target_sparsity=float(provenance.get("target_sparsity") or 0.0),
        allocation=str(provenance.get("allocation") or "unknown"), preset=preset,
        calibration=dict(provenance.get("calibration") or {}), pattern=provenance.get("pattern"),
    )


def _provenance(given: MaskSource, module: Any, checkpoint: Mapping[str, Any] | None) -> dict[str, Any]:
    """Method, target sparsity, allocation, calibration and pattern of the masks: from the mask file or result
    given, else from a checkpoint's callback state or the attached trainer's MultiFlowCallback."""
    from ..pruning.result import PruningResult

    result = PruningResult.load(given) if isinstance(given, (str, os.PathLike)) else given
    if not isinstance(result, PruningResult):
        trainer = getattr(module, "_trainer", None)
        result = next((c.result for c in getattr(trainer, "callbacks", None) or ()
                       if isinstance(getattr(c, "result", None), PruningResult)), None)
    if isinstance(result, PruningResult):
        return {"method": result.method, "target_sparsity": result.target_sparsity, "allocation": result.allocation,
                "calibration": result.calibration, "pattern": result.pattern}
    return dict(checkpoint or {})


def _save_masks(result: Any, out: Path) -> str:
    """Write the mask file beside the weights; returns the sha256 of its bytes."""
    path = result.save(out / MASKS_NAME)
    return sha256_file(path)


def stored_checksum(path: str | os.PathLike) -> str:
    """The checksum of a mask file's tensors, as its safetensors metadata holds it: unlike the file's sha256
    (safetensors orders its header keys differently from run to run), the same masks always give the same one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get("checksum", "none")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- the model card


def _base_checkpoint(module: Any) -> str:
    spec = (getattr(module, "hparams", None) or {}).get("backbone")
    if isinstance(spec, Mapping) and "checkpoint" in spec:
        return str(spec["checkpoint"])
    if isinstance(spec, (str, os.PathLike)):
        return str(spec)
    return "unknown (a backbone object or a config dict was given)"


def _metrics(module: Any, metrics: Mapping[str, float] | None) -> dict[str, float]:
    if metrics is not None:
        return dict(metrics)
    results = getattr(module, "eval_results", None) or {}
    return {f"{stage}/{name}": float(value) for stage, values in results.items() for name, value in values.items()}


def _card(*, architecture: str, task: str | None, result: Any, digest: str, tensors_digest: str,
          groups: Mapping[str, float], base: str,
          metrics: Mapping[str, float], notes: list[str], left_out: list[str], usage: str,
          extra: Mapping[str, str]) -> str:
    """README.md: YAML front matter (library, tags) and what was pruned, how, on what, and how to use it."""
    tag = PIPELINE_TAGS.get(task or "", "")
    front = ["---", "library_name: transformers", "tags:", "- pruning", "- multiflow", "- sparse", "- mflightning"]
    if tag:
        front.append(f"pipeline_tag: {tag}")
    front.append("---")
    calibration = json.dumps(result.calibration, sort_keys=True) if result.calibration else "unknown"
    rows = [
        ("class", f"`{architecture}`"), ("task", task or "as the base model"), ("base checkpoint", base),
        ("pruning method", f"{result.method} (target sparsity {result.target_sparsity:g}, "
                           f"allocation {result.allocation}"
                           + (f", pattern {result.pattern}" if result.pattern else "") + ")"),
        ("sparsity per group (masked weights, exact zeros here)",
         ", ".join(f"{g}: {s:.2%}" for g, s in groups.items())),
        ("masked weights", f"{result.num_weights} in {result.num_layers} layers"),
        ("calibration data", calibration),
        (f"mask file `{MASKS_NAME}` sha256", f"`{digest}`"),
        ("mask tensors checksum (the same for the same masks; checked when the file loads)", f"`{tensors_digest}`"),
        *extra.items(),
    ]
    lines = [*front, "", f"# {architecture} pruned with mflightning", "",
             "Pruned weights are stored as exact zeros in a dense `model.safetensors`; the mask file beside it "
             "names them (`mflightning.PruningResult.load` reads it; keep it to fine-tune with the sparsity kept).",
             "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    lines += ["## Metrics", ""]
    lines += [f"- {name}: {value:.4g}" for name, value in metrics.items()] or ["- not known at export"]
    lines.append("")
    if left_out:
        lines += ["## Not exported", "", f"Parts of the module `{architecture}` has no place for: "
                  + ", ".join(f"`{p}`" for p in left_out) + ".", ""]
    if notes:
        lines += ["## Equal outputs: what to pass", "", *[f"- {n}" for n in notes], ""]
    lines += ["## Usage", "", "```python", usage, "```", ""]
    return "\n".join(lines)


def _blip_usage(task: str, module: Any, architecture: str) -> str:
    head = f"from transformers import BlipProcessor, {architecture}\n\n" \
           "processor = BlipProcessor.from_pretrained(folder)\n" \
           f"model = {architecture}.from_pretrained(folder).eval()\n"
    if task == "captioning":
        prompt = getattr(module, "prompt", "")
        return head + f"inputs = processor(images=image, text={prompt!r}, return_tensors='pt')\n" \
                      f"ids = model.generate(**inputs, {_caption_keywords(module)})  # the module's beam search\n" \
                      "caption = processor.decode(ids[0], skip_special_tokens=True)"
    if task == "vqa":
        return head + "inputs = processor(images=image, text=question, return_tensors='pt')  # [ENC] first\n" \
                      "answer = processor.decode(model.generate(**inputs)[0], skip_special_tokens=True)"
    return head + "inputs = processor(images=image, text=caption, return_tensors='pt')\n" \
                  "itc = model(**inputs, use_itm_head=False).itm_score  # cosine similarity\n" \
                  "inputs['input_ids'][:, 0] = model.config.enc_token_id  # BLIP's ITM reads [ENC] first\n" \
                  "itm = model(**inputs).itm_score.softmax(-1)[:, 1]  # match probability"


def _caption_keywords(module: Any) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in _caption_settings(module).items())


def _family_usage(architecture: str) -> str:
    return f"from transformers import AutoProcessor, {architecture}\n\nmodel = {architecture}.from_pretrained(folder)"
