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
from torchvision.transforms.functional import hflip

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


def cleaned(clean: Callable[[str], str], text: str, item: Loaded) -> str:
    """``clean(text)``; a text it refuses (empty after cleaning) is an error naming the file and record."""
    try:
        return clean(text)
    except ValueError as exc:
        raise DataRecordError(f"{item.source}: record {item.index}: {exc}") from None


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
        return seeded_transform(lambda im: self.augment(index, im), image, self.augment_seed, index)

    def augment(self, index: int, image: Image.Image) -> torch.Tensor:
        """The transform of item `index`'s decoded image (a dataset may add item-dependent steps)."""
        return self.transform(image)


class ImageTextDataset(_ImageDataset):
    """Image-caption pairs, one item per caption (calibration, pretraining, Karpathy train).

    Items: `image`, `text` (prompt + cleaned caption), `image_idx` (consecutive index of the
    image, from `image_id` when records have one, else from the image path). `augment_seed`: item i's
    random transform is seeded with (augment_seed, i) (calibration: the same crops every pass).
    """

    def __init__(self, json_paths: JsonPaths, image_root: str, transform: Callable,
                 skip_bad_records: bool = False, prompt: str = "", augment_seed: int | None = None,
                 clean: Callable[[str], str] = clean_text):
        items = load_records(json_paths, image_root, parse_caption_record, skip_bad_records)
        super().__init__(items, transform, skip_bad_records, augment_seed)
        self.prompt = prompt
        self.texts = [prompt + cleaned(clean, item.record.caption, item) for item in items]
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
                 skip_bad_records: bool = False, clean: Callable[[str], str] = clean_text):
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
            self.texts += [cleaned(clean, c, item) for c in item.record.captions]
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


#: Weight of each Visual Genome answer in VQA training (the MultiFlow authors' `datasets/vqa_dataset.py`).
VG_ANSWER_WEIGHT = 0.5


def mentions_left_or_right(question: str, answers: Sequence[str] = ()) -> bool:
    """True when the question or an answer contains "left" or "right" (a substring test, as the authors'
    `left_or_right_in`, here case-insensitive): flipping such an image would make its label wrong."""
    return any("left" in text.lower() or "right" in text.lower() for text in (question, *answers))


class VQADataset(_ImageDataset):
    """VQA questions. Train items: unique `answers` with weights count/len(answers) (or a fixed
    `vg_answer_weight` for VG records: the authors' 0.5, `VG_ANSWER_WEIGHT`); eval items: `question_id`
    and, when the file has them, the raw human `answers`.

    `hflip` (training only): the image is flipped with probability 0.5 before `transform` (which must
    not flip), except when the question or an answer mentions left or right (`mentions_left_or_right`),
    as the authors' VQA data does; a flip there would make the answer wrong.
    """

    def __init__(self, json_paths: JsonPaths, image_root: str, transform: Callable, train: bool,
                 skip_bad_records: bool = False, vg_answer_weight: float | None = VG_ANSWER_WEIGHT,
                 hflip: bool = False, clean: Callable[[str], str] = clean_text):
        parse = parse_vqa_train_record if train else parse_vqa_test_record
        items = load_records(json_paths, image_root, parse, skip_bad_records)
        super().__init__(items, transform, skip_bad_records)
        self.train = train
        if vg_answer_weight is not None and not vg_answer_weight > 0:
            raise ValueError(f"vg_answer_weight must be positive or None, got {vg_answer_weight}")
        self.vg_answer_weight = vg_answer_weight
        self.hflip = bool(hflip) and train
        self.questions = [cleaned(clean, item.record.question, item) for item in items]
        with_answers = [item.record.answers is not None for item in items]
        self.has_answers = all(with_answers)
        if not train and any(with_answers) and not self.has_answers:
            first = items[with_answers.index(False)]
            raise DataRecordError(
                f"{first.source}: record {first.index}: has no 'answer' while other test records do "
                "(a test file has answers on every record or on none)"
            )

    def may_flip(self, index: int) -> bool:
        """Whether item `index`'s training image may be flipped (no left/right in its question or answers)."""
        record = self.items[index].record
        return self.hflip and not mentions_left_or_right(record.question, record.answers or ())

    def augment(self, index: int, image: Image.Image) -> torch.Tensor:
        # the coin is drawn for every item, as the authors do, so the other random draws do not depend on the text
        if self.hflip and bool(torch.rand(()) < 0.5) and self.may_flip(index):
            image = hflip(image)
        return self.transform(image)

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


