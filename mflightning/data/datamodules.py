"""LightningDataModules for calibration/pretraining, retrieval, captioning and VQA (design.md formats).

Calibration: every task datamodule takes an optional `calibration: CalibrationConfig`
(image-caption records, never task data; recipe keys `data.calibration.json`,
`data.calibration.batch_size`, ...) and then offers `calibration_dataloader()`, used by
MultiFlowCallback. `CalibrationDataModule` is made of calibration data alone (and serves
pretraining from the same records), so it takes those settings as its own arguments.

Arguments: `VLDataModule.__init__` (datamodule_base.py) holds the loader arguments every
datamodule shares; each datamodule declares only its own (record files, task options, defaults
that differ) and passes the rest on as `**kwargs`. jsonargparse (LightningCLI, `mflightning
check`, `--print_config`) follows `**kwargs` into `super().__init__`, so every argument, with its
type and default, is still a recipe key (`tests/data/test_data_datamodules.py` checks that).
"""

from __future__ import annotations

import json
from typing import Any

from torch.utils.data import DataLoader, Dataset

from .datamodule_base import CalibrationConfig, JsonArg, ShardSampler, VLDataModule
from .datasets import (
    VG_ANSWER_WEIGHT,
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
from .transforms import CALIBRATION_CROP_SCALE

__all__ = [
    "CalibrationConfig", "CalibrationDataModule", "CaptionDataModule", "RetrievalDataModule", "ShardSampler",
    "VLDataModule", "VQADataModule",
]


class CalibrationDataModule(VLDataModule):
    """Image-caption data (CC3M/VG-style JSON) for calibration and for pretraining (train_dataloader).

    Its images, batches and text length are those of its calibration data, so it takes them as
    its own arguments (recipe keys `data.calibration_json`, `data.image_size`, ...).

    Args:
        calibration_json: image-caption records (a JSON file or a list of them).
        image_root: folder the records' image paths are relative to.
        image_size: side of the square images.
        batch_size: images per batch (calibration and pretraining).
        max_length: caption tokens per row (padded or truncated).
        crop_scale: RandomResizedCrop scale range of the images.
        pair_sources: calibration batches are steps of `batch_size` rows from each record file (the MULTIFLOW
            code's CC3M + VG pairs; `CalibrationConfig.pair_sources`); pretraining batches are not paired.
        add_sep: calibration texts end with [SEP] (BLIP); False: [CLS] + up to max_length - 1 tokens (XVLM).
        **kwargs: tokenizer, num_workers, skip_bad_records, augment, hflip, seed (as `VLDataModule`).
    """

    derived_arguments = ("eval_batch_size", "calibration")

    def __init__(self, calibration_json: str | list[str], image_root: str, image_size: int = 224, batch_size: int = 32,
                 max_length: int = 30, crop_scale: tuple[float, float] = CALIBRATION_CROP_SCALE,
                 pair_sources: bool = False, add_sep: bool = True, **kwargs: Any):
        calibration = CalibrationConfig(calibration_json, image_root, image_size, batch_size, max_length, crop_scale,
                                        pair_sources, add_sep)
        super().__init__(image_root, image_size=image_size, batch_size=batch_size, eval_batch_size=None,
                         max_length=max_length, crop_scale=crop_scale, calibration=calibration, **kwargs)

    def _build_dataset(self, split: str) -> Dataset:
        if split == "train":
            if self.calibration.pair_sources:  # pretraining reads one shuffled list of all records
                return self._calibration_records(self.calibration.json, self.seed)
            return self.dataset("calibration")
        return super()._build_dataset(split)

    def _setup_splits(self, stage: str | None) -> list[str]:
        """Every stage checks the calibration records (the only ones)."""
        return ["calibration"]

    def train_dataloader(self) -> DataLoader:
        """Pretraining batches: same records and transform as calibration, shuffled, last partial batch dropped."""
        return self._train_loader(self.dataset("train"), ImageTextCollate(self.tokenizer, self.max_length))


class _KarpathyDataModule(VLDataModule):
    """COCO Karpathy layout: train records per caption, val/test records per image.

    Args:
        train_json: training records, one per caption (a JSON file or a list of them).
        val_json: validation records, one per image with all its captions.
        test_json: test records, one per image with all its captions.
        image_root: folder the records' image paths are relative to.
        **kwargs: the arguments of `VLDataModule` (tokenizer, image_size, batch_size, calibration, ...).
    """

    def __init__(self, train_json: JsonArg = None, val_json: JsonArg = None, test_json: JsonArg = None,
                 image_root: str = ".", **kwargs: Any):
        super().__init__(image_root, **kwargs)
        self.train_json, self.val_json, self.test_json = train_json, val_json, test_json

    #: Whose word cap the authors' text cleaning applies to the captions (``cleaning.AUTHORS_MAX_WORDS``).
    text_kind = "retrieval"

    def _build_dataset(self, split: str) -> Dataset:
        if split == "train":
            return ImageTextDataset(self._records("train"), self.image_root, self.train_transform(),
                                    self.skip_bad_records, prompt=self._prompt(), clean=self.cleaner(self.text_kind))
        if split in ("val", "test"):
            return ImageCaptionsDataset(self._records(split), self.image_root, self.test_transform(),
                                        self.skip_bad_records, clean=self.cleaner(self.text_kind))
        return super()._build_dataset(split)

    def _prompt(self) -> str:
        return ""


class RetrievalDataModule(_KarpathyDataModule):
    """Image-text retrieval (COCO Karpathy): train batches with image_idx, eval batches with their captions.

    Arguments: those of `_KarpathyDataModule` (train_json, val_json, test_json, image_root) and of
    `VLDataModule`.
    """

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
    """Image captioning (COCO Karpathy): train text is prompt + caption; eval batches carry references.

    Args:
        train_json, val_json, test_json, image_root: as `_KarpathyDataModule`.
        max_length: text tokens per row, prompt included.
        prompt: text put before every training caption (kept out of the LM loss by the task).
        **kwargs: the other arguments of `VLDataModule`.
    """

    def __init__(self, train_json: JsonArg = None, val_json: JsonArg = None, test_json: JsonArg = None,
                 image_root: str = ".", max_length: int = 40, prompt: str = "a picture of ", **kwargs: Any):
        super().__init__(train_json, val_json, test_json, image_root, max_length=max_length, **kwargs)
        self.prompt = prompt

    text_kind = "captioning"

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
    """VQA v2 (+ VG QA): weighted answers for training, question ids (+ answers) for evaluation.

    Args:
        train_json: training questions with their answers (a JSON file or a list: VQA v2 train, val, VG QA).
        test_json: test questions (answers optional, for local evaluation).
        answer_list_json: the candidate answers ranked at inference (a JSON list of strings).
        image_root: folder the records' image paths are relative to.
        val_json: validation questions.
        answer_max_length: answer tokens per row, [CLS] and [SEP] included (>= 3).
        vg_answer_weight: weight of each VG QA answer: 0.5 as the MultiFlow authors (None: count / number
            of answers, as VQA's).
        answer_suffix: text appended to every training answer ("[SEP]" in the authors' data: their answers
            end with two [SEP] tokens; "" here by default).
        **kwargs: the arguments of `VLDataModule` (tokenizer, image_size, batch_size, calibration, ...).

    Training images are flipped (`hflip`) only when neither the question nor an answer mentions left
    or right, as the authors do (`VQADataset`): the flip happens in the dataset, not in the transform.
    """

    def __init__(self, train_json: JsonArg = None, test_json: JsonArg = None, answer_list_json: str | None = None,
                 image_root: str = ".", val_json: JsonArg = None, answer_max_length: int = 10,
                 vg_answer_weight: float | None = VG_ANSWER_WEIGHT, answer_suffix: str = "", **kwargs: Any):
        super().__init__(image_root, **kwargs)
        if answer_max_length < 3:
            raise ValueError(f"answer_max_length must hold [CLS] answer [SEP] (>= 3), got {answer_max_length}")
        self.train_json, self.val_json, self.test_json = train_json, val_json, test_json
        self.answer_list_json = answer_list_json
        self.answer_max_length = answer_max_length
        self.vg_answer_weight = vg_answer_weight
        self.answer_suffix = answer_suffix
        self._answer_list: list[str] | None = None

    @property
    def answer_list(self) -> list[str]:
        """Candidate answers ranked at inference, from answer_list_json (checked: non-empty strings)."""
        if self._answer_list is None:
            path = self.answer_list_json
            if not path:
                raise ValueError(f"{type(self).__name__} was given no answer_list_json")
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
        if split == "train":
            # the dataset flips, skipping questions about left and right: the transform must not flip
            return VQADataset(self._records("train"), self.image_root, self.train_transform(hflip=False), train=True,
                              skip_bad_records=self.skip_bad_records, vg_answer_weight=self.vg_answer_weight,
                              hflip=self.hflip, clean=self.cleaner("vqa_train"))
        if split in ("val", "test"):
            return VQADataset(self._records(split), self.image_root, self.test_transform(), train=False,
                              skip_bad_records=self.skip_bad_records, clean=self.cleaner("vqa_test"))
        return super()._build_dataset(split)

    def setup(self, stage: str | None = None) -> None:
        """The shared setup, then the answer list (when given) is read and checked too."""
        super().setup(stage)
        if self.answer_list_json:
            _ = self.answer_list

    def train_dataloader(self) -> DataLoader:
        """image, question_*, answer_* (A rows), answer_weights (A,), n_answers (B,)."""
        return self._train_loader(self.dataset("train"),
                                  VQATrainCollate(self.tokenizer, self.max_length, self.answer_max_length,
                                                  self.answer_suffix))

    def val_dataloader(self) -> DataLoader:
        """image, question_*, question_id, answers (when the file has them)."""
        return self._eval_loader(self.dataset("val"), VQAEvalCollate(self.tokenizer, self.max_length))

    def test_dataloader(self) -> DataLoader:
        """Same batches as val_dataloader, over the test split."""
        return self._eval_loader(self.dataset("test"), VQAEvalCollate(self.tokenizer, self.max_length))
