"""VQA training data as the MultiFlow authors' `datasets/vqa_dataset.py` builds it: Visual Genome answers
weigh 0.5, no flip when the question or an answer mentions left/right, answers optionally end with [SEP]."""

import json

import torch
from PIL import Image
from torchvision import transforms as T

from mflightning.data import VQADataModule, VQADataset
from mflightning.data.datasets import VG_ANSWER_WEIGHT, VQATrainCollate, mentions_left_or_right


def _common(world):
    return dict(image_root=world.image_root, tokenizer=world.vocab, image_size=32, batch_size=2,
                num_workers=0, max_length=16, augment=False)


def test_vg_answers_weigh_half_by_default(tiny_world):
    """The authors' weights: [0.5] for a VG question; count / 10 for a VQA question."""
    dm = VQADataModule([tiny_world.vqa_train, tiny_world.vg_train], None, tiny_world.answer_list,
                       **_common(tiny_world))
    dataset = dm.dataset("train")
    kinds = [item.record.dataset for item in dataset.items]
    vg, vqa = kinds.index("vg"), kinds.index("vqa")
    assert VG_ANSWER_WEIGHT == 0.5
    assert dataset.answer_weights(vg)[1] == [0.5] * len(dataset.answer_weights(vg)[0])
    answers = [a.strip() for a in dataset.items[vqa].record.answers]
    unique, weights = dataset.answer_weights(vqa)
    assert weights == [answers.count(a) / len(answers) for a in unique]


def test_left_right_detection_as_the_authors_substring_test():
    assert mentions_left_or_right("what is on the left of the cup")
    assert mentions_left_or_right("where is the dog", ["right side"])
    assert mentions_left_or_right("Left or right?")  # theirs is case-sensitive: this one they would flip
    assert not mentions_left_or_right("what color is the bus", ["red", "blue"])


def _flip_dataset(world, tmp_path, question, answer):
    image = json.loads(open(world.vqa_train).read())[0]["image"]
    path = tmp_path / f"q{abs(hash(question + answer))}.json"
    path.write_text(json.dumps([{"image": image, "question": question, "answer": [answer], "dataset": "vqa"}]))
    return VQADataset(str(path), world.image_root, T.ToTensor(), train=True, hflip=True)


def test_no_flip_when_question_or_answer_mentions_left_or_right(tiny_world, tmp_path):
    """Over 40 draws a neutral question's image is flipped sometimes, a left/right one never."""
    neutral = _flip_dataset(tiny_world, tmp_path, "what color is the shape", "red")
    left_q = _flip_dataset(tiny_world, tmp_path, "what is on the left", "square")
    right_a = _flip_dataset(tiny_world, tmp_path, "where is the square", "right")
    original = T.ToTensor()(Image.open(neutral.items[0].image_path).convert("RGB"))
    mirrored = original.flip(-1)
    assert not torch.equal(original, mirrored)  # the test image is not symmetric
    torch.manual_seed(0)
    seen = {"neutral": set(), "left_q": set(), "right_a": set()}
    for _ in range(40):
        for name, dataset in (("neutral", neutral), ("left_q", left_q), ("right_a", right_a)):
            image = dataset[0]["image"]
            assert torch.equal(image, original) or torch.equal(image, mirrored)
            seen[name].add("flipped" if torch.equal(image, mirrored) else "kept")
    assert seen == {"neutral": {"flipped", "kept"}, "left_q": {"kept"}, "right_a": {"kept"}}


def test_vqa_datamodule_flips_in_the_dataset_not_in_the_transform(tiny_world):
    dm = VQADataModule(tiny_world.vqa_train, None, tiny_world.answer_list, **_common(tiny_world), hflip=True)
    dataset = dm.dataset("train")
    assert dataset.hflip
    assert not any(isinstance(step, T.RandomHorizontalFlip) for step in dataset.transform.transforms)
    off = VQADataModule(tiny_world.vqa_train, None, tiny_world.answer_list, **_common(tiny_world), hflip=False)
    assert not off.dataset("train").hflip


def test_answer_suffix_gives_the_authors_double_sep(tiny_world):
    dm = VQADataModule(tiny_world.vqa_train, None, tiny_world.answer_list, **_common(tiny_world))
    tok = dm.tokenizer
    items = [{"image": torch.zeros(3, 32, 32), "question": "what color", "answers": ["red"], "weights": [1.0]}]
    plain = VQATrainCollate(tok, 8, 6)(items)["answer_input_ids"][0].tolist()
    authors = VQATrainCollate(tok, 8, 6, answer_suffix="[SEP]")(items)["answer_input_ids"][0].tolist()
    red = tok.convert_tokens_to_ids("red")
    sep, cls, pad = tok.sep_token_id, tok.cls_token_id, tok.pad_token_id
    assert plain == [cls, red, sep, pad, pad, pad]
    assert authors == [cls, red, sep, sep, pad, pad]
