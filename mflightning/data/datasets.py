"""Map-style datasets over checked records, and the collate functions that build design.md batches.

Text is tokenized in the collate functions: `[CLS] text [SEP]`, padded/truncated to `max_length`.
The first token stays `[CLS]`; models swap in `[ENC]`/`[DEC]` themselves, as BLIP does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from .records import (
    DataRecordError,
    Loaded,
    clean_text,
    load_records,
    parse_caption_record,
    parse_captions_record,
    parse_vqa_test_record,
    parse_vqa_train_record,
)

log = logging.getLogger("mflightning.data")

JsonPaths = str | os.PathLike | Sequence[str | os.PathLike]


def seeded_transform(transform: Callable, image: Any, seed: int | None, index: int) -> Any:
    """`transform(image)`; with a `seed`, its randomness drawn from torch's RNG seeded with (seed, index), the
    global RNG left as it was: item `index` gets the same crop every pass, in any process or loader worker."""
    if seed is None:
        return transform(image)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + index)
        return transform(image)


class _ImageDataset(Dataset):
    """Shared image loading: decode errors name the image and its record; skip mode returns None."""

    def __init__(self, items: list[Loaded], transform: Callable, skip_bad_records: bool,
                 augment_seed: int | None = None):
        self.items = items
        self.transform = transform
        self.skip_bad_records = skip_bad_records
        self.num_load_failures = 0
        # When set, item i's random transform draws from torch's RNG seeded with (augment_seed, i) and the
        # global RNG is left as it was: the same crops every pass, in any process or loader worker.
        self.augment_seed = augment_seed

    def __len__(self) -> int:
        return len(self.items)

    def load_image(self, index: int) -> torch.Tensor | None:
        """Decode and transform the image of item `index` (None in skip mode when it cannot be decoded)."""
        item = self.items[index]
        try:
            with Image.open(item.image_path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            message = f"{item.source}: record {item.index}: cannot decode image {item.image_path} ({exc})"
            if not self.skip_bad_records:
                raise DataRecordError(message) from None
            self.num_load_failures += 1
            log.warning("skipping record (%d load failures in this process so far): %s",
                        self.num_load_failures, message)
            return None
        return seeded_transform(self.transform, image, self.augment_seed, index)


class ImageTextDataset(_ImageDataset):
    """Image-caption pairs, one item per caption (calibration, pretraining, Karpathy train).

    Items: `image`, `text` (prompt + cleaned caption), `image_idx` (consecutive index of the
    image, from `image_id` when records have one, else from the image path). `augment_seed`: item i's
    random transform is seeded with (augment_seed, i) (calibration: the same crops every pass).
    """

    def __init__(self, json_paths: JsonPaths, image_root: str, transform: Callable,
                 skip_bad_records: bool = False, prompt: str = "", augment_seed: int | None = None):
        items = load_records(json_paths, image_root, parse_caption_record, skip_bad_records)
        super().__init__(items, transform, skip_bad_records, augment_seed)
        self.prompt = prompt
        self.texts = [prompt + clean_text(item.record.caption) for item in items]
        image_index: dict[str, int] = {}
        self.image_idx = []
        for item in items:
            key = item.record.image_id if item.record.image_id is not None else item.image_path
            self.image_idx.append(image_index.setdefault(key, len(image_index)))
        self.num_images = len(image_index)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image = self.load_image(index)
        if image is None:
            return None
        return {"image": image, "text": self.texts[index], "image_idx": self.image_idx[index]}


class ImageCaptionsDataset(_ImageDataset):
    """One item per image with all its captions (Karpathy val/test), with global caption indices.

    `texts[t]` is caption t (cleaned), `text_image_idx[t]` its image; items carry `image_idx`,
    `text_idx` (their captions' global indices), cleaned `texts`, raw `references` and `image_id`.
    """

    def __init__(self, json_paths: JsonPaths, image_root: str, transform: Callable,
                 skip_bad_records: bool = False):
        items = load_records(json_paths, image_root, parse_captions_record, skip_bad_records)
        super().__init__(items, transform, skip_bad_records)
        seen: dict[str, Loaded] = {}
        for item in items:
            other = seen.setdefault(item.record.image_id, item)
            if other is not item:
                raise DataRecordError(
                    f"{item.source}: record {item.index}: image_id {item.record.image_id!r} already used by "
                    f"record {other.index} of {other.source} (eval files hold one record per image)"
                )
        self.texts: list[str] = []
        self.text_image_idx: list[int] = []
        self.text_idx: list[list[int]] = []
        for image_idx, item in enumerate(items):
            start = len(self.texts)
            self.texts += [clean_text(c) for c in item.record.captions]
            self.text_image_idx += [image_idx] * len(item.record.captions)
            self.text_idx.append(list(range(start, len(self.texts))))
        self.num_images = len(items)
        self.num_texts = len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image = self.load_image(index)
        if image is None:
            return None
        record = self.items[index].record
        return {
            "image": image,
            "image_idx": index,
            "image_id": record.image_id,
            "text_idx": self.text_idx[index],
            "texts": [self.texts[t] for t in self.text_idx[index]],
            "references": [c.strip() for c in record.captions],
        }


class VQADataset(_ImageDataset):
    """VQA questions. Train items: unique `answers` with weights count/len(answers) (or a fixed
    `vg_answer_weight` for VG records, as BLIP does); eval items: `question_id` and, when the
    file has them, the raw human `answers`."""

    def __init__(self, json_paths: JsonPaths, image_root: str, transform: Callable, train: bool,
                 skip_bad_records: bool = False, vg_answer_weight: float | None = None):
        parse = parse_vqa_train_record if train else parse_vqa_test_record
        items = load_records(json_paths, image_root, parse, skip_bad_records)
        super().__init__(items, transform, skip_bad_records)
        self.train = train
        self.vg_answer_weight = vg_answer_weight
        self.questions = [clean_text(item.record.question) for item in items]
        with_answers = [item.record.answers is not None for item in items]
        self.has_answers = all(with_answers)
        if not train and any(with_answers) and not self.has_answers:
            first = items[with_answers.index(False)]
            raise DataRecordError(
                f"{first.source}: record {first.index}: has no 'answer' while other test records do "
                "(a test file has answers on every record or on none)"
            )

    def answer_weights(self, index: int) -> tuple[list[str], list[float]]:
        """Unique answers of question `index` (first-seen order) and their weights."""
        record = self.items[index].record
        answers = [a.strip() for a in record.answers]
        unique = list(dict.fromkeys(answers))
        if record.dataset == "vg" and self.vg_answer_weight is not None:
            return unique, [float(self.vg_answer_weight)] * len(unique)
        return unique, [answers.count(a) / len(answers) for a in unique]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image = self.load_image(index)
        if image is None:
            return None
        record = self.items[index].record
        item = {"image": image, "question": self.questions[index]}
        if self.train:
            item["answers"], item["weights"] = self.answer_weights(index)
        else:
            item["question_id"] = record.question_id
            if self.has_answers:
                item["answers"] = [a.strip() for a in record.answers]
        return item


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[CLS] text [SEP]` ids and attention mask, padded/truncated to max_length, as long tensors."""
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return encoded["input_ids"].long(), encoded["attention_mask"].long()


def _present(items: list[dict | None]) -> list[dict]:
    """Drop items whose image failed to load in skip mode; a batch with none left is an error."""
    kept = [item for item in items if item is not None]
    if not kept:
        raise DataRecordError(f"all {len(items)} records of this batch failed to load (see the warnings above)")
    return kept


class ImageTextCollate:
    """Batch: image, input_ids, attention_mask (+ image_idx when `with_image_idx`)."""

    def __init__(self, tokenizer, max_length: int, with_image_idx: bool = False):
        self.tokenizer, self.max_length, self.with_image_idx = tokenizer, max_length, with_image_idx

    def __call__(self, items: list[dict | None]) -> dict[str, Any]:
        items = _present(items)
        input_ids, attention_mask = tokenize(self.tokenizer, [i["text"] for i in items], self.max_length)
        batch = {"image": torch.stack([i["image"] for i in items]),
                 "input_ids": input_ids, "attention_mask": attention_mask}
        if self.with_image_idx:
            batch["image_idx"] = torch.tensor([i["image_idx"] for i in items], dtype=torch.long)
        return batch


class RetrievalEvalCollate:
    """Batch: images with their captions (text_*), global text_idx and text_image_idx."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict | None]) -> dict[str, Any]:
        items = _present(items)
        texts = [t for i in items for t in i["texts"]]
        input_ids, attention_mask = tokenize(self.tokenizer, texts, self.max_length)
        return {
            "image": torch.stack([i["image"] for i in items]),
            "image_idx": torch.tensor([i["image_idx"] for i in items], dtype=torch.long),
            "text_input_ids": input_ids,
            "text_attention_mask": attention_mask,
            "text_idx": torch.tensor([t for i in items for t in i["text_idx"]], dtype=torch.long),
            "text_image_idx": torch.tensor([i["image_idx"] for i in items for _ in i["texts"]], dtype=torch.long),
        }


def caption_eval_collate(items: list[dict | None]) -> dict[str, Any]:
    """Batch: image, image_id (list[str]), captions (list[list[str]] raw references)."""
    items = _present(items)
    return {"image": torch.stack([i["image"] for i in items]),
            "image_id": [i["image_id"] for i in items],
            "captions": [i["references"] for i in items]}


class VQATrainCollate:
    """Batch: image, question_*, answer_* (A rows), answer_weights (A,), n_answers (B,)."""

    def __init__(self, tokenizer, max_length: int, answer_max_length: int):
        self.tokenizer, self.max_length, self.answer_max_length = tokenizer, max_length, answer_max_length

    def __call__(self, items: list[dict | None]) -> dict[str, Any]:
        items = _present(items)
        question_ids, question_mask = tokenize(self.tokenizer, [i["question"] for i in items], self.max_length)
        answers = [a for i in items for a in i["answers"]]
        answer_ids, answer_mask = tokenize(self.tokenizer, answers, self.answer_max_length)
        return {
            "image": torch.stack([i["image"] for i in items]),
            "question_input_ids": question_ids,
            "question_attention_mask": question_mask,
            "answer_input_ids": answer_ids,
            "answer_attention_mask": answer_mask,
            "answer_weights": torch.tensor([w for i in items for w in i["weights"]], dtype=torch.float32),
            "n_answers": torch.tensor([len(i["answers"]) for i in items], dtype=torch.long),
        }


class VQAEvalCollate:
    """Batch: image, question_*, question_id (list[int]) and, when known, answers (list[list[str]])."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict | None]) -> dict[str, Any]:
        items = _present(items)
        question_ids, question_mask = tokenize(self.tokenizer, [i["question"] for i in items], self.max_length)
        batch = {"image": torch.stack([i["image"] for i in items]),
                 "question_input_ids": question_ids,
                 "question_attention_mask": question_mask,
                 "question_id": [i["question_id"] for i in items]}
        if all("answers" in i for i in items):
            batch["answers"] = [i["answers"] for i in items]
        return batch
