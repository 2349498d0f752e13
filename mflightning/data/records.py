"""Reading and checking the on-disk JSON record formats of docs/design.md.

Every check failure names the JSON file and the record index. With `skip_bad_records=True`
bad records are dropped and their number is logged as a warning (never silently).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("mflightning.data")

_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_SPACES = re.compile(r"\s+")
_COCO_FILE = re.compile(r"^COCO_[A-Za-z]+\d*_(\d+)$")


class DataRecordError(ValueError):
    """A dataset file or record is unusable; the message names the file and the record index."""


class RecordProblem(Exception):
    """Internal: what is wrong with one record (wrapped into DataRecordError with file and index)."""


def clean_text(text: str) -> str:
    """Lowercase, replace BLIP's stripped punctuation by spaces and collapse whitespace."""
    return _SPACES.sub(" ", _PUNCTUATION.sub(" ", text.lower())).strip()


@dataclass(frozen=True)
class CaptionRecord:
    """One image-caption pair (calibration/pretraining JSON, Karpathy train JSON)."""

    image: str
    caption: str
    image_id: str | None = None


@dataclass(frozen=True)
class CaptionsRecord:
    """One image with all its reference captions (Karpathy val/test JSON)."""

    image: str
    captions: tuple[str, ...]
    image_id: str


@dataclass(frozen=True)
class VQARecord:
    """One question about one image; answers are every human answer (repeats included) or None."""

    image: str
    question: str
    answers: tuple[str, ...] | None
    question_id: int | None
    dataset: str


def _field(record: Any, key: str, types: type | tuple[type, ...], required: bool = True) -> Any:
    """Fetch `record[key]` checking presence and type (bool is not accepted as int)."""
    if not isinstance(record, dict):
        raise RecordProblem(f"expected a JSON object, got {type(record).__name__}")
    if key not in record:
        if required:
            raise RecordProblem(f"missing key '{key}'")
        return None
    value = record[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = " or ".join(t.__name__ for t in _as_tuple(types))
        raise RecordProblem(f"key '{key}' has type {type(value).__name__}, expected {names}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _image(record: Any) -> str:
    path = _field(record, "image", str)
    if not path.strip():
        raise RecordProblem("empty image path")
    return path


def _text(record: Any, key: str, what: str) -> str:
    text = _field(record, key, str)
    if not clean_text(text):
        raise RecordProblem(f"empty {what}")
    return text


def parse_caption_record(record: Any) -> CaptionRecord:
    """`{"image": str, "caption": str[, "image_id": str|int]}`."""
    image = _image(record)
    caption = _text(record, "caption", "caption")
    image_id = _field(record, "image_id", (str, int), required=False)
    return CaptionRecord(image, caption, None if image_id is None else str(image_id))


def parse_captions_record(record: Any) -> CaptionsRecord:
    """`{"image": str, "caption": [str, ...][, "image_id": str|int]}`; image_id defaults to image_id_from_path."""
    image = _image(record)
    captions = _field(record, "caption", list)
    if not captions:
        raise RecordProblem("empty caption list")
    for j, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise RecordProblem(f"caption {j} has type {type(caption).__name__}, expected str")
        if not clean_text(caption):
            raise RecordProblem(f"empty caption (caption {j})")
    image_id = _field(record, "image_id", (str, int), required=False)
    if image_id is None:
        image_id = image_id_from_path(image)
    return CaptionsRecord(image, tuple(captions), str(image_id))


def image_id_from_path(image: str) -> str:
    """COCO's numeric id for "COCO_val2014_000000391895.jpg" ("391895"), else the file name without extension."""
    stem = os.path.splitext(os.path.basename(image))[0]
    match = _COCO_FILE.match(stem)
    return str(int(match.group(1))) if match else stem


def _answers(record: Any, required: bool) -> tuple[str, ...] | None:
    answers = _field(record, "answer", (list, str), required=required)
    if answers is None:
        return None
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise RecordProblem("empty answer list")
    for j, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise RecordProblem(f"answer {j} has type {type(answer).__name__}, expected str")
        if not answer.strip():
            raise RecordProblem(f"empty answer (answer {j})")
    return tuple(answers)


def _dataset_name(record: Any) -> str:
    name = _field(record, "dataset", str, required=False) or "vqa"
    if name not in ("vqa", "vg"):
        raise RecordProblem(f"key 'dataset' is {name!r}, expected 'vqa' or 'vg'")
    return name


def parse_vqa_train_record(record: Any) -> VQARecord:
    """`{"image", "question", "answer": [str, ...] (or one str)[, "question_id": int, "dataset": "vqa"|"vg"]}`."""
    image = _image(record)
    question = _text(record, "question", "question")
    answers = _answers(record, required=True)
    question_id = _field(record, "question_id", int, required=False)
    return VQARecord(image, question, answers, question_id, _dataset_name(record))


def parse_vqa_test_record(record: Any) -> VQARecord:
    """`{"question_id": int, "image", "question"[, "answer": [str, ...]]}`."""
    question_id = _field(record, "question_id", int)
    image = _image(record)
    question = _text(record, "question", "question")
    answers = _answers(record, required=False)
    return VQARecord(image, question, answers, question_id, _dataset_name(record))


def load_json_list(path: str | os.PathLike) -> list:
    """Read a JSON file holding a list of records; errors name the file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataRecordError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataRecordError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, list):
        raise DataRecordError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def resolve_image(image_root: str | os.PathLike, image: str) -> str:
    """Image path of a record: relative paths are joined to image_root, absolute ones kept."""
    return os.path.join(os.fspath(image_root), image)


@dataclass(frozen=True)
class Loaded:
    """A checked record with where it came from (for error messages at image-load time)."""

    record: Any
    source: str
    index: int
    image_path: str


def load_records(
    json_paths: str | os.PathLike | Sequence[str | os.PathLike],
    image_root: str | os.PathLike,
    parse: Callable[[Any], Any],
    skip_bad_records: bool = False,
) -> list[Loaded]:
    """Parse and check every record of one or more JSON files (keys, types, empty text, image exists)."""
    if isinstance(json_paths, (str, os.PathLike)):
        json_paths = [json_paths]
    if not json_paths:
        raise ValueError("no JSON file given")
    exists: dict[str, bool] = {}
    loaded: list[Loaded] = []
    for json_path in json_paths:
        json_path = os.fspath(json_path)
        records = load_json_list(json_path)
        bad: list[tuple[int, str]] = []
        for index, raw in enumerate(records):
            try:
                record = parse(raw)
                image_path = resolve_image(image_root, record.image)
                if image_path not in exists:
                    exists[image_path] = os.path.isfile(image_path)
                if not exists[image_path]:
                    raise RecordProblem(f"image file not found: {image_path}")
            except RecordProblem as problem:
                if not skip_bad_records:
                    raise DataRecordError(f"{json_path}: record {index}: {problem}") from None
                bad.append((index, str(problem)))
                continue
            loaded.append(Loaded(record, json_path, index, image_path))
        if bad:
            first_index, first_problem = bad[0]
            log.warning(
                "%s: skipped %d of %d bad records (first: record %d: %s)",
                json_path, len(bad), len(records), first_index, first_problem,
            )
    if not loaded:
        raise DataRecordError(f"{', '.join(map(os.fspath, json_paths))}: no usable records")
    return loaded
