"""Batches from the project's image-caption records through a Hugging Face processor (CLIP, SigLIP,
LLaVA, BLIP-2, ...): calibration for `prune()` / `MultiFlowCallback`, and zero-shot retrieval evaluation.

The records are those of `docs/design.md`: calibration records `{"image", "caption"}` (one per
caption) and Karpathy val/test records `{"image", "caption": [...]}` (one per image). Images reach
the processor as RGB PIL images; the processor resizes, crops and normalises them and tokenizes
the text, so a model gets exactly what its own processor would give it.

- Calibration batches are the processor's output and nothing else (`pixel_values`, `input_ids`,
  `attention_mask`, plus whatever else the processor returns, e.g. LLaVA-NeXT's `image_sizes`), so
  `prune(model, calibration=loader)` can call `model(**batch)` on a transformers model directly.
  The processor gets images and texts in one call (an LLM-VLM processor expands its image
  placeholder to the image's tokens there).
- Evaluation batches hold `pixel_values` of the images, `input_ids` / `attention_mask` of all
  their captions (more rows than images) and the global indices `image_idx`, `text_idx`,
  `text_image_idx` (the caption's image), what `ZeroShotRetrievalModule` needs to deduplicate
  across processes and score the COCO protocol. Images and texts go to the processor separately.

`prompt`: a template with `{caption}`, applied to every caption, e.g. `"a photo of {caption}"` for
CLIP, or the chat template with the image placeholder an LLM-VLM processor needs,
`"USER: <image>\\n{caption}"` (LLaVA-1.5) -- for those, also set `max_length` large enough for the
expanded image tokens or `truncation: false`, since truncating them breaks the processor.

Processor calls: `processor(images=..., text=..., return_tensors="pt", padding=padding,
truncation=truncation, max_length=max_length, **processor_kwargs)` (`max_length` only when set);
any callable that takes these keywords and returns a mapping of tensors works.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from .datamodule_base import CalibrationConfig, JsonArg, ShardSampler, check_positive, trainer_world
from .datasets import ImageCaptionsDataset, ImageTextDataset, _present

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the collate functions tokenize inside workers

PADDINGS = ("max_length", "longest", "do_not_pad")


def load_processor(processor: Any) -> Any:
    """A processor object as is, or `AutoProcessor.from_pretrained(name_or_path)` for a hub name / local dir."""
    if isinstance(processor, (str, os.PathLike)):
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(os.fspath(processor))
        except (OSError, ValueError) as err:
            raise OSError(f"cannot load a processor from {os.fspath(processor)!r}: {err}") from err
    if processor is None or not callable(processor):
        raise TypeError(
            "processor must be a hub name, a local processor directory, or a processor object / callable "
            f"(processor(images=..., text=..., return_tensors='pt', ...)), got {type(processor).__name__}"
        )
    return processor


def check_prompt(prompt: str | None) -> str | None:
    """A prompt template must hold `{caption}` (where the caption goes); None means the caption alone."""
    if prompt is not None and "{caption}" not in prompt:
        raise ValueError(f"prompt must contain '{{caption}}' where the caption goes, got {prompt!r}")
    return prompt


def apply_prompt(prompt: str | None, caption: str) -> str:
    """The caption inside the template (plain replacement: other braces in the template stay as they are)."""
    return caption if prompt is None else prompt.replace("{caption}", caption)


def _keep_image(image: Image.Image) -> Image.Image:
    """Identity transform: evaluation images go to the processor as decoded."""
    return image


def pil_calibration_transform(image_size: int, scale: tuple[float, float], augment: bool, hflip: bool) -> T.Compose:
    """The calibration augmentation of `build_train_transform` on PIL images (no tensor conversion or
    normalisation: the processor does those): RandomResizedCrop(scale) + flip + RandAugment(2, 7)."""
    crop = T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC)
    steps: list[Callable] = [crop]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if augment:
        steps.append(T.RandAugment(num_ops=2, magnitude=7))
    return T.Compose(steps)


class _ProcessorCall:
    """The shared processor call and its checks (the text options of every batch)."""

    def __init__(self, processor: Any, max_length: int | None = 30, prompt: str | None = None,
                 padding: str | bool = "max_length", truncation: bool = True,
                 processor_kwargs: Mapping[str, Any] | None = None, raw_captions: bool = False):
        if isinstance(padding, str) and padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS} or a bool, got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length (or use padding='longest')")
        if max_length is not None:
            check_positive(max_length=max_length)
        self.processor = processor
        self.max_length = max_length
        self.prompt = check_prompt(prompt)
        self.padding = padding
        self.truncation = truncation
        self.processor_kwargs = dict(processor_kwargs or {})
        self.raw_captions = raw_captions

    def text_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"padding": self.padding, "truncation": self.truncation}
        if self.max_length is not None:
            options["max_length"] = self.max_length
        return options

    def __call__(self, what: str, **inputs: Any) -> dict[str, Any]:
        options = dict(return_tensors="pt", **self.processor_kwargs)
        if "text" in inputs:
            options.update(self.text_options())
        out = self.processor(**inputs, **options)
        if not isinstance(out, Mapping):
            raise TypeError(f"the processor returned {type(out).__name__} for a {what} batch, expected a mapping "
                            "of tensors (e.g. a BatchFeature)")
        batch = dict(out)
        expected = [k for k, given in (("pixel_values", "images"), ("input_ids", "text")) if given in inputs]
        missing = [k for k in expected if k not in batch]
        if missing:
            raise KeyError(f"the processor's {what} batch lacks {missing} (has {sorted(batch)})")
        return batch


class ProcessorCalibrationCollate(_ProcessorCall):
    """Calibration batch: the processor's output for the items' images and (prompted) captions, nothing else.

    Args:
        processor: a transformers processor (or a callable taking the same keywords).
        max_length: text tokens per row (None: no limit; then padding must not be 'max_length').
        prompt: template with `{caption}` (see the module docstring); None: the caption alone.
        padding, truncation: the tokenizer's options.
        processor_kwargs: further keywords of every processor call.
        raw_captions: give the processor the records' captions as written (stripped) instead of
            the project's cleaned (lowercased, punctuation-stripped) text.
    """

    def __call__(self, items: list[dict | None]) -> dict[str, Any]:  # type: ignore[override]
        items = _present(items)
        texts = [apply_prompt(self.prompt, i["raw_text" if self.raw_captions else "text"]) for i in items]
        return super().__call__("calibration", images=[i["image"] for i in items], text=texts)


class ProcessorRetrievalCollate(_ProcessorCall):
    """Evaluation batch: `pixel_values` of the images; `input_ids`, `attention_mask` (when the processor
    gives one) of all their captions; `image_idx`, `text_idx`, `text_image_idx` (global indices).

    Args: as `ProcessorCalibrationCollate` (`raw_captions`: the records' captions, stripped).
    """

    def __call__(self, items: list[dict | None]) -> dict[str, Any]:  # type: ignore[override]
        items = _present(items)
        key = "references" if self.raw_captions else "texts"
        texts = [apply_prompt(self.prompt, t) for i in items for t in i[key]]
        batch = super().__call__("evaluation", images=[i["image"] for i in items])
        batch = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        text = super().__call__("evaluation", text=texts)
        batch["input_ids"] = text["input_ids"]
        if "attention_mask" in text:
            batch["attention_mask"] = text["attention_mask"]
        batch["image_idx"] = torch.tensor([i["image_idx"] for i in items], dtype=torch.long)
        batch["text_idx"] = torch.tensor([t for i in items for t in i["text_idx"]], dtype=torch.long)
        batch["text_image_idx"] = torch.tensor([i["image_idx"] for i in items for _ in i["texts"]], dtype=torch.long)
        return batch


class _CalibrationRecords(ImageTextDataset):
    """Calibration records with PIL images and, next to the cleaned text, the caption as written."""

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = super().__getitem__(index)
        if item is not None:
            item["raw_text"] = self.items[index].record.caption.strip()
        return item


def processor_calibration_loader(
    records: str | os.PathLike | Sequence[str | os.PathLike],
    image_root: str | os.PathLike,
    processor: Any,
    *,
    batch_size: int = 32,
    max_length: int | None = 30,
    prompt: str | None = None,
    padding: str | bool = "max_length",
    truncation: bool = True,
    processor_kwargs: Mapping[str, Any] | None = None,
    raw_captions: bool = False,
    image_size: int = 224,
    crop_scale: tuple[float, float] | None = (0.2, 1.0),
    augment: bool = False,
    hflip: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    skip_bad_records: bool = False,
) -> DataLoader:
    """Calibration batches (the processor's output) from image-caption records, for `prune(model, calibration=...)`.

    Images: RandomResizedCrop(`image_size`, `crop_scale`) (+ flip, + RandAugment when `augment`) on the
    PIL image before the processor (`crop_scale=None`: the decoded image as is). Seeded shuffled
    order, sharded over `num_replicas` without padding. `processor`: an object or a hub name / local
    dir for `AutoProcessor.from_pretrained`; the other text options as `ProcessorCalibrationCollate`.
    """
    check_positive(batch_size=batch_size, image_size=image_size)
    processor = load_processor(processor)
    collate = ProcessorCalibrationCollate(processor, max_length, prompt, padding, truncation, processor_kwargs,
                                          raw_captions)
    transform = _keep_image if crop_scale is None else pil_calibration_transform(image_size, crop_scale, augment,
                                                                                  hflip)
    dataset = _CalibrationRecords(records, os.fspath(image_root), transform, skip_bad_records, augment_seed=seed)
    sampler = ShardSampler(len(dataset), shuffle=True, seed=seed, num_replicas=num_replicas, rank=rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


class ProcessorDataModule(L.LightningDataModule):
    """Processor batches for zero-shot retrieval (val/test: Karpathy records) and calibration.

    `val_dataloader()` / `test_dataloader()` give `ProcessorRetrievalCollate` batches (for
    `ZeroShotRetrievalModule`), `calibration_dataloader()` the processor's own calibration batches
    (used by `MultiFlowCallback` when it has no `calibration=`).

    Args:
        processor: a hub name or local directory (`AutoProcessor.from_pretrained`, loaded on first
            use: nothing is read at construction), or a processor object / callable (from Python).
        image_root: folder the records' image paths are relative to.
        val_json: validation records, one per image with all its captions (a JSON file or a list).
        test_json: test records, same format.
        eval_batch_size: images per evaluation batch (their captions all come with them).
        num_workers: DataLoader worker processes.
        max_length: caption tokens per evaluation row (None: no limit, with padding='longest').
        prompt: template with `{caption}` applied to every caption, evaluation and calibration
            (e.g. "a photo of {caption}", or "USER: <image>\\n{caption}" for a LLaVA processor).
        padding: 'max_length' (default; what CLIP/SigLIP were trained with), 'longest' or 'do_not_pad'.
        truncation: truncate captions to max_length.
        processor_kwargs: further keywords of every processor call.
        raw_captions: the records' captions as written (stripped) instead of the project's cleaned
            (lowercased, punctuation-stripped) text.
        calibration: the calibration records and batches (`json`, `image_root`, `image_size`,
            `batch_size`, `max_length`, `crop_scale`); `calibration.json` None: none.
        augment: RandAugment(2, 7) on calibration images.
        hflip: random horizontal flips of calibration images.
        skip_bad_records: drop malformed records with a warning instead of failing.
        seed: seed of the calibration order.
    """

    def __init__(
        self,
        processor: Any,
        image_root: str = ".",
        val_json: JsonArg = None,
        test_json: JsonArg = None,
        eval_batch_size: int = 64,
        num_workers: int = 4,
        max_length: int | None = 64,
        prompt: str | None = None,
        padding: str | bool = "max_length",
        truncation: bool = True,
        processor_kwargs: dict[str, Any] | None = None,
        raw_captions: bool = False,
        calibration: CalibrationConfig = CalibrationConfig(),
        augment: bool = False,
        hflip: bool = True,
        skip_bad_records: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        check_positive(eval_batch_size=eval_batch_size)
        if isinstance(processor, (str, os.PathLike)):
            self.processor_name, self._processor = os.fspath(processor), None
        else:
            self.processor_name = getattr(processor, "name_or_path", None) or type(processor).__name__
            self._processor = load_processor(processor)
        # the text options are checked now, not at the first batch
        _ProcessorCall(None, max_length, prompt, padding, truncation, processor_kwargs)
        _ProcessorCall(None, calibration.max_length, prompt, padding, truncation, processor_kwargs)
        self.image_root = os.fspath(image_root)
        self.val_json, self.test_json = val_json, test_json
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.max_length = max_length
        self.prompt = prompt
        self.padding = padding
        self.truncation = truncation
        self.processor_kwargs = dict(processor_kwargs or {})
        self.raw_captions = raw_captions
        self.calibration = calibration
        self.augment = augment
        self.hflip = hflip
        self.skip_bad_records = skip_bad_records
        self.seed = seed
        self._datasets: dict[str, Dataset] = {}
        self.save_hyperparameters(ignore=[] if self._processor is None else ["processor"])

    @property
    def processor(self) -> Any:
        """The processor (given, or loaded on first use)."""
        if self._processor is None:
            self._processor = load_processor(self.processor_name)
        return self._processor

    # ---- datasets -------------------------------------------------------------------------
    def dataset(self, split: str) -> Dataset:
        """The dataset of a split ('val', 'test', 'calibration'), built and checked once."""
        if split not in self._datasets:
            self._datasets[split] = self._build_dataset(split)
        return self._datasets[split]

    def _build_dataset(self, split: str) -> Dataset:
        if split in ("val", "test"):
            records = getattr(self, f"{split}_json")
            if not records:
                raise ValueError(f"{type(self).__name__} was given no {split}_json")
            return ImageCaptionsDataset(records, self.image_root, _keep_image, self.skip_bad_records)
        if split == "calibration":
            config = self.calibration
            if not config.json:
                raise ValueError(
                    f"{type(self).__name__} has no calibration data: set calibration.json to image-caption records "
                    "(recipe key data.calibration.json)"
                )
            transform = pil_calibration_transform(config.image_size, config.crop_scale, self.augment, self.hflip)
            return _CalibrationRecords(config.json, os.fspath(config.image_root or self.image_root), transform,
                                       self.skip_bad_records, augment_seed=self.seed)
        raise ValueError(f"{type(self).__name__} has no {split!r} split (it has val, test and calibration)")

    def setup(self, stage: str | None = None) -> None:
        """Build and check the records the stage evaluates (validate: val, test: test), so bad data fails early."""
        splits = {"validate": ("val",), "test": ("test",), None: ("val", "test")}.get(stage, ())
        if stage == "fit":
            raise ValueError(
                f"{type(self).__name__} serves zero-shot evaluation and calibration, not training: use trainer.test / "
                "trainer.validate, or fine-tune on your own train loader with "
                "MultiFlowCallback(calibration=processor_calibration_loader(...))"
            )
        for split in splits:
            if getattr(self, f"{split}_json"):
                self.dataset(split)

    # ---- loaders --------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        return trainer_world(self)

    def _eval_collate(self) -> ProcessorRetrievalCollate:
        return ProcessorRetrievalCollate(self.processor, self.max_length, self.prompt, self.padding, self.truncation,
                                         self.processor_kwargs, self.raw_captions)

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self.dataset(split)
        world_size, rank = self._world()
        sampler = None
        if world_size > 1:  # every image once; gathered outputs are deduplicated by index anyway
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, sampler=sampler,
                          collate_fn=self._eval_collate(), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        """pixel_values, input_ids, attention_mask, image_idx, text_idx, text_image_idx over val_json."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        """Same batches as val_dataloader, over test_json."""
        return self._eval_loader("test")

    def calibration_dataloader(self, num_replicas: int = 1, rank: int = 0) -> DataLoader:
        """The processor's calibration batches: seeded shuffled order, sharded without padding."""
        config = self.calibration
        dataset = self.dataset("calibration")
        collate = ProcessorCalibrationCollate(self.processor, config.max_length, self.prompt, self.padding,
                                              self.truncation, self.processor_kwargs, self.raw_captions)
        sampler = ShardSampler(len(dataset), shuffle=True, seed=self.seed, num_replicas=num_replicas, rank=rank)
        return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())


__all__ = [
    "ProcessorCalibrationCollate", "ProcessorDataModule", "ProcessorRetrievalCollate", "apply_prompt", "check_prompt",
    "load_processor", "pil_calibration_transform", "processor_calibration_loader",
]
