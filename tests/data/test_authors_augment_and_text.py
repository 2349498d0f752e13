"""The MULTIFLOW authors' RandomAugment(2, 7) and caption/question cleaning, against values computed by hand
from their definitions (datasets/randaugment.py, datasets/utils.py) and against PIL where they say theirs equals it."""
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mflightning.data import RetrievalDataModule, VQADataModule, clean_text
from mflightning.data.cleaning import AUTHORS_MAX_WORDS, authors_caption, authors_question, text_cleaner
from mflightning.data.records import DataRecordError
from mflightning.data.transforms import (AUGMENT_FILL, AUTHORS_AUGMENT_OPS, RandomAugment, apply_augment_op,
                                         augment_arguments, build_train_transform)


def test_the_op_set_and_the_magnitudes_at_level_7():
    assert RandomAugment().ops == ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
                                   "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
    expected = {"Identity": (), "AutoContrast": (), "Equalize": (), "Brightness": (1.36,), "Sharpness": (1.36,),
                "ShearX": (0.21,), "ShearY": (0.21,), "TranslateX": (7.0,), "TranslateY": (7.0,), "Rotate": (21.0,)}
    for name, args in expected.items():
        assert augment_arguments(name, 7) == pytest.approx(args), name
        assert augment_arguments(name, 7, negate=True) == pytest.approx(
            tuple(-a for a in args) if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate") else args)
    with pytest.raises(ValueError, match="unknown augmentation ops \\['Solarize'\\]"):
        RandomAugment(ops=["Solarize"])


def test_two_ops_drawn_with_replacement_each_applied_with_probability_one_half():
    torch.manual_seed(0)
    augment, n = RandomAugment(), 4000
    samples = [augment.sample() for _ in range(n)]
    applied = [op for sample in samples for op in sample]
    assert abs(len(applied) / (2 * n) - 0.5) < 0.02
    counts = Counter(name for name, _ in applied)
    assert set(counts) == set(AUTHORS_AUGMENT_OPS)
    assert all(abs(c / len(applied) - 0.1) < 0.02 for c in counts.values()), counts
    assert {args for name, args in applied if name == "Rotate"} == {(21.0,), (-21.0,)}
    assert 40 < sum(len(s) == 2 and s[0][0] == s[1][0] for s in samples) < 160  # same op twice: 4000 x 0.025


def test_point_ops_by_hand_and_as_pil():
    img = np.zeros((4, 4, 3), dtype=np.uint8)
    img[0, :4, 0] = [0, 100, 200, 250]
    img[1, :3, 1] = [50, 100, 150]
    img[1, 3, 1] = 100
    bright = apply_augment_op(img, "Brightness", 1.36)
    assert bright[0, :, 0].tolist() == [0, 136, 255, 255]  # v * 1.36 truncated, capped at 255
    contrast = apply_augment_op(img + 50, "AutoContrast")  # channel 1: 50..200 -> 0..255, truncated
    assert contrast[1, :, 1].tolist() == [int((v - 50) * 255 / 150) for v in (100, 150, 200, 150)]
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (24, 20, 3)).astype(np.uint8) // 3 + 40
    assert np.array_equal(apply_augment_op(photo, "Equalize"), np.asarray(ImageOps.equalize(Image.fromarray(photo))))
    spot = np.zeros((5, 5, 3), dtype=np.uint8)
    spot[2, 2] = 13
    sharp = apply_augment_op(spot, "Sharpness", 1.36)[:, :, 0]
    # centre: smoothed rint((13 + 4*13)/13) = 5, 5 + 1.36*(13-5) = 15.88 -> 15; its neighbours 1 + 1.36*(0-1) < 0 -> 0
    assert sharp[2, 2] == 15 and sharp.sum() == 15
    assert np.array_equal(apply_augment_op(photo, "Identity"), photo)


