"""Chance levels and image-blind baselines of the synthetic world's test splits (the demo's table).

"chance" is random guessing: a random ranking for retrieval (exact expectation), the caption of
another image for captioning, a uniformly random answer among those the question's type admits
for VQA (exact expectation). "blind" is an image-blind baseline: the same for retrieval and
captioning, and for VQA the most frequent training answer of the question's type (its first
two words), which language priors alone reach.
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from math import comb
from pathlib import Path

CHANCE_DEFINITION = (
    "chance: random ranking (retrieval), another image's caption (captioning), a random answer of the question's "
    "type (VQA); blind: the best image-blind guess, here the same except VQA, which answers each question type's "
    "most frequent training answer"
)


def retrieval_chance(test_json: str | os.PathLike, k: int = 1) -> dict[str, float]:
    """Expected R@k (in %) of a random ranking: text retrieval (any of the image's captions) and image retrieval."""
    records = json.loads(Path(test_json).read_text())
    counts = [len(r["caption"]) for r in records]
    n_images, n_texts = len(counts), sum(counts)
    k_txt, k_img = min(k, n_texts), min(k, n_images)
    # P(at least one of c correct texts in the top k of n_texts) = 1 - C(n - c, k) / C(n, k)
    txt = sum(1 - comb(n_texts - c, k_txt) / comb(n_texts, k_txt) for c in counts) / n_images
    img = k_img / n_images
    return {f"txt_r{k}": 100 * txt, f"img_r{k}": 100 * img}


def retrieval_chance_r_mean(test_json: str | os.PathLike) -> float:
    """Chance of BLIP's `r_mean` (mean of text and image R@1, R@5, R@10)."""
    values = [retrieval_chance(test_json, k) for k in (1, 5, 10)]
    txt = sum(v[f"txt_r{k}"] for v, k in zip(values, (1, 5, 10))) / 3
    img = sum(v[f"img_r{k}"] for v, k in zip(values, (1, 5, 10))) / 3
    return (txt + img) / 2


def captioning_chance(test_json: str | os.PathLike, seed: int = 0) -> dict[str, float]:
    """Caption scores of an image-blind captioner: each image gets the first caption of another image."""
    from mflightning.metrics import caption_scores

    records = json.loads(Path(test_json).read_text())
    if len(records) < 2:
        raise ValueError(f"{test_json}: captioning chance needs at least two images")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    other = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}  # a cycle: never itself
    predictions = {str(i): records[other[i]]["caption"][0] for i in range(len(records))}
    references = {str(i): list(r["caption"]) for i, r in enumerate(records)}
    return caption_scores(predictions, references)


def question_type(question: str) -> str:
    """The question's first two words ("what color", "how many", "is there" ...)."""
    return " ".join(question.lower().split()[:2])


def _answers_by_type(train_jsons: list[str | os.PathLike]) -> dict[str, Counter]:
    by_type: dict[str, Counter] = defaultdict(Counter)
    for path in train_jsons:
        for record in json.loads(Path(path).read_text()):
            by_type[question_type(record["question"])].update(record["answer"])
    return by_type


def vqa_chance(train_jsons: list[str | os.PathLike], test_json: str | os.PathLike) -> dict[str, float]:
    """Expected VQA accuracy (in %) of a uniformly random answer among those its question type admits.

    A type's answers are the majority answers of its training questions ("what color": the six
    colours, "is there": yes/no ...); the expectation is exact (mean over those candidates).
    """
    from mflightning.metrics import vqa_question_accuracy

    candidates: dict[str, set[str]] = defaultdict(set)
    for path in train_jsons:
        for record in json.loads(Path(path).read_text()):
            candidates[question_type(record["question"])].add(Counter(record["answer"]).most_common(1)[0][0])
    everything = set().union(*candidates.values())
    test = json.loads(Path(test_json).read_text())
    total = 0.0
    for record in test:
        options = candidates.get(question_type(record["question"])) or everything
        total += sum(vqa_question_accuracy(a, record["answer"]) for a in options) / len(options)
    return {"vqa_acc": 100 * total / len(test)}


def vqa_blind_prior(train_jsons: list[str | os.PathLike], test_json: str | os.PathLike) -> dict[str, float]:
    """VQA accuracy (in %) of answering each test question with its type's most frequent training answer."""
    from mflightning.metrics import vqa_accuracy

    by_type = _answers_by_type(train_jsons)
    overall = sum(by_type.values(), Counter())
    test = json.loads(Path(test_json).read_text())
    predictions = [(by_type.get(question_type(r["question"])) or overall).most_common(1)[0][0] for r in test]
    return {"vqa_acc": vqa_accuracy(predictions, [r["answer"] for r in test])}


def chance_and_blind(world, seed: int = 0) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """(chance, blind) levels per task of the world's test splits, keyed by the demo's metric names."""
    vqa_train = [world.vqa_train, world.vg_train]
    retrieval = {**retrieval_chance(world.retrieval_test, 1), "r_mean": retrieval_chance_r_mean(world.retrieval_test)}
    chance = {
        "retrieval": retrieval,
        "captioning": captioning_chance(world.caption_test, seed),
        "vqa": vqa_chance(vqa_train, world.vqa_test),
    }
    # image-blind baselines: a random ranking and another image's caption are already blind
    blind = {**chance, "vqa": vqa_blind_prior(vqa_train, world.vqa_test)}
    return chance, blind
