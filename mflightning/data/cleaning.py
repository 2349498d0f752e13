"""Caption and question cleaning: BLIP's (``records.clean_text``) or the MULTIFLOW authors' (their
``datasets/utils.py``: ``pre_caption`` / ``pre_question``), chosen per datamodule with ``text_cleaning``.

The authors' rules, written here from their definitions:
- captions: lowercase; ``, . ' ! ? " ( ) * # : ; ~`` deleted (not replaced by a space); ``-`` and ``/``
  become spaces; ``<person>`` becomes ``person``; runs of whitespace become one space; stripped; cut to
  the first ``max_words`` words; an empty result is an error.
- questions: the same deletions and ``-``/``/`` replacements, trailing spaces stripped, cut to
  ``max_words`` space-separated pieces; whitespace runs are NOT collapsed (so doubled spaces count as
  empty pieces, as in theirs).
Their word caps (``AUTHORS_MAX_WORDS``): retrieval captions 30 (train and test), captioning training
captions 40 (``max_tokens``), VQA questions 30 in training and 50 at test, calibration / pretraining
captions 40 (``max_words`` of their pruning loaders and captioning pretraining).
"""
from __future__ import annotations

import re
from functools import partial
from typing import Callable, Literal

from .records import clean_text

TextCleaning = Literal["blip", "authors"]

_DELETED = re.compile(r"([,.'!?\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")
AUTHORS_MAX_WORDS = {"calibration": 40, "retrieval": 30, "captioning": 40, "vqa_train": 30, "vqa_test": 50}


def authors_caption(caption: str, max_words: int) -> str:
    """The authors' ``pre_caption(caption, max_words)``."""
    text = _DELETED.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _SPACES.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    if not text:
        raise ValueError(f"caption {caption!r} is empty after cleaning")
    return text


def authors_question(question: str, max_words: int) -> str:
    """The authors' ``pre_question(question, max_words)``."""
    text = _DELETED.sub("", question.lower()).replace("-", " ").replace("/", " ").rstrip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def text_cleaner(style: TextCleaning, kind: str) -> Callable[[str], str]:
    """The cleaning of one kind of text (a key of ``AUTHORS_MAX_WORDS``) in ``style``: BLIP's ``clean_text``
    (no word cap) or the authors' function with their cap for that kind."""
    if style == "blip":
        return clean_text
    if style != "authors":
        raise ValueError(f"text_cleaning must be 'blip' or 'authors', got {style!r}")
    if kind not in AUTHORS_MAX_WORDS:
        raise ValueError(f"unknown text kind {kind!r}; known: {sorted(AUTHORS_MAX_WORDS)}")
    cap = AUTHORS_MAX_WORDS[kind]
    return partial(authors_question if kind.startswith("vqa") else authors_caption, max_words=cap)
