"""The synthetic world: determinism, caching, disjoint splits, vocab coverage, truthful text."""

import hashlib
import json
import os
import random
from dataclasses import replace

import numpy as np
import pytest

from mflightning.data import build_tokenizer, generate_world
from mflightning.data.synthetic import (
    COLORS,
    SceneObject,
    human_answers,
    pick_captions,
    render_scene,
    sample_scene,
    scene_questions,
)


def _tree_digest(root):
    digest = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digest[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return digest


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, tiny_world, tiny_sizes):
    TINY = tiny_sizes
    again = generate_world(tmp_path / "again", seed=0, sizes=TINY, image_size=32)
    other = generate_world(tmp_path / "other", seed=1, sizes=TINY, image_size=32)
    reference = _tree_digest(tiny_world.root)
    assert _tree_digest(again.root) == reference
    other_digest = _tree_digest(other.root)
    assert other_digest.keys() == reference.keys()
    changed = [k for k in reference if reference[k] != other_digest[k]]
    assert "coco_karpathy_train.json" in changed and "vqa_train.json" in changed
    assert sum(k.endswith(".png") for k in changed) == sum(k.endswith(".png") for k in reference)


def test_manifest_reuses_matching_world_and_regenerates_changed_one(tmp_path, tiny_sizes):
    TINY = tiny_sizes
    world = generate_world(tmp_path, seed=3, sizes=TINY, image_size=32)
    assert _load(world.manifest) == {"version": 1, "seed": 3, "image_size": 32, "sizes": vars(TINY)}
    stamp = os.stat(world.vqa_train).st_mtime_ns
    generate_world(tmp_path, seed=3, sizes=TINY, image_size=32)
    assert os.stat(world.vqa_train).st_mtime_ns == stamp
    smaller = replace(TINY, calibration=4)
    generate_world(tmp_path, seed=3, sizes=smaller, image_size=32)
    assert len(_load(world.calibration)) == 4
    assert len(os.listdir(os.path.join(world.image_root, "calibration"))) == 4  # stale images removed
    assert _load(world.manifest)["sizes"]["calibration"] == 4


def test_splits_are_disjoint_and_sized(tiny_world):
    w = tiny_world
    train = _load(w.retrieval_train)
    images = {
        "calibration": {r["image"] for r in _load(w.calibration)},
        "train": {r["image"] for r in train},
        "val": {r["image"] for r in _load(w.retrieval_val)},
        "test": {r["image"] for r in _load(w.retrieval_test)},
        "vqa_train": {r["image"] for r in _load(w.vqa_train)},
        "vg": {r["image"] for r in _load(w.vg_train)},
        "vqa_test": {r["image"] for r in _load(w.vqa_test)},
    }
    assert {k: len(v) for k, v in images.items()} == {
        "calibration": 8, "train": 6, "val": 3, "test": 3, "vqa_train": 6, "vg": 3, "vqa_test": 3}
    names = list(images)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not images[a] & images[b], (a, b)
    per_image = {}
    for r in train:
        per_image.setdefault(r["image_id"], []).append(r["caption"])
    assert all(3 <= len(c) <= 5 and len(set(c)) == len(c) for c in per_image.values())
    assert all(3 <= len(r["caption"]) <= 5 for r in _load(w.retrieval_val))
    assert w.caption_test == w.retrieval_test  # as in COCO, both tasks share the Karpathy split


def test_vqa_records_have_ten_answers_and_answer_list_covers_them(tiny_world):
    answer_list = set(_load(tiny_world.answer_list))
    train, vg, test = _load(tiny_world.vqa_train), _load(tiny_world.vg_train), _load(tiny_world.vqa_test)
    assert all(r["dataset"] == "vqa" and len(r["answer"]) == 10 for r in train)
    assert all(r["dataset"] == "vg" and len(r["answer"]) == 1 for r in vg)
    assert all(len(r["answer"]) == 10 and "dataset" not in r for r in test)
    ids = [r["question_id"] for r in train + vg + test]
    assert len(ids) == len(set(ids))
    assert {a for r in train + vg for a in r["answer"]} <= answer_list
    assert {max(set(r["answer"]), key=r["answer"].count) for r in test} <= answer_list


