"""The quality benchmark's miniature of the paper's vision-only transfer (Sec. A.2): image classification on the
synthetic world's objects, fine-tuning the image encoder of the same pruned BLIP / XVLM backbone.

Each image holds one large object of the world in a random grid cell (its shapes and colours, drawn by the world's
own renderer); its class is "<colour> <shape>" (30 classes). Colour alone gives top-5 (the five shapes of a
colour), so top-1 measures shape: with the world's small objects too, or 16 images per class, the dense BLIP
stayed under 31% top-1; large objects, 32 per class and 20 epochs gave 48% (world 0, seed 0). The mask file of a
(model, method, sparsity) is the one the vision-language tasks fine-tune: pruning stays task-agnostic, and this
task reads only its vision group.
`ImageClassificationModule` puts a dense linear head on the CLS token of `encode_image`; the text side is frozen.
Images are only resized and normalised (no random transforms), as in the other tasks of the benchmark.
Metrics are top-1 / top-5 accuracy in percent; the image-blind level is the most frequent training class.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from collections import Counter
from pathlib import Path

from mflightning.data.synthetic import COLORS, SHAPES, SceneObject, render_scene

CLASSES = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)
WORLD_VERSION = 2


def images_per_class(train: int, test: int) -> tuple[int, int]:
    """(training, test) images per class from the world's Karpathy train/test sizes (CPU: 160/60 -> 32/8)."""
    return max(2, train // 5), max(1, test // 7)


def classification_world(root: str | os.PathLike, seed: int, image_size: int, per_class: tuple[int, int]) -> Path:
    """Write (or reuse) ``root/<train|test>/<colour>_<shape>/<i>.png``, one object per image, byte-identical per seed."""
    root = Path(root)
    manifest = {"version": WORLD_VERSION, "seed": seed, "image_size": image_size, "per_class": list(per_class)}
    if (root / "classes.json").is_file() and json.loads((root / "classes.json").read_text()) == manifest:
        return root
    for split, count in zip(("train", "test"), per_class):
        for name in CLASSES:
            color, shape = name.split()
            folder = root / split / name.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = random.Random(f"mflightning-classes/{seed}/{split}/{name}/{i}")
                obj = SceneObject(shape, color, "large", rng.randrange(3), rng.randrange(3))
                render_scene([obj], image_size, rng).save(folder / f"{i:04d}.png", format="PNG")
    (root / "classes.json").write_text(json.dumps(manifest))
    return root


def world_for(cache_dir: str | os.PathLike, s) -> Path:
    """The classification images of the benchmark's settings `s`, cached under `cache_dir`."""
    per_class = images_per_class(s.sizes.train, s.sizes.test)
    tag = hashlib.sha256(json.dumps([s.world_seed, s.image_size, per_class]).encode()).hexdigest()[:10]
    return classification_world(Path(cache_dir) / f"classes-{tag}", s.world_seed, s.image_size, per_class)


def blind_level(root: str | os.PathLike) -> dict[str, float]:
    """Image-blind top-1/top-5 (%): always answering the most frequent training classes, scored on the test split."""
    from mflightning.data.classification import read_image_folder

    _, train, _ = read_image_folder(Path(root) / "train")
    _, test, _ = read_image_folder(Path(root) / "test")
    ranked = [label for label, _ in Counter(train).most_common()]
    return {f"top{k}": 100.0 * sum(label in ranked[:k] for label in test) / len(test) for k in (1, 5)}


def finetune_classification(backbone, root: str | os.PathLike, budget, *, seed: int, image_size: int, masks,
                            root_dir: str | os.PathLike, num_workers: int = 0):
    """Fine-tune a copy of `backbone`'s image encoder + a dense head (kept sparse by `masks`), then test it:
    (test metrics in %, measured sparsity)."""
    import lightning as L

    from mflightning.data.classification import LabeledImages, read_image_folder
    from mflightning.data.transforms import build_test_transform
    from mflightning.families import fit_and_test
    from mflightning.tasks import ImageClassificationModule

    L.seed_everything(seed, workers=True, verbose=False)
    transform = build_test_transform(image_size)
    splits = {}
    for split in ("train", "test"):
        files, labels, classes = read_image_folder(Path(root) / split)
        splits[split] = LabeledImages(files, labels, transform, classes)
    data = _loaders(splits["train"], splits["test"], budget.batch_size, num_workers)
    module = ImageClassificationModule(copy.deepcopy(backbone), num_classes=len(CLASSES), lr=budget.lr,
                                       weight_decay=0.0, warmup_ratio=0.1)
    metrics, sparsity = fit_and_test(module, data, masks=masks, epochs=budget.epochs, root_dir=root_dir)
    return {k: 100.0 * v for k, v in metrics.items()}, sparsity


def _loaders(train, test, batch_size: int, num_workers: int):
    """A datamodule of a shuffled training loader that drops its partial batch (as the other tasks') and a test one."""
    import lightning as L
    from torch.utils.data import DataLoader

    class Loaders(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers)

        def test_dataloader(self):
            return DataLoader(test, batch_size=batch_size, num_workers=num_workers)

    return Loaders()
