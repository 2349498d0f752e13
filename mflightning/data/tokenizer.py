"""BERT WordPiece tokenizer with BLIP's extra special tokens ([DEC] as bos, [ENC])."""

from __future__ import annotations

import os
from collections.abc import Iterable

from transformers import BertTokenizer

BASE_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"


def build_tokenizer(name_or_path: str) -> BertTokenizer:
    """Load a BERT tokenizer (vocab.txt file, local directory or hub name) and add [DEC]/[ENC].

    The result has `bos_token == "[DEC]"`, `bos_token_id`, and an `enc_token_id` attribute;
    `len(tokenizer)` is the vocabulary size a model's word embeddings must have.
    """
    name_or_path = os.fspath(name_or_path)
    if os.path.isfile(name_or_path):
        tokenizer = BertTokenizer(vocab=name_or_path)
    elif os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "vocab.txt")) and not os.path.isfile(
            os.path.join(name_or_path, "tokenizer.json")
        ):
            raise FileNotFoundError(f"tokenizer directory {name_or_path} has neither vocab.txt nor tokenizer.json")
        tokenizer = BertTokenizer.from_pretrained(name_or_path)
    else:
        tokenizer = BertTokenizer.from_pretrained(name_or_path)
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
    tokenizer.dec_token_id = tokenizer.bos_token_id
    if tokenizer.enc_token_id == tokenizer.unk_token_id or tokenizer.dec_token_id == tokenizer.unk_token_id:
        raise RuntimeError(f"could not register {DEC_TOKEN}/{ENC_TOKEN} in tokenizer {name_or_path}")
    return tokenizer


def write_vocab(path: str | os.PathLike, words: Iterable[str]) -> str:
    """Write a WordPiece vocab file: BERT's five special tokens, then the given words (deduplicated, in order)."""
    seen = set(BASE_SPECIAL_TOKENS)
    lines = list(BASE_SPECIAL_TOKENS)
    for word in words:
        if not isinstance(word, str) or not word or any(ch.isspace() for ch in word):
            raise ValueError(f"vocab word {word!r} must be a non-empty string without whitespace")
        if word not in seen:
            seen.add(word)
            lines.append(word)
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    return path