def tokenize(tokenizer, texts: list[str], max_length: int, add_sep: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`[CLS] text [SEP]` ids and attention mask, padded/truncated to max_length, as long tensors.

    `add_sep=False`: `[CLS]` and up to `max_length - 1` text tokens, no `[SEP]` (the XVLM code's
    pretraining texts, which the MULTIFLOW code calibrates XVLM on).
    """
    if add_sep:
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return encoded["input_ids"].long(), encoded["attention_mask"].long()
    pieces = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length - 1)["input_ids"]
    input_ids = torch.full((len(texts), max_length), int(tokenizer.pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros(len(texts), max_length, dtype=torch.long)
    for row, ids in enumerate(pieces):
        tokens = [tokenizer.cls_token_id, *ids]
        input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, : len(tokens)] = 1
    return input_ids, attention_mask


def _present(items: list[dict | None]) -> list[dict]:
    """Drop items whose image failed to load in skip mode; a batch with none left is an error."""
    kept = [item for item in items if item is not None]
    if not kept:
        raise DataRecordError(f"all {len(items)} records of this batch failed to load (see the warnings above)")
    return kept


class ImageTextCollate:
    """Batch: image, input_ids, attention_mask (+ image_idx when `with_image_idx`); `add_sep` as `tokenize`."""

    def __init__(self, tokenizer, max_length: int, with_image_idx: bool = False, add_sep: bool = True):
        self.tokenizer, self.max_length, self.with_image_idx = tokenizer, max_length, with_image_idx
        self.add_sep = add_sep

    def __call__(self, items: list[dict | None]) -> dict[str, Any]:
        items = _present(items)
        input_ids, attention_mask = tokenize(self.tokenizer, [i["text"] for i in items], self.max_length, self.add_sep)
        batch = {"image": torch.stack([i["image"] for i in items]),
                 "input_ids": input_ids, "attention_mask": attention_mask}
        if self.with_image_idx:
            batch["image_idx"] = torch.tensor([i["image_idx"] for i in items], dtype=torch.long)
        return batch


class PairedSteps(Dataset):
    """Calibration steps over several sources (e.g. CC3M and Visual Genome), as the MULTIFLOW code pairs them:
    step s holds batch s of every source, each source in its own seeded shuffled order.

    Source k is shuffled with seed `seed + k`; there are as many steps as the shortest source has batches
    (its last one may be partial), like Lightning's `CombinedLoader(mode="min_size")` over one loader per
    source. An item is the list, per source, of that source's items of the step (`PairedCollate` batches it).
    """

    def __init__(self, sources: Sequence[Dataset], batch_size: int, seed: int = 0):
        if len(sources) < 2:
            raise ValueError(f"paired calibration needs at least two sources (record files), got {len(sources)}")
        empty = [k for k, source in enumerate(sources) if len(source) == 0]
        if empty:
            raise ValueError(f"paired calibration: source(s) {empty} hold no records")
        self.sources, self.batch_size = list(sources), batch_size
        self.orders = [torch.randperm(len(source), generator=torch.Generator().manual_seed(seed + k)).tolist()
                       for k, source in enumerate(self.sources)]
        self.num_steps = min(-(-len(source) // batch_size) for source in self.sources)

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> list[list[dict | None]]:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside 0..{self.num_steps - 1}")
        window = slice(step * self.batch_size, (step + 1) * self.batch_size)
        return [[source[i] for i in order[window]] for source, order in zip(self.sources, self.orders)]


class PairedCollate:
    """One batch per calibration step: each source's batch (`collate`), concatenated in source order, with
    `segments` = the row count of each source's part (its pruning loss is taken per part)."""

    def __init__(self, collate: Callable[[list[dict | None]], dict[str, Any]]):
        self.collate = collate

    def __call__(self, parts: list[list[dict | None]]) -> dict[str, Any]:
        batches = [self.collate(items) for items in parts]
        paired = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
        paired["segments"] = [int(b["input_ids"].size(0)) for b in batches]
        return paired


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
    """Batch: image, question_*, answer_* (A rows), answer_weights (A,), n_answers (B,).

    `answer_suffix` is appended to every answer's text before tokenizing (the authors append "[SEP]",
    so their answers read `[CLS] answer [SEP] [SEP]`)."""

    def __init__(self, tokenizer, max_length: int, answer_max_length: int, answer_suffix: str = ""):
        self.tokenizer, self.max_length, self.answer_max_length = tokenizer, max_length, answer_max_length
        self.answer_suffix = answer_suffix

    def __call__(self, items: list[dict | None]) -> dict[str, Any]:
        items = _present(items)
        question_ids, question_mask = tokenize(self.tokenizer, [i["question"] for i in items], self.max_length)
        answers = [a + self.answer_suffix for i in items for a in i["answers"]]
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
