"""LightningDataModules for calibration/pretraining, retrieval, captioning and VQA (design.md formats).

DDP: training loaders are plain shuffled loaders; Lightning injects a DistributedSampler.
Evaluation loaders, when the attached Trainer runs more than one process, use Lightning's
`UnrepeatedDistributedSampler`: every sample is evaluated exactly once, ranks may differ by
one batch, so tasks must not run collectives per evaluation step (gather at epoch end). If a
padding `DistributedSampler` is used anyway (a custom loader), tasks must dedupe gathered
results by the batch's global keys, keeping one entry per key: `image_idx`/`text_idx`
(retrieval), `image_id` (captioning), `question_id` (VQA).

Calibration: every datamodule takes an optional `calibration_json` (image-caption records,
never task data) and then offers `calibration_dataloader()`, used by MultiFlowCallback.
"""

from __future__ import annotations

import json
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import (
    ImageCaptionsDataset,
    ImageTextCollate,
    ImageTextDataset,
    RetrievalEvalCollate,
    VQADataset,
    VQAEvalCollate,
    VQATrainCollate,
    caption_eval_collate,
)
from .records import DataRecordError
from .tokenizer import build_tokenizer
from .transforms import CALIBRATION_CROP_SCALE, TASK_CROP_SCALE, build_test_transform, build_train_transform

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


class VLDataModule(L.LightningDataModule):
    """Shared plumbing: lazy tokenizer, transforms, loaders and optional calibration data."""

    def __init__(
        self,
        image_root: str,
        tokenizer: str | Any = "bert-base-uncased",
        image_size: int = 384,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        max_length: int = 35,
        skip_bad_records: bool = False,
        augment: bool = True,
        hflip: bool = True,
        crop_scale: tuple[float, float] = TASK_CROP_SCALE,
        calibration_json: JsonArg = None,
        calibration_image_root: str | None = None,
        calibration_image_size: int = 224,
        calibration_batch_size: int = 32,
        calibration_max_length: int = 30,
        seed: int = 0,
    ):
        super().__init__()
        for name, value in (("image_size", image_size), ("batch_size", batch_size),
                            ("max_length", max_length), ("calibration_image_size", calibration_image_size),
                            ("calibration_batch_size", calibration_batch_size),
                            ("calibration_max_length", calibration_max_length)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
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
        self.hflip = hflip
        lo, hi = crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        self.crop_scale = (float(lo), float(hi))
        self.calibration_crop_scale = CALIBRATION_CROP_SCALE
        self.calibration_json = calibration_json
        self.calibration_image_root = os.fspath(calibration_image_root or image_root)
        self.calibration_image_size = calibration_image_size
        self.calibration_batch_size = calibration_batch_size
        self.calibration_max_length = calibration_max_length
        self.seed = seed
        self._datasets: dict[str, Dataset] = {}

    @property
    def tokenizer(self):
        """The BERT tokenizer with [DEC]/[ENC] (given, or built on first use: no download at construction)."""
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def train_transform(self):
        """Task training transform: RandomResizedCrop(crop_scale, default 0.5-1), flip, RandAugment."""
        return build_train_transform(self.image_size, self.crop_scale, self.augment, self.hflip)

    def test_transform(self):
        """Evaluation transform: square resize."""
        return build_test_transform(self.image_size)

    # ---- datasets -------------------------------------------------------------------------
    def _build_dataset(self, split: str) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} has no '{split}' split")

    def dataset(self, split: str) -> Dataset:
        """The dataset of a split ('train', 'val', 'test', 'calibration'), built and checked once."""
        if split not in self._datasets:
            self._datasets[split] = self._build_dataset(split)
        return self._datasets[split]

    def _calibration_dataset(self) -> Dataset:
        if not self.calibration_json:
            raise ValueError(f"{type(self).__name__} has no calibration data: pass calibration_json")
        transform = build_train_transform(self.calibration_image_size, self.calibration_crop_scale,
                                          self.augment, self.hflip)
        return ImageTextDataset(self.calibration_json, self.calibration_image_root, transform,
                                self.skip_bad_records)

    def _require(self, value: JsonArg, name: str) -> JsonArg:
        if not value:
            raise ValueError(f"{type(self).__name__} was given no {name}")
        return value

    # ---- loaders --------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and getattr(trainer, "world_size", 1) > 1:
            return trainer.world_size, trainer.global_rank
        return 1, 0

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
        """Calibration batches (image, input_ids, attention_mask): seeded shuffled order, no padding shards."""
        dataset = self.dataset("calibration")
        sampler = ShardSampler(len(dataset), shuffle=True, seed=self.seed, num_replicas=num_replicas, rank=rank)
        collate = ImageTextCollate(self.tokenizer, self.calibration_max_length)
        return self._loader(dataset, self.calibration_batch_size, collate, sampler=sampler)


