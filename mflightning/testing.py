"""Small offline builders for tests and examples (nothing here downloads)."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any


def tiny_clip_tokenizer(folder: str | os.PathLike, words: Iterable[str]) -> Any:
    """A CLIP BPE tokenizer over letters and digits whose merges build the given words, written to `folder`.

    transformers 5.x reads it offline with `CLIPTokenizer(vocab=..., merges=...)` (the keywords are
    `vocab` / `merges`); CLIP and SigLIP processors accept it.
    """
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in words:
        if not word.isalnum() or len(word) < 2:
            continue
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for part in parts[1:]:
            pair, current = f"{current} {part}", current + part
            if current not in vocab:
                merges.append(pair)
                vocab[current] = len(vocab)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(vocab=os.path.join(folder, "vocab.json"), merges=os.path.join(folder, "merges.txt"))


def write_image_folder(root: str | os.PathLike, splits: Iterable[str] = ("train", "test"),
                       classes: Iterable[str] = ("cat", "dog", "owl"), per_class: int = 2) -> None:
    """Small random PNG images in an ImageFolder layout, ``root/<split>/<class>/<split>_<i>.png`` (seeded)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([s, c, i])
                Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(folder / f"{split}_{i}.png")