def test_geometric_ops_move_pixels_as_opencvs_warp_affine_with_grey_fill():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    shifted = apply_augment_op(img, "TranslateX", 7.0)  # M = [[1, 0, -7], [0, 1, 0]]: out(x) = in(x + 7)
    assert np.array_equal(shifted[:, 0], img[:, 7]) and (shifted[:, 1:] == AUGMENT_FILL).all()
    down = apply_augment_op(img, "TranslateY", -2.0)
    assert np.array_equal(down[2:], img[:-2]) and (down[:2] == AUGMENT_FILL).all()
    rotated = apply_augment_op(img, "Rotate", 90.0)  # about (W/2, H/2) = (4, 4): out(x=y0, y=8-x0) = in(x0, y0)
    for y0 in range(8):
        for x0 in range(1, 8):
            assert np.array_equal(rotated[8 - x0, y0], img[y0, x0])
    assert (rotated[0] == AUGMENT_FILL).all()  # counter-clockwise: the top row came from outside the image
    sheared = apply_augment_op(img, "ShearX", 0.5)  # out(x, y) = in(x - 0.5 y, y): row 2 shifted right by 1
    assert np.array_equal(sheared[2, 1:], img[2, :-1]) and (sheared[2, 0] == AUGMENT_FILL).all()


def test_the_train_transform_selects_it_and_is_seeded():
    transform = build_train_transform(16, augment="authors")
    assert any(isinstance(step, RandomAugment) for step in transform.transforms)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (20, 24, 3)).astype(np.uint8))
    torch.manual_seed(3)
    first = transform(image)
    torch.manual_seed(3)
    assert first.shape == (3, 16, 16) and torch.equal(first, transform(image))
    with pytest.raises(ValueError, match="augment must be True, False, 'torchvision' or 'authors'"):
        build_train_transform(16, augment="timm")


def test_caption_and_question_cleaning_as_their_definitions():
    text = "A man's dog, running-fast/jumping!!  <person> here."
    assert authors_caption(text, 30) == "a mans dog running fast jumping person here"
    assert clean_text(text) == "a man's dog, running-fast/jumping <person> here"  # BLIP's, for contrast
    assert authors_caption("one two, three four", 3) == "one two three"
    assert authors_question("What's on the LEFT-hand side?", 30) == "whats on the left hand side"
    assert authors_question("is  it red?", 2) == "is "  # no whitespace collapse: '' counts as a word
    with pytest.raises(ValueError, match="empty after cleaning"):
        authors_caption("...!", 30)
    caps = {kind: len(text_cleaner("authors", kind)(" ".join(["w"] * 60)).split(" ")) for kind in AUTHORS_MAX_WORDS}
    assert caps == {"calibration": 40, "retrieval": 30, "captioning": 40, "vqa_train": 30, "vqa_test": 50}
    assert text_cleaner("blip", "retrieval") is clean_text


def test_datamodules_clean_with_the_chosen_style(tiny_world, tmp_path):
    common = dict(image_root=tiny_world.image_root, tokenizer=tiny_world.vocab, image_size=32, batch_size=2,
                  num_workers=0, augment="authors", text_cleaning="authors")
    records = json.loads(open(tiny_world.caption_train).read())
    records[0]["caption"] = "A red-square, on the left/top!"
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    dm = RetrievalDataModule(train_json=str(path), **common)
    assert dm.dataset("train").texts[0] == "a red square on the left top"
    assert any(isinstance(t, RandomAugment) for t in dm.train_transform().transforms)
    records[0]["caption"] = "?!"
    path.write_text(json.dumps(records))
    with pytest.raises(DataRecordError, match=r"train.json: record 0: caption '\?!' is empty after cleaning"):
        RetrievalDataModule(train_json=str(path), **common).dataset("train")
    vqa = VQADataModule(train_json=tiny_world.vqa_train, **common).dataset("train")
    raw = json.loads(open(tiny_world.vqa_train).read())[0]["question"]
    assert vqa.questions[0] == authors_question(raw, 30)
    with pytest.raises(ValueError, match="text_cleaning must be 'blip' or 'authors'"):
        RetrievalDataModule(train_json=str(path), image_root=".", text_cleaning="bert")