def test_vocab_covers_every_word(tiny_world):
    tokenizer = build_tokenizer(tiny_world.vocab)
    texts = ["a picture of "] + [r["caption"] for r in _load(tiny_world.calibration)]
    texts += [r["caption"] for r in _load(tiny_world.retrieval_train)]
    texts += [c for r in _load(tiny_world.retrieval_test) for c in r["caption"]]
    for r in _load(tiny_world.vqa_train) + _load(tiny_world.vqa_test):
        texts += [r["question"], *r["answer"]]
    texts += _load(tiny_world.answer_list)
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text


def test_questions_and_captions_state_the_truth():
    scene = [SceneObject("circle", "red", "large", 0, 0), SceneObject("square", "blue", "small", 0, 2),
             SceneObject("square", "green", "small", 2, 2)]
    questions = dict(q for qs in scene_questions(scene, random.Random(0)).values() for q in qs)
    assert questions["what color is the circle?"] == "red"
    assert questions["how many squares are there?"] == "2"
    assert questions["what shape is the blue object?"] == "square"
    assert questions["is the circle on the left or on the right?"] == "left"
    assert "what color is the square?" not in questions  # two squares: no unique answer
    assert "what is left of the circle?" not in questions  # nothing is
    assert "what is right of the circle?" not in questions  # two things are
    scene = [SceneObject("circle", "red", "large", 0, 0), SceneObject("square", "blue", "small", 0, 2),
             SceneObject("star", "green", "small", 2, 2)]
    questions = dict(q for qs in scene_questions(scene, random.Random(0)).values() for q in qs)
    assert questions["what is left of the square?"] == "circle"
    assert questions["what is below the square?"] == "star"
    assert "what is above the star?" not in questions  # circle and square both are
    captions = pick_captions(scene, random.Random(0))
    assert 3 <= len(captions) <= 5
    assert all("circle" in c or "square" in c for c in captions)


def test_random_scene_questions_match_their_scene():
    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(rng)
        shapes = [o.shape for o in scene]
        for qtype, pairs in scene_questions(scene, rng).items():
            for question, answer in pairs:
                words = question.rstrip("?").split()
                if qtype == "color":
                    assert [o.color for o in scene if o.shape == words[-1]] == [answer]
                elif qtype == "count":
                    assert shapes.count(words[2][:-1]) == int(answer)
                elif qtype == "exist":
                    present = any((o.color, o.shape) == (words[-2], words[-1]) for o in scene)
                    assert answer == ("yes" if present else "no")
                elif qtype == "shape":
                    assert [o.shape for o in scene if o.color == words[-2]] == [answer]
                elif qtype == "side":
                    (obj,) = [o for o in scene if o.shape == words[2]]
                    assert answer == ("left", "middle", "right")[obj.col]
                elif qtype == "relation":
                    (ref,) = [o for o in scene if o.shape == words[-1]]
                    rel = " ".join(words[2:-2])
                    test = {"left of": lambda o: o.col < ref.col, "right of": lambda o: o.col > ref.col,
                            "above": lambda o: o.row < ref.row, "below": lambda o: o.row > ref.row}[rel]
                    assert [o.shape for o in scene if test(o)] == [answer]


def test_human_answers_keep_a_majority_of_correct_ones():
    rng = random.Random(0)
    for _ in range(50):
        answers = human_answers("2", "count", rng)
        assert len(answers) == 10 and answers.count("2") >= 4
        assert set(answers) <= {"0", "1", "2", "3", "4", "two"}


def test_rendered_object_has_its_colour():
    image = np.asarray(render_scene([SceneObject("square", "red", "large", 1, 1)], 48, random.Random(0)))
    centre = image[20:28, 20:28].reshape(-1, 3).mean(0)
    assert np.abs(centre - np.array(COLORS["red"])).max() < 30
    corner = image[:6, :6].reshape(-1, 3).mean(0)
    assert np.ptp(corner) < 10  # gray background


def test_bad_sizes_are_rejected(tmp_path, tiny_sizes):
    TINY = tiny_sizes
    with pytest.raises(ValueError, match="WorldSizes.train"):
        replace(TINY, train=0)
    with pytest.raises(ValueError, match="image_size"):
        generate_world(tmp_path, sizes=TINY, image_size=4)
