"""Tiny hand-made data for the task tests (batches exactly as docs/design.md specifies them) and the
backbone families the shared task tests are parametrized over."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mflightning.data.tokenizer import build_tokenizer, write_vocab
from mflightning.models.xvlm import tiny_config as xvlm_tiny_config
from mflightning.tasks import (CaptioningModule, RetrievalModule, VQAModule, XVLMCaptioningModule,
                               XVLMRetrievalModule, XVLMVQAModule)

COLORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0)}
SHAPES = ("square", "circle", "stripe")
WORDS = ["a", "picture", "of", "the", "is", "what", "color", "shape", "it", "yes", "no", "big", "small",
         *COLORS, *SHAPES]
MAX_LEN = 12
IMAGE = 32
TINY_BACKBONE = {  # config dict as a YAML file would give it; vocab/token ids come from the tokenizer
    "text_config": {"hidden_size": 32, "encoder_hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "max_position_embeddings": 32},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "image_size": IMAGE, "patch_size": 16, "initializer_range": 0.02},
    "image_text_hidden_size": 16,
}
# XVLM's tiny config as a dict (1 text + 1 fusion layer, 1-block ViT, 32 px); vocabulary and pad id from the tokenizer.
XVLM_TINY_BACKBONE = {k: v for k, v in xvlm_tiny_config(vocab_size=1, image_size=IMAGE).to_dict().items()
                      if k not in ("vocab_size", "pad_token_id")}


@dataclass(frozen=True)
class Family:
    """One backbone family as the task tests see it: its tiny config, its three task classes, how it
    re-ranks retrieval candidates and what pruning its backbone gives."""

    name: str
    config: dict
    tasks: dict[str, type]
    rerank: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (itm, sims) -> re-ranking score
    groups: frozenset[str]  # the pruning preset's groups

    def module(self, task: str, tokenizer, **kwargs):
        """A task module around a fresh tiny backbone (``answer_list`` defaults to ANSWERS for VQA)."""
        if task == "vqa":
            kwargs.setdefault("answer_list", ANSWERS)
        return self.tasks[task](backbone=kwargs.pop("backbone", self.config), tokenizer=tokenizer, **kwargs)


BLIP = Family("blip", TINY_BACKBONE, {"retrieval": RetrievalModule, "captioning": CaptioningModule, "vqa": VQAModule},
              rerank=lambda itm, sims: itm + sims, groups=frozenset({"vision", "text"}))
XVLM = Family("xvlm", XVLM_TINY_BACKBONE,
              {"retrieval": XVLMRetrievalModule, "captioning": XVLMCaptioningModule, "vqa": XVLMVQAModule},
              rerank=lambda itm, sims: itm, groups=frozenset({"vision", "text", "fusion"}))
FAMILIES = {family.name: family for family in (BLIP, XVLM)}
#: ``@pytest.mark.parametrize("family", ...)`` argument list of both families, ids "blip" / "xvlm".
BOTH = [pytest.param(family, id=family.name) for family in FAMILIES.values()]


def make_tokenizer(directory: str | os.PathLike):
    return build_tokenizer(write_vocab(os.path.join(directory, "vocab.txt"), WORDS))


def make_images(n: int, seed: int = 0) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """n images (3, 32, 32): a coloured shape on noise; returns tensors and (color, shape) labels."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    colors = list(COLORS)
    for i in range(n):
        color, shape = colors[i % len(colors)], SHAPES[(i // len(colors)) % len(SHAPES)]
        img = 0.1 * torch.randn(3, IMAGE, IMAGE, generator=g)
        rgb = torch.tensor(COLORS[color]).view(3, 1, 1)
        if shape == "square":
            img[:, 8:24, 8:24] += rgb
        elif shape == "stripe":
            img[:, 14:18, :] += rgb
        else:
            yy, xx = torch.meshgrid(torch.arange(IMAGE), torch.arange(IMAGE), indexing="ij")
            img += rgb * (((yy - 16) ** 2 + (xx - 16) ** 2) < 64).float()
        images.append(img)
        labels.append((color, shape))
    return torch.stack(images), labels


def captions_for(label: tuple[str, str]) -> list[str]:
    color, shape = label
    return [f"a {color} {shape}", f"the {shape} is {color}"]


def tokenize(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


class _List(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def calibration_batch(tokenizer, n: int = 4, seed: int = 0) -> dict:
    images, labels = make_images(n, seed)
    ids, att = tokenize(tokenizer, [captions_for(label)[0] for label in labels])
    return {"image": images, "input_ids": ids, "attention_mask": att}


def retrieval_loaders(tokenizer, n_images: int = 6, batch_size: int = 4, eval_batch_size: int = 2):
    images, labels = make_images(n_images)
    train = [(images[i], cap, i) for i in range(n_images) for cap in captions_for(labels[i])]
    evals, text_idx = [], 0
    for i in range(n_images):
        caps = captions_for(labels[i])
        evals.append((images[i], i, caps, list(range(text_idx, text_idx + len(caps)))))
        text_idx += len(caps)

    def collate_train(items):
        ids, att = tokenize(tokenizer, [c for _, c, _ in items])
        return {"image": torch.stack([x for x, _, _ in items]), "input_ids": ids, "attention_mask": att,
                "image_idx": torch.tensor([i for _, _, i in items])}

    def collate_eval(items):
        texts = [c for _, _, caps, _ in items for c in caps]
        ids, att = tokenize(tokenizer, texts)
        return {"image": torch.stack([x for x, _, _, _ in items]), "image_idx": torch.tensor([i for _, i, _, _ in items]),
                "text_input_ids": ids, "text_attention_mask": att,
                "text_idx": torch.tensor([t for _, _, _, ts in items for t in ts]),
                "text_image_idx": torch.tensor([i for _, i, caps, _ in items for _ in caps])}

    return (DataLoader(_List(train), batch_size=batch_size, shuffle=True, collate_fn=collate_train),
            DataLoader(_List(evals), batch_size=eval_batch_size, collate_fn=collate_eval))


def caption_loaders(tokenizer, n_images: int = 6, prompt: str = "a picture of ", batch_size: int = 4):
    images, labels = make_images(n_images)
    train = [(images[i], prompt + cap) for i in range(n_images) for cap in captions_for(labels[i])]
    evals = [(images[i], str(100 + i), captions_for(labels[i])) for i in range(n_images)]

    def collate_train(items):
        ids, att = tokenize(tokenizer, [t for _, t in items])
        return {"image": torch.stack([x for x, _ in items]), "input_ids": ids, "attention_mask": att}

    def collate_eval(items):
        return {"image": torch.stack([x for x, _, _ in items]), "image_id": [i for _, i, _ in items],
                "captions": [c for _, _, c in items]}

    return (DataLoader(_List(train), batch_size=batch_size, shuffle=True, collate_fn=collate_train),
            DataLoader(_List(evals), batch_size=batch_size, collate_fn=collate_eval))


ANSWERS = ["red", "green", "blue", "white", "square", "circle", "stripe", "yes", "no"]


def vqa_items(n_images: int = 6):
    images, labels = make_images(n_images)
    items = []
    for i, (color, shape) in enumerate(labels):
        items.append((images[i], 2 * i, "what color is it", [color] * 8 + [shape, "no"]))
        items.append((images[i], 2 * i + 1, "what shape is it", [shape] * 10))
    return items


def vqa_loaders(tokenizer, n_images: int = 6, batch_size: int = 4, with_answers: bool = True):
    items = vqa_items(n_images)

    def collate_train(batch):
        q_ids, q_att = tokenize(tokenizer, [q for _, _, q, _ in batch])
        answers, weights, counts = [], [], []
        for _, _, _, humans in batch:
            count = Counter(humans)
            answers += list(count)
            weights += [c / len(humans) for c in count.values()]
            counts.append(len(count))
        a_ids, a_att = tokenize(tokenizer, answers)
        return {"image": torch.stack([x for x, _, _, _ in batch]), "question_input_ids": q_ids,
                "question_attention_mask": q_att, "answer_input_ids": a_ids, "answer_attention_mask": a_att,
                "answer_weights": torch.tensor(weights), "n_answers": torch.tensor(counts)}

    def collate_eval(batch):
        q_ids, q_att = tokenize(tokenizer, [q for _, _, q, _ in batch])
        out = {"image": torch.stack([x for x, _, _, _ in batch]), "question_input_ids": q_ids,
               "question_attention_mask": q_att, "question_id": [qid for _, qid, _, _ in batch]}
        if with_answers:
            out["answers"] = [h for _, _, _, h in batch]
        return out

    return (DataLoader(_List(items), batch_size=batch_size, shuffle=True, collate_fn=collate_train),
            DataLoader(_List(items), batch_size=batch_size, collate_fn=collate_eval))


def trainer_kwargs(tmp_path, **overrides) -> dict:
    kwargs = dict(accelerator="cpu", devices=1, limit_train_batches=2, max_epochs=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                  default_root_dir=str(tmp_path))
    kwargs.update(overrides)
    return kwargs
