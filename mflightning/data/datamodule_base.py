"""The plumbing every datamodule shares: `VLDataModule` (tokenizer, transforms, loaders, `setup`) and
`CalibrationConfig`, the calibration data a datamodule may carry.

DDP: training loaders are plain shuffled loaders; Lightning injects a DistributedSampler.
Evaluation loaders, when the attached Trainer runs more than one process, use Lightning's
`UnrepeatedDistributedSampler`: every sample is evaluated exactly once, ranks may differ by
one batch, so tasks must not run collectives per evaluation step (gather at epoch end). If a
padding `DistributedSampler` is used anyway (a custom loader), tasks must dedupe gathered
results by the batch's global keys, keeping one entry per key: `image_idx`/`text_idx`
(retrieval), `image_id` (captioning), `question_id` (VQA).

Calibration batches come from `calibration_dataloader()` (used by MultiFlowCallback): the
records and batch sizes of `CalibrationConfig`, in a seeded shuffled order sharded without padding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import ImageTextCollate, ImageTextDataset, PairedCollate, PairedSteps
from .tokenizer import build_tokenizer
from .cleaning import TextCleaning, text_cleaner
from .transforms import CALIBRATION_CROP_SCALE, TASK_CROP_SCALE, Augment, build_test_transform, build_train_transform

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the collate functions tokenize inside workers

JsonArg = str | list[str] | None


class ShardSampler(Sampler[int]):
    """Seeded (optionally shuffled) order, sharded round-robin over `num_replicas` without padding."""

    def __init__(self, size: int, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed)).tolist()
        else:
            order = list(range(self.size))
        return iter(order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.num_replicas))


# The splits `setup(stage)` builds and checks when their records were given.
STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val"), "validate": ("val",), "test": ("test",), None: ("train", "val", "test"),
}


def check_positive(**values: int) -> None:
    """Raise ValueError naming the first argument that is not a positive integer."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")


def check_crop_scale(crop_scale: tuple[float, float], name: str) -> tuple[float, float]:
    """A RandomResizedCrop scale range as floats, checked (0 < low <= high <= 1); errors name the argument."""
    lo, hi = crop_scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {crop_scale}")
    return float(lo), float(hi)


def trainer_world(datamodule: Any) -> tuple[int, int]:
    """(world size, rank) of the trainer a datamodule is attached to; (1, 0) without one."""
    trainer = getattr(datamodule, "trainer", None)
    if trainer is not None and getattr(trainer, "world_size", 1) > 1:
        return trainer.world_size, trainer.global_rank
    return 1, 0


@dataclass(frozen=True)
class CalibrationConfig:
    """The calibration data of a datamodule: image-caption records (never task data) and their batches.

    A recipe sets it as `data.init_args.calibration.json`, `...calibration.batch_size` and so on.

    Args:
        json: image-caption records (a JSON file or a list of them); None: no calibration data.
        image_root: folder the records' image paths are relative to (None: the datamodule's image_root).
        image_size: side of the square calibration images.
        batch_size: images per calibration batch.
        max_length: caption tokens per row (padded or truncated).
        crop_scale: RandomResizedCrop scale range of the calibration images.
        pair_sources: each record file of `json` is one source, and every calibration batch is one step
            holding `batch_size` rows of each source (the MULTIFLOW code: 32 CC3M + 32 Visual Genome rows
            per step), concatenated, with `segments` giving each part's size; each source has its own
            seeded order and the shortest one ends the loader. False: one shuffled list of all records.
        add_sep: texts end with [SEP] (BLIP); False: [CLS] and up to `max_length - 1` tokens, no [SEP] (XVLM).
    """

    json: JsonArg = None
    image_root: str | None = None
    image_size: int = 224
    batch_size: int = 32
    max_length: int = 30
    crop_scale: tuple[float, float] = CALIBRATION_CROP_SCALE
    pair_sources: bool = False
    add_sep: bool = True

    def __post_init__(self) -> None:
        check_positive(**{f"calibration.{name}": getattr(self, name)
                          for name in ("image_size", "batch_size", "max_length")})
        object.__setattr__(self, "crop_scale", check_crop_scale(self.crop_scale, "calibration.crop_scale"))


