"""A procedural, seeded vision-language world: coloured shapes on a grid, with captions and questions.

(About 400 lines: the world's scene sampler, renderer and the caption/question generators share
one vocabulary and seed stream; splitting them would spread that contract over files.)

`generate_world(root)` writes the same on-disk formats as the real datasets (docs/design.md):
calibration captions (their own images, never task data), a COCO-Karpathy-style split shared
by retrieval and captioning (as in COCO), VQA train / VG-style QA / VQA test with 10 human
answers (some synonymous or wrong), an answer list and a vocab.txt covering every word.
Splits never share an image. Output is byte-identical for a given seed, sizes and image size.

Captions and questions mention left/right, so train on this world with `hflip=False`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .tokenizer import write_vocab

WORLD_VERSION = 1
SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 190),
    "orange": (250, 140, 25),
}
SIZES = ("small", "large")
COLUMNS = ("left", "middle", "right")
ROWS = ("top", "middle", "bottom")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
MAX_OBJECTS = 4
HUMAN_ANSWERS = 10
CAPTIONS_PER_IMAGE = (3, 5)
CAPTION_PROMPT = "a picture of "
SUPERSAMPLE = 4
SYNONYMS = {
    "0": "zero", "1": "one", "2": "two", "3": "three", "4": "four",
    "yes": "yeah", "no": "nope", "purple": "violet", "square": "box", "circle": "ball",
    "diamond": "rhombus", "left": "left side", "right": "right side",
}
ANSWER_SPACES = {
    "color": tuple(COLORS),
    "count": tuple(str(n) for n in range(MAX_OBJECTS + 1)),
    "exist": ("yes", "no"),
    "shape": SHAPES,
    "relation": SHAPES,
    "side": ("left", "right"),
}


@dataclass(frozen=True)
class WorldSizes:
    """How many images each split gets (and questions per VQA/VG image)."""

    calibration: int = 2000
    train: int = 1200
    val: int = 200
    test: int = 200
    vqa_train: int = 1200
    vg: int = 300
    vqa_test: int = 200
    questions_per_image: int = 3

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"WorldSizes.{f.name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class SyntheticWorld:
    """Paths of a generated world (JSON paths inside are relative to image_root)."""

    root: str
    image_root: str
    manifest: str
    vocab: str
    calibration: str
    retrieval_train: str
    retrieval_val: str
    retrieval_test: str
    caption_train: str
    caption_val: str
    caption_test: str
    vqa_train: str
    vg_train: str
    vqa_test: str
    answer_list: str


@dataclass(frozen=True)
class SceneObject:
    """One shape in the 3x3 grid of an image."""

    shape: str
    color: str
    size: str
    row: int
    col: int


def world_paths(root: str | os.PathLike) -> SyntheticWorld:
    """Where generate_world puts each file under root (retrieval and captioning share the Karpathy files)."""
    root = os.fspath(root)
    p = lambda name: os.path.join(root, name)  # noqa: E731
    return SyntheticWorld(
        root=root, image_root=p("images"), manifest=p("world.json"), vocab=p("vocab.txt"),
        calibration=p("calibration.json"),
        retrieval_train=p("coco_karpathy_train.json"), retrieval_val=p("coco_karpathy_val.json"),
        retrieval_test=p("coco_karpathy_test.json"),
        caption_train=p("coco_karpathy_train.json"), caption_val=p("coco_karpathy_val.json"),
        caption_test=p("coco_karpathy_test.json"),
        vqa_train=p("vqa_train.json"), vg_train=p("vg_qa.json"), vqa_test=p("vqa_test.json"),
        answer_list=p("answer_list.json"),
    )


# ---- scenes ----------------------------------------------------------------------------------
def sample_scene(rng: random.Random) -> list[SceneObject]:
    """1-4 objects in distinct grid cells; shapes repeat often enough for counting questions."""
    n = rng.choices(range(1, MAX_OBJECTS + 1), weights=(2, 4, 3, 2))[0]
    cells = sorted(rng.sample(range(9), n))
    shapes: list[str] = []
    for _ in range(n):
        shapes.append(rng.choice(shapes) if shapes and rng.random() < 0.35 else rng.choice(SHAPES))
    return [SceneObject(shape, rng.choice(tuple(COLORS)), rng.choice(SIZES), cell // 3, cell % 3)
            for shape, cell in zip(shapes, cells)]


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * np.sin(k * np.pi / 5),
                 cy - (r if k % 2 == 0 else 0.45 * r) * np.cos(k * np.pi / 5)) for k in range(10)]
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(objects: list[SceneObject], image_size: int, rng: random.Random) -> Image.Image:
    """Draw the objects (supersampled, jittered in their cells) on a noisy gray background."""
    big = image_size * SUPERSAMPLE
    shade = rng.randint(95, 140)
    image = Image.new("RGB", (big, big), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    cell = big / 3
    for obj in objects:
        cx = (obj.col + 0.5 + rng.uniform(-0.08, 0.08)) * cell
        cy = (obj.row + 0.5 + rng.uniform(-0.08, 0.08)) * cell
        r = (0.4 if obj.size == "large" else 0.25) * cell
        color = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLORS[obj.color])
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=color)
    image = image.resize((image_size, image_size), Image.BOX)
    noise = np.random.default_rng(rng.getrandbits(64)).integers(-6, 7, size=(image_size, image_size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


# ---- captions --------------------------------------------------------------------------------
def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(obj: SceneObject, count: int = 1, with_size: bool = False) -> str:
    words = ([obj.size] if with_size else []) + [obj.color, obj.shape + ("s" if count > 1 else "")]
    phrase = " ".join(words)
    return _article(phrase) if count == 1 else f"{NUMBER_WORDS[count]} {phrase}"


def _listing(objects: list[SceneObject], with_size: bool) -> tuple[str, int]:
    """"a red circle, two blue squares and a green star" and the count of the first group."""
    key = (lambda o: (o.size, o.color, o.shape)) if with_size else (lambda o: (o.color, o.shape))
    counts = Counter(key(o) for o in objects)
    firsts = {}
    for o in objects:
        firsts.setdefault(key(o), o)
    parts = [_noun(o, counts[k], with_size) for k, o in firsts.items()]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text, counts[key(objects[0])]


def _position(obj: SceneObject) -> str:
    row, col = ROWS[obj.row], COLUMNS[obj.col]
    if row != "middle" and col != "middle":
        return f"in the {row} {col} corner"
    if col != "middle":
        return f"on the {col}"
    if row != "middle":
        return f"at the {row}"
    return "in the center"


def scene_captions(objects: list[SceneObject], rng: random.Random) -> list[str]:
    """All caption paraphrases the scene supports (listing, existence, relations, positions)."""
    plain, first_count = _listing(objects, with_size=False)
    sized, _ = _listing(objects, with_size=True)
    pool = [sized, f"there {'is' if first_count == 1 else 'are'} {plain}", f"an image with {plain}",
            f"{plain} on a gray background"]
    relations = []
    for a in objects:
        for b in objects:
            if a.col < b.col:
                relations += [f"{_noun(a)} to the left of {_noun(b)}", f"{_noun(b)} to the right of {_noun(a)}"]
            if a.row < b.row:
                relations += [f"{_noun(a)} above {_noun(b)}", f"{_noun(b)} below {_noun(a)}"]
    pool += rng.sample(relations, min(2, len(relations)))
    if len(objects) <= 2:
        pool.append(" and ".join(f"{_noun(o, with_size=True)} {_position(o)}" for o in objects))
    else:
        obj = rng.choice(objects)
        pool.append(f"{_noun(obj, with_size=True)} {_position(obj)}")
    return list(dict.fromkeys(pool))


def pick_captions(objects: list[SceneObject], rng: random.Random) -> list[str]:
    """3-5 distinct paraphrases of the scene."""
    pool = scene_captions(objects, rng)
    rng.shuffle(pool)
    return pool[: rng.randint(*CAPTIONS_PER_IMAGE)]


# ---- questions -------------------------------------------------------------------------------
def scene_questions(objects: list[SceneObject], rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """Every question with a unique true answer, grouped by type (color, count, exist, shape, relation, side)."""
    shape_counts = Counter(o.shape for o in objects)
    color_counts = Counter(o.color for o in objects)
    unique_shape = [o for o in objects if shape_counts[o.shape] == 1]
    out: dict[str, list[tuple[str, str]]] = {t: [] for t in ANSWER_SPACES}
    out["color"] = [(f"what color is the {o.shape}?", o.color) for o in unique_shape]
    absent = [s for s in SHAPES if s not in shape_counts]
    counted = list(shape_counts) + ([rng.choice(absent)] if absent else [])
    out["count"] = [(f"how many {s}s are there?", str(shape_counts[s])) for s in counted]
    present = {(o.color, o.shape) for o in objects}
    missing = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    yes = rng.choice(objects)
    no = rng.choice(missing)
    out["exist"] = [(f"is there {_article(yes.color + ' ' + yes.shape)}?", "yes"),
                    (f"is there {_article(no[0] + ' ' + no[1])}?", "no")]
    out["shape"] = [(f"what shape is the {o.color} object?", o.shape) for o in objects if color_counts[o.color] == 1]
    for b in unique_shape:
        for word, test in (("left of", lambda a: a.col < b.col), ("right of", lambda a: a.col > b.col),
                           ("above", lambda a: a.row < b.row), ("below", lambda a: a.row > b.row)):
            matches = [a for a in objects if test(a)]
            if len(matches) == 1:
                out["relation"].append((f"what is {word} the {b.shape}?", matches[0].shape))
    out["side"] = [(f"is the {o.shape} on the left or on the right?", COLUMNS[o.col])
                   for o in unique_shape if COLUMNS[o.col] != "middle"]
    return out


def pick_questions(objects: list[SceneObject], rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """Up to n (question, answer, type) triples, spread over question types."""
    by_type = scene_questions(objects, rng)
    types = [t for t in by_type if by_type[t]]
    rng.shuffle(types)
    for t in types:
        rng.shuffle(by_type[t])
    picked: list[tuple[str, str, str]] = []
    while len(picked) < n and any(by_type[t] for t in types):
        for t in types:
            if by_type[t] and len(picked) < n:
                question, answer = by_type[t].pop()
                picked.append((question, answer, t))
    return picked


def human_answers(answer: str, qtype: str, rng: random.Random) -> list[str]:
    """10 human answers: at least 4 correct, the rest correct, a synonym or a wrong answer of the same type."""
    answers = [answer] * 4
    wrong = [a for a in ANSWER_SPACES[qtype] if a != answer]
    for _ in range(HUMAN_ANSWERS - 4):
        r = rng.random()
        if r < 0.75:
            answers.append(answer)
        elif r < 0.88 and answer in SYNONYMS:
            answers.append(SYNONYMS[answer])
        else:
            answers.append(rng.choice(wrong))
    rng.shuffle(answers)
    return answers


# ---- files -----------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def _scenes(seed: int, split: str, count: int, image_size: int, image_root: str):
    """Yield (relative image path, objects, rng) for each image of a split, writing the PNGs."""
    os.makedirs(os.path.join(image_root, split), exist_ok=True)
    for i in range(count):
        rng = random.Random(f"mflightning-world/{seed}/{split}/{i}")
        objects = sample_scene(rng)
        relpath = f"{split}/{split}_{i:06d}.png"
        render_scene(objects, image_size, rng).save(os.path.join(image_root, relpath), format="PNG")
        yield relpath, objects, rng


def _manifest(seed: int, sizes: WorldSizes, image_size: int) -> dict:
    return {"version": WORLD_VERSION, "seed": seed, "image_size": image_size, "sizes": asdict(sizes)}


def _read_manifest(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def generate_world(
    root: str | os.PathLike,
    seed: int = 0,
    sizes: WorldSizes = WorldSizes(),
    image_size: int = 64,
    force: bool = False,
) -> SyntheticWorld:
    """Write the synthetic world under root (reused as is when world.json matches, unless force)."""
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    world = world_paths(root)
    manifest = _manifest(seed, sizes, image_size)
    files = [getattr(world, f.name) for f in fields(world) if f.name not in ("root", "image_root")]
    if not force and _read_manifest(world.manifest) == manifest and all(os.path.isfile(p) for p in files):
        return world
    os.makedirs(world.root, exist_ok=True)
    if os.path.exists(world.manifest):
        # A previous world of ours: drop it, manifest first, so a crash midway never looks complete.
        os.remove(world.manifest)
        shutil.rmtree(world.image_root, ignore_errors=True)
    os.makedirs(world.image_root, exist_ok=True)
    texts: list[str] = [CAPTION_PROMPT]

    calibration = []
    for relpath, objects, rng in _scenes(seed, "calibration", sizes.calibration, image_size, world.image_root):
        calibration.append({"image": relpath, "caption": rng.choice(scene_captions(objects, rng))})
    _write_json(world.calibration, calibration)
    texts += [r["caption"] for r in calibration]

    for split in ("train", "val", "test"):
        records = []
        for relpath, objects, rng in _scenes(seed, f"karpathy_{split}", getattr(sizes, split), image_size,
                                             world.image_root):
            captions = pick_captions(objects, rng)
            texts += captions
            if split == "train":
                image_id = Path(relpath).stem
                records += [{"image": relpath, "caption": c, "image_id": image_id} for c in captions]
            else:
                records.append({"image": relpath, "caption": captions})
        _write_json(getattr(world, f"retrieval_{split}"), records)

    question_id = 0
    answers_seen: set[str] = set()
    for split, path, count in (("vqa_train", world.vqa_train, sizes.vqa_train), ("vg", world.vg_train, sizes.vg),
                               ("vqa_test", world.vqa_test, sizes.vqa_test)):
        records = []
        for relpath, objects, rng in _scenes(seed, split, count, image_size, world.image_root):
            for question, answer, qtype in pick_questions(objects, rng, sizes.questions_per_image):
                answers = [answer] if split == "vg" else human_answers(answer, qtype, rng)
                record = {"question_id": question_id, "image": relpath, "question": question, "answer": answers}
                if split != "vqa_test":
                    record["dataset"] = "vg" if split == "vg" else "vqa"
                    answers_seen.update(answers)
                records.append(record)
                texts += [question, *answers]
                question_id += 1
        _write_json(path, records)

    canonical = {a for space in ANSWER_SPACES.values() for a in space}
    answer_list = sorted(canonical | answers_seen)
    _write_json(world.answer_list, answer_list)
    texts += answer_list
    write_vocab(world.vocab, sorted({w for t in texts for w in _words(t)}))
    _write_json(world.manifest, manifest)
    return world