class CalibrationDataModule(VLDataModule):
    """Image-caption data (CC3M/VG-style JSON) for calibration and for pretraining (train_dataloader)."""

    def __init__(
        self,
        calibration_json: str | list[str],
        image_root: str,
        tokenizer: str = "bert-base-uncased",
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 4,
        max_length: int = 30,
        skip_bad_records: bool = False,
        augment: bool = True,
        hflip: bool = True,
        crop_scale: tuple[float, float] = CALIBRATION_CROP_SCALE,
        seed: int = 0,
    ):
        super().__init__(
            image_root, tokenizer, image_size, batch_size, None, num_workers, max_length, skip_bad_records,
            augment, hflip, crop_scale, calibration_json=calibration_json, calibration_image_root=image_root,
            calibration_image_size=image_size, calibration_batch_size=batch_size,
            calibration_max_length=max_length, seed=seed,
        )
        self.calibration_crop_scale = self.crop_scale
        self.save_hyperparameters()

    def _build_dataset(self, split: str) -> Dataset:
        if split == "calibration":
            return self._calibration_dataset()
        if split == "train":
            return self.dataset("calibration")
        return super()._build_dataset(split)

    def setup(self, stage: str | None = None) -> None:
        """Build and check the records now, so bad data fails before training starts."""
        self.dataset("calibration")

    def train_dataloader(self) -> DataLoader:
        """Pretraining batches: same records and transform as calibration, shuffled, last partial batch dropped."""
        return self._train_loader(self.dataset("train"), ImageTextCollate(self.tokenizer, self.max_length))


class _KarpathyDataModule(VLDataModule):
    """COCO Karpathy layout: train records per caption, val/test records per image."""

    def __init__(self, train_json: JsonArg, val_json: JsonArg, test_json: JsonArg, image_root: str, **kwargs: Any):
        super().__init__(image_root, **kwargs)
        self.train_json, self.val_json, self.test_json = train_json, val_json, test_json

    def _build_dataset(self, split: str) -> Dataset:
        if split == "calibration":
            return self._calibration_dataset()
        if split == "train":
            return ImageTextDataset(self._require(self.train_json, "train_json"), self.image_root,
                                    self.train_transform(), self.skip_bad_records, prompt=self._prompt())
        if split in ("val", "test"):
            paths = self._require(self.val_json if split == "val" else self.test_json, f"{split}_json")
            return ImageCaptionsDataset(paths, self.image_root, self.test_transform(), self.skip_bad_records)
        return super()._build_dataset(split)

    def _prompt(self) -> str:
        return ""

    def setup(self, stage: str | None = None) -> None:
        """Build and check the records the stage needs (fit: train + val when given)."""
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], None: ["train", "val", "test"]}
        files = {"train": self.train_json, "val": self.val_json, "test": self.test_json}
        for split in wanted.get(stage, []):
            if files[split]:
                self.dataset(split)