class VLDataModule(L.LightningDataModule):
    """Shared plumbing: lazy tokenizer, transforms, loaders, `setup` and optional calibration data.

    Args:
        image_root: folder the records' image paths are relative to.
        tokenizer: tokenizer name or path for `build_tokenizer` (from Python, a ready tokenizer object
            carrying [DEC]/[ENC] works too).
        image_size: side of the square task images.
        batch_size: training batch size (per process).
        eval_batch_size: evaluation batch size (None: batch_size).
        num_workers: DataLoader worker processes.
        max_length: text tokens per row (padded or truncated).
        skip_bad_records: drop malformed records with a warning instead of failing.
        augment: augmentation of training and calibration images: True or "torchvision" (torchvision's
            RandAugment(2, 7)), "authors" (the MULTIFLOW authors' RandomAugment(2, 7): 10 ops, each applied
            with probability 0.5, level 7 of 10), False (none).
        text_cleaning: "blip" (``clean_text``) or "authors" (their ``pre_caption``/``pre_question`` with
            their word caps per task; ``mflightning.data.cleaning``).
        hflip: random horizontal flips of training images.
        crop_scale: RandomResizedCrop scale range of training images.
        calibration: the records and batches of `calibration_dataloader()` (`calibration.json` None: none).
        seed: seed of the calibration order.
    """

    # Arguments a subclass derives itself, left out of its hyperparameters.
    derived_arguments: tuple[str, ...] = ()

    def __init__(
        self,
        image_root: str,
        tokenizer: str = "bert-base-uncased",
        image_size: int = 384,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        max_length: int = 35,
        skip_bad_records: bool = False,
        augment: Augment = True,
        hflip: bool = True,
        crop_scale: tuple[float, float] = TASK_CROP_SCALE,
        calibration: CalibrationConfig = CalibrationConfig(),
        seed: int = 0,
        text_cleaning: TextCleaning = "blip",
    ):
        super().__init__()
        check_positive(image_size=image_size, batch_size=batch_size, max_length=max_length)
        self.image_root = os.fspath(image_root)
        if isinstance(tokenizer, (str, os.PathLike)):
            self.tokenizer_name, self._tokenizer = os.fspath(tokenizer), None
        else:  # a ready tokenizer object (must carry [DEC]/[ENC], e.g. from build_tokenizer)
            self.tokenizer_name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
            self._tokenizer = tokenizer
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.max_length = max_length
        self.skip_bad_records = skip_bad_records
        self.augment = augment
        self.text_cleaning = text_cleaning
        text_cleaner(text_cleaning, "calibration")  # an unknown style fails here, not at the first dataset
        self.hflip = hflip
        self.crop_scale = check_crop_scale(crop_scale, "crop_scale")
        self.calibration = calibration
        self.seed = seed
        self._datasets: dict[str, Dataset] = {}
        # Collects the arguments of every __init__ of the subclass chain (those passed on as **kwargs too).
        self.save_hyperparameters(ignore=list(self.derived_arguments))

    @property
    def tokenizer(self):
        """The BERT tokenizer with [DEC]/[ENC] (given, or built on first use: no download at construction)."""
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def train_transform(self, hflip: bool | None = None):
        """Task training transform: RandomResizedCrop(crop_scale, default 0.5-1), flip (``hflip``, default
        the datamodule's; VQA flips in its dataset instead), RandAugment."""
        return build_train_transform(self.image_size, self.crop_scale, self.augment,
                                     self.hflip if hflip is None else hflip)

    def cleaner(self, kind: str):
        """How texts of ``kind`` (``cleaning.AUTHORS_MAX_WORDS``' keys) are cleaned under ``text_cleaning``."""
        return text_cleaner(self.text_cleaning, kind)

    def test_transform(self):
        """Evaluation transform: square resize."""
        return build_test_transform(self.image_size)

    # ---- datasets -------------------------------------------------------------------------
    def _build_dataset(self, split: str) -> Dataset:
        """The dataset of one split; a subclass builds its task splits and defers the rest here."""
        if split == "calibration":
            return self._calibration_dataset()
        raise NotImplementedError(f"{type(self).__name__} has no '{split}' split")

    def dataset(self, split: str) -> Dataset:
        """The dataset of a split ('train', 'val', 'test', 'calibration'), built and checked once."""
        if split not in self._datasets:
            self._datasets[split] = self._build_dataset(split)
        return self._datasets[split]

    def _calibration_dataset(self) -> Dataset:
        config = self.calibration
        if not config.json:
            raise ValueError(
                f"{type(self).__name__} has no calibration data: set calibration.json to image-caption records "
                "(recipe key data.calibration.json)"
            )
        if config.pair_sources:
            files = [config.json] if isinstance(config.json, str) else list(config.json)
            sources = [self._calibration_records(path, self.seed + k) for k, path in enumerate(files)]
            return PairedSteps(sources, config.batch_size, seed=self.seed)
        return self._calibration_records(config.json, self.seed)

    def _calibration_records(self, json_paths: JsonArg, augment_seed: int) -> ImageTextDataset:
        """Image-caption items of calibration record file(s), with the calibration transform."""
        config = self.calibration
        transform = build_train_transform(config.image_size, config.crop_scale, self.augment, self.hflip)
        image_root = os.fspath(config.image_root or self.image_root)
        # crops seeded per item: the same masks from the same calibration data, whatever ran before
        return ImageTextDataset(json_paths, image_root, transform, self.skip_bad_records, augment_seed=augment_seed,
                                clean=self.cleaner("calibration"))

    def _records(self, split: str) -> JsonArg:
        """The records file(s) of a task split (`<split>_json`), with an error naming the argument when absent."""
        value = getattr(self, f"{split}_json", None)
        if not value:
            raise ValueError(f"{type(self).__name__} was given no {split}_json")
        return value

    def _setup_splits(self, stage: str | None) -> list[str]:
        """The splits `setup(stage)` builds: those the stage uses whose records were given."""
        return [split for split in STAGE_SPLITS.get(stage, ()) if getattr(self, f"{split}_json", None)]

    def setup(self, stage: str | None = None) -> None:
        """Build and check the records the stage needs (fit: train + val when given), so bad data fails early."""
        for split in self._setup_splits(stage):
            self.dataset(split)

    # ---- loaders --------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        return trainer_world(self)

    def _loader(self, dataset: Dataset, batch_size: int, collate, **kwargs: Any) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                          **kwargs)

    def _train_loader(self, dataset: Dataset, collate) -> DataLoader:
        world_size, _ = self._world()
        if len(dataset) // world_size < self.batch_size:
            raise ValueError(
                f"{type(self).__name__}: {len(dataset)} training samples over {world_size} process(es) is fewer "
                f"than batch_size={self.batch_size}; training drops the last partial batch, so no batch would run"
            )
        return self._loader(dataset, self.batch_size, collate, shuffle=True, drop_last=True)

    def _eval_loader(self, dataset: Dataset, collate) -> DataLoader:
        world_size, rank = self._world()
        sampler = None
        if world_size > 1:
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return self._loader(dataset, self.eval_batch_size, collate, shuffle=False, sampler=sampler)

    def calibration_dataloader(self, num_replicas: int = 1, rank: int = 0) -> DataLoader:
        """Calibration batches (image, input_ids, attention_mask): seeded shuffled order, no padding shards.

        With `calibration.pair_sources` a batch is one step of every source (+ `segments`), steps sharded
        round-robin over processes."""
        dataset = self.dataset("calibration")
        collate = ImageTextCollate(self.tokenizer, self.calibration.max_length, add_sep=self.calibration.add_sep)
        if isinstance(dataset, PairedSteps):  # each item is already a step: its sources shuffled within
            sampler = ShardSampler(len(dataset), shuffle=False, num_replicas=num_replicas, rank=rank)
            return self._loader(dataset, None, PairedCollate(collate), sampler=sampler)
        sampler = ShardSampler(len(dataset), shuffle=True, seed=self.seed, num_replicas=num_replicas, rank=rank)
        return self._loader(dataset, self.calibration.batch_size, collate, sampler=sampler)