class RetrievalDataModule(_KarpathyDataModule):
    """Image-text retrieval (COCO Karpathy): train batches with image_idx, eval batches with their captions."""

    def __init__(
        self,
        train_json: JsonArg = None,
        val_json: JsonArg = None,
        test_json: JsonArg = None,
        image_root: str = ".",
        tokenizer: str = "bert-base-uncased",
        image_size: int = 384,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        max_length: int = 35,
        skip_bad_records: bool = False,
        augment: bool = True,
        hflip: bool = True,
        crop_scale: tuple[float, float] = TASK_CROP_SCALE,
        calibration_json: JsonArg = None,
        calibration_image_root: str | None = None,
        calibration_image_size: int = 224,
        calibration_batch_size: int = 32,
        calibration_max_length: int = 30,
        seed: int = 0,
    ):
        super().__init__(
            train_json, val_json, test_json, image_root, tokenizer=tokenizer, image_size=image_size,
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
            max_length=max_length, skip_bad_records=skip_bad_records, augment=augment, hflip=hflip,
            crop_scale=crop_scale, calibration_json=calibration_json, calibration_image_root=calibration_image_root,
            calibration_image_size=calibration_image_size, calibration_batch_size=calibration_batch_size,
            calibration_max_length=calibration_max_length, seed=seed,
        )
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        """image, input_ids, attention_mask, image_idx (captions of one image are mutual positives)."""
        return self._train_loader(self.dataset("train"), ImageTextCollate(self.tokenizer, self.max_length, True))

    def val_dataloader(self) -> DataLoader:
        """Images with their captions: image, image_idx, text_input_ids/attention_mask, text_idx, text_image_idx."""
        return self._eval_loader(self.dataset("val"), RetrievalEvalCollate(self.tokenizer, self.max_length))

    def test_dataloader(self) -> DataLoader:
        """Same batches as val_dataloader, over the test split."""
        return self._eval_loader(self.dataset("test"), RetrievalEvalCollate(self.tokenizer, self.max_length))


class CaptionDataModule(_KarpathyDataModule):
    """Image captioning (COCO Karpathy): train text is prompt + caption; eval batches carry references."""

    def __init__(
        self,
        train_json: JsonArg = None,
        val_json: JsonArg = None,
        test_json: JsonArg = None,
        image_root: str = ".",
        tokenizer: str = "bert-base-uncased",
        image_size: int = 384,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        max_length: int = 40,
        skip_bad_records: bool = False,
        augment: bool = True,
        hflip: bool = True,
        crop_scale: tuple[float, float] = TASK_CROP_SCALE,
        prompt: str = "a picture of ",
        calibration_json: JsonArg = None,
        calibration_image_root: str | None = None,
        calibration_image_size: int = 224,
        calibration_batch_size: int = 32,
        calibration_max_length: int = 30,
        seed: int = 0,
    ):
        super().__init__(
            train_json, val_json, test_json, image_root, tokenizer=tokenizer, image_size=image_size,
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
            max_length=max_length, skip_bad_records=skip_bad_records, augment=augment, hflip=hflip,
            crop_scale=crop_scale, calibration_json=calibration_json, calibration_image_root=calibration_image_root,
            calibration_image_size=calibration_image_size, calibration_batch_size=calibration_batch_size,
            calibration_max_length=calibration_max_length, seed=seed,
        )
        self.prompt = prompt
        self.save_hyperparameters()

    def _prompt(self) -> str:
        return self.prompt

    @property
    def prompt_length(self) -> int:
        """Leading tokens of every train sequence that belong to [CLS] + prompt (excluded from the LM loss)."""
        return len(self.tokenizer(self.prompt)["input_ids"]) - 1

    def train_dataloader(self) -> DataLoader:
        """image, input_ids, attention_mask of "<prompt><caption>"."""
        return self._train_loader(self.dataset("train"), ImageTextCollate(self.tokenizer, self.max_length))

    def val_dataloader(self) -> DataLoader:
        """image, image_id (list[str]), captions (list[list[str]] references)."""
        return self._eval_loader(self.dataset("val"), caption_eval_collate)

    def test_dataloader(self) -> DataLoader:
        """Same batches as val_dataloader, over the test split."""
        return self._eval_loader(self.dataset("test"), caption_eval_collate)


class VQADataModule(VLDataModule):
    """VQA v2 (+ VG QA): weighted answers for training, question ids (+ answers) for evaluation."""

    def __init__(
        self,
        train_json: JsonArg = None,
        test_json: JsonArg = None,
        answer_list_json: str | None = None,
        image_root: str = ".",
        val_json: JsonArg = None,
        tokenizer: str = "bert-base-uncased",
        image_size: int = 384,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        max_length: int = 35,
        answer_max_length: int = 10,
        vg_answer_weight: float | None = None,
        skip_bad_records: bool = False,
        augment: bool = True,
        hflip: bool = True,
        crop_scale: tuple[float, float] = TASK_CROP_SCALE,
        calibration_json: JsonArg = None,
        calibration_image_root: str | None = None,
        calibration_image_size: int = 224,
        calibration_batch_size: int = 32,
        calibration_max_length: int = 30,
        seed: int = 0,
    ):
        super().__init__(
            image_root, tokenizer=tokenizer, image_size=image_size, batch_size=batch_size,
            eval_batch_size=eval_batch_size, num_workers=num_workers, max_length=max_length,
            skip_bad_records=skip_bad_records, augment=augment, hflip=hflip,
            crop_scale=crop_scale, calibration_json=calibration_json, calibration_image_root=calibration_image_root,
            calibration_image_size=calibration_image_size, calibration_batch_size=calibration_batch_size,
            calibration_max_length=calibration_max_length, seed=seed,
        )
        if answer_max_length < 3:
            raise ValueError(f"answer_max_length must hold [CLS] answer [SEP] (>= 3), got {answer_max_length}")
        self.train_json, self.val_json, self.test_json = train_json, val_json, test_json
        self.answer_list_json = answer_list_json
        self.answer_max_length = answer_max_length
        self.vg_answer_weight = vg_answer_weight
        self._answer_list: list[str] | None = None
        self.save_hyperparameters()

    @property
    def answer_list(self) -> list[str]:
        """Candidate answers ranked at inference, from answer_list_json (checked: non-empty strings)."""
        if self._answer_list is None:
            path = self._require(self.answer_list_json, "answer_list_json")
            try:
                with open(path, encoding="utf-8") as f:
                    answers = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataRecordError(f"{path}: cannot read answer list ({exc})") from None
            if not isinstance(answers, list) or not answers:
                raise DataRecordError(f"{path}: expected a non-empty JSON list of answer strings")
            for index, answer in enumerate(answers):
                if not isinstance(answer, str) or not answer.strip():
                    raise DataRecordError(f"{path}: record {index}: answer {answer!r} is not a non-empty string")
            self._answer_list = answers
        return self._answer_list

    def _build_dataset(self, split: str) -> Dataset:
        if split == "calibration":
            return self._calibration_dataset()
        if split == "train":
            return VQADataset(self._require(self.train_json, "train_json"), self.image_root,
                              self.train_transform(), train=True, skip_bad_records=self.skip_bad_records,
                              vg_answer_weight=self.vg_answer_weight)
        if split in ("val", "test"):
            paths = self._require(self.val_json if split == "val" else self.test_json, f"{split}_json")
            return VQADataset(paths, self.image_root, self.test_transform(), train=False,
                              skip_bad_records=self.skip_bad_records)
        return super()._build_dataset(split)

    def setup(self, stage: str | None = None) -> None:
        """Build and check the records (and the answer list) the stage needs."""
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], None: ["train", "val", "test"]}
        files = {"train": self.train_json, "val": self.val_json, "test": self.test_json}
        for split in wanted.get(stage, []):
            if files[split]:
                self.dataset(split)
        if self.answer_list_json:
            _ = self.answer_list

    def train_dataloader(self) -> DataLoader:
        """image, question_*, answer_* (A rows), answer_weights (A,), n_answers (B,)."""
        return self._train_loader(self.dataset("train"),
                                  VQATrainCollate(self.tokenizer, self.max_length, self.answer_max_length))

    def val_dataloader(self) -> DataLoader:
        """image, question_*, question_id, answers (when the file has them)."""
        return self._eval_loader(self.dataset("val"), VQAEvalCollate(self.tokenizer, self.max_length))

    def test_dataloader(self) -> DataLoader:
        """Same batches as val_dataloader, over the test split."""
        return self._eval_loader(self.dataset("test"), VQAEvalCollate(self.tokenizer, self.max_length))
