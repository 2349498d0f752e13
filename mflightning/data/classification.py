"""Image classification data (the paper's vision-only transfer, Sec. A.2): datasets in their usual on-disk
layouts, the authors' transforms, and an unlabeled ImageNet-style calibration loader.

Layouts (`dataset=`, all under `data_root`):
- ``cifar10`` / ``cifar100``: torchvision's extracted folders, ``cifar-10-batches-py/`` (``data_batch_1..5``,
  ``test_batch``, ``batches.meta``) and ``cifar-100-python/`` (``train``, ``test``, ``meta``; fine labels),
  or `data_root` pointing at that folder itself. Read here (pickles), so no MD5 check and no download.
- ``flowers102``: the authors' split-file layout, ``annots/split.csv`` (``filename,split,class``),
  ``annots/metadata.csv`` (``idx,class_name``) and ``images/``; or an ImageFolder layout
  (``train/``, ``val/``, ``test/``, one folder per class). (torchvision's ``.mat`` files need scipy: not read.)
- ``imagefolder``: ``train/``, optional ``val/``, ``test/``, one sub-folder per class (the same classes in each).

Batches are ``{"image": (B, 3, H, W), "label": (B,)}``. Validation runs on the ``val`` split when there is
one and it is not merged into training (``merge_val``, as the authors do for Flowers-102), else on
``test``, as the authors measure accuracy after every epoch.

Transforms (the authors' ``image_classification.py``): training RandAugment (torchvision's defaults) then
RandomResizedCrop(image_size, bicubic); evaluation Resize(resize_size, bicubic) + CenterCrop(image_size);
CLIP mean/std. Calibration (their ``pretrain_dino`` loader): RandomResizedCrop(scale 0.2-1) + flip +
RandAugment(2, 7), every image's crop seeded by (seed, index), in a seeded shuffled order sharded over ranks.
"""
from __future__ import annotations

import csv
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from .datamodule_base import ShardSampler, check_crop_scale, check_positive, trainer_world
from .datasets import seeded_transform
from .records import DataRecordError
from .transforms import CALIBRATION_CROP_SCALE, build_train_transform, normalize

Dataset_ = Literal["cifar10", "cifar100", "flowers102", "imagefolder"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
Source = str | np.ndarray  # an image file, or an (H, W, 3) uint8 array (CIFAR)


def classification_train_transform(image_size: int = 224, augment: bool = True) -> T.Compose:
    """The authors' training transform: RandAugment(), RandomResizedCrop(image_size, bicubic), CLIP normalisation."""
    steps = [T.RandAugment()] if augment else []
    steps += [T.RandomResizedCrop(image_size, interpolation=InterpolationMode.BICUBIC), T.ToTensor(), normalize()]
    return T.Compose(steps)


def classification_test_transform(image_size: int = 224, resize_size: int = 256) -> T.Compose:
    """The authors' test transform: Resize(resize_size, bicubic) of the short side, CenterCrop(image_size)."""
    return T.Compose([T.Resize(resize_size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(image_size),
                      T.ToTensor(), normalize()])


class LabeledImages(Dataset):
    """Images with integer labels (None: unlabeled) -> ``{"image", "label"}`` (``{"image"}`` when unlabeled).

    `augment_seed`: item i's random transform draws from torch's RNG seeded with (augment_seed, i).
    """

    def __init__(self, sources: list[Source], labels: list[int] | None, transform: Callable, classes: list[str],
                 augment_seed: int | None = None):
        if labels is not None and len(labels) != len(sources):
            raise ValueError(f"{len(sources)} images but {len(labels)} labels")
        self.sources, self.labels, self.transform = sources, labels, transform
        self.classes, self.augment_seed = classes, augment_seed

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict[str, Any]:
        source = self.sources[index]
        if isinstance(source, np.ndarray):
            image = Image.fromarray(source)
        else:
            try:
                with Image.open(source) as im:
                    image = im.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise DataRecordError(f"cannot decode image {source} ({exc})") from None
        item = {"image": seeded_transform(self.transform, image, self.augment_seed, index)}
        if self.labels is not None:
            item["label"] = self.labels[index]
        return item


# ------------------------------------------------------------------------------------------ layouts


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_image_folder(folder: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, classes) of an ImageFolder split: one sub-folder per class, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DataRecordError(f"{folder}: no class sub-folders (expected {folder}/<class>/<image>)")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = _image_files(folder / name)
        if not found:
            raise DataRecordError(f"{folder / name}: class {name!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += [str(p) for p in found]
        labels += [label] * len(found)
    return files, labels, classes


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file {path} does not exist (expected torchvision's extracted layout)")
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def read_cifar(data_root: str | os.PathLike, name: str, split: str) -> tuple[list[np.ndarray], list[int], list[str]]:
    """(images (H, W, 3) uint8, labels, classes) of CIFAR-10/100's train or test split in torchvision's layout."""
    root = Path(data_root)
    folder, files, meta, key, names = {
        "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                    "batches.meta", "labels", "label_names"),
        "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "meta", "fine_labels",
                     "fine_label_names"),
    }[name]
    if root.name != folder:
        root = root / folder
    images, labels = [], []
    for file in files[split]:
        entry = _unpickle(root / file)
        if "data" not in entry or key not in entry:
            raise DataRecordError(f"{root / file}: expected keys 'data' and {key!r}, got {sorted(entry)}")
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        images += list(data)
        labels += [int(y) for y in entry[key]]
    classes = list(_unpickle(root / meta)[names])
    _check_labels(labels, len(classes), root)
    return images, labels, classes


def read_flowers_split_file(data_root: str | os.PathLike, split: str) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, classes) of one split of the authors' Flowers-102 layout (annots/split.csv, metadata.csv)."""
    root = Path(data_root)
    with open(root / "annots" / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        index = {row["class_name"]: int(row["idx"]) for row in rows}
    except KeyError as exc:
        raise DataRecordError(f"{root / 'annots' / 'metadata.csv'}: needs columns idx, class_name ({exc})") from None
    if sorted(index.values()) != list(range(len(index))):
        raise DataRecordError(f"{root / 'annots' / 'metadata.csv'}: idx must be 0..{len(index) - 1}, each once")
    classes = [name for name, _ in sorted(index.items(), key=lambda kv: kv[1])]
    files, labels = [], []
    with open(root / "annots" / "split.csv", newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            if row.get("split") != split:
                continue
            if row.get("class") not in index:
                raise DataRecordError(f"{root / 'annots' / 'split.csv'}: line {line}: class {row.get('class')!r} is not "
                                      "in metadata.csv")
            path = root / "images" / row["filename"]
            if not path.is_file():
                raise FileNotFoundError(f"{root / 'annots' / 'split.csv'}: line {line}: image {path} does not exist")
            files.append(str(path))
            labels.append(index[row["class"]])
    return files, labels, classes


def _check_labels(labels: list[int], num_classes: int, where: Any) -> None:
    bad = sorted({y for y in labels if not 0 <= y < num_classes})
    if bad:
        raise DataRecordError(f"{where}: labels {bad[:5]} outside 0..{num_classes - 1}")


@dataclass(frozen=True)
class ImageFolderCalibration:
    """Calibration images: an ImageNet-style folder (any depth; labels from the first sub-folder when images
    sit in class folders, for gradient methods; none needed otherwise) and their batches.

    Args:
        image_root: the folder (e.g. ImageNet's ``train/``); None: no calibration data.
        image_size: side of the square calibration crops.
        batch_size: images per calibration batch.
        crop_scale: RandomResizedCrop scale range.
    """

    image_root: str | None = None
    image_size: int = 224
    batch_size: int = 32
    crop_scale: tuple[float, float] = CALIBRATION_CROP_SCALE

    def __post_init__(self) -> None:
        check_positive(**{"calibration.image_size": self.image_size, "calibration.batch_size": self.batch_size})
        object.__setattr__(self, "crop_scale", check_crop_scale(self.crop_scale, "calibration.crop_scale"))


# The datamodule's hyperparameters hold this config: a resumed fit's `torch.load(weights_only=True)` must accept it.
torch.serialization.add_safe_globals([ImageFolderCalibration])


def read_calibration_folder(image_root: str | os.PathLike) -> tuple[list[str], list[int] | None, list[str]]:
    """(files, labels or None, classes) of a calibration folder: class folders give labels, loose images none."""
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"calibration.image_root {root} does not exist")
    files = _image_files(root)
    if not files:
        raise DataRecordError(f"calibration.image_root {root}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    tops = [p.relative_to(root).parts for p in files]
    if all(len(parts) > 1 for parts in tops):
        classes = sorted({parts[0] for parts in tops})
        index = {name: i for i, name in enumerate(classes)}
        return [str(p) for p in files], [index[parts[0]] for parts in tops], classes
    return [str(p) for p in files], None, []


class ImageClassificationDataModule(L.LightningDataModule):
    """CIFAR-10/100, Flowers-102 or any ImageFolder, with the authors' transforms, and calibration images.

    Args:
        data_root: the dataset's folder (layouts in the module docstring).
        dataset: ``cifar10``, ``cifar100``, ``flowers102`` or ``imagefolder``.
        image_size: training crop and evaluation centre-crop side.
        resize_size: evaluation resize of the short side before the centre crop.
        batch_size: training batch per process (the last partial batch is dropped, as the authors do).
        eval_batch_size: evaluation batch (None: batch_size).
        num_workers: DataLoader processes.
        augment: RandAugment on training images.
        merge_val: train on train + val (the authors' Flowers-102 setting); validation then runs on test.
        calibration: the images of `calibration_dataloader()`.
        seed: calibration order and crops.
    """

    def __init__(
        self,
        data_root: str,
        dataset: Dataset_ = "imagefolder",
        image_size: int = 224,
        resize_size: int = 256,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        augment: bool = True,
        merge_val: bool = False,
        calibration: ImageFolderCalibration = ImageFolderCalibration(),
        seed: int = 0,
    ):
        super().__init__()
        if dataset not in ("cifar10", "cifar100", "flowers102", "imagefolder"):
            raise ValueError(f"dataset must be cifar10, cifar100, flowers102 or imagefolder, got {dataset!r}")
        check_positive(image_size=image_size, resize_size=resize_size, batch_size=batch_size)
        self.save_hyperparameters()
        self.data_root, self.dataset_name = os.fspath(data_root), dataset
        self.image_size, self.resize_size = image_size, resize_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.augment, self.merge_val = num_workers, augment, merge_val
        self.calibration, self.seed = calibration, seed
        self._datasets: dict[str, LabeledImages] = {}

    # ---- raw splits ---------------------------------------------------------------------------
    def _split_files(self, split: str) -> tuple[list[Source], list[int], list[str]]:
        """(images, labels, classes) of one split as stored on disk."""
        root = Path(self.data_root)
        if self.dataset_name in ("cifar10", "cifar100"):
            if split == "val":
                raise FileNotFoundError(f"{self.dataset_name} has no val split")
            return read_cifar(root, self.dataset_name, split)
        if self.dataset_name == "flowers102" and (root / "annots" / "split.csv").is_file():
            return read_flowers_split_file(root, split)
        return read_image_folder(root / split)

    def has_split(self, split: str) -> bool:
        """Whether the data holds `split` (CIFAR: train and test; split files: rows of it; folders: the folder)."""
        root = Path(self.data_root)
        if self.dataset_name in ("cifar10", "cifar100"):
            return split != "val"
        if self.dataset_name == "flowers102" and (root / "annots" / "split.csv").is_file():
            with open(root / "annots" / "split.csv", newline="") as f:
                return any(row.get("split") == split for row in csv.DictReader(f))
        return (root / split).is_dir()

    @property
    def eval_split(self) -> str:
        """The split validation runs on: ``val`` when present and not merged into training, else ``test``."""
        return "val" if self.has_split("val") and not self.merge_val else "test"

    def dataset(self, split: str) -> LabeledImages:
        """The dataset of ``train``, ``val``, ``test`` or ``calibration``, built and checked once."""
        if split not in self._datasets:
            self._datasets[split] = self._build(split)
        return self._datasets[split]

    def _build(self, split: str) -> LabeledImages:
        if split == "calibration":
            return self._calibration_dataset()
        images, labels, classes = self._split_files(split)
        if split == "train" and self.merge_val and self.has_split("val"):
            more, more_labels, val_classes = self._split_files("val")
            self._check_same_classes(classes, val_classes, "val")
            images, labels = images + more, labels + more_labels
        if split != "train":
            self._check_same_classes(self.classes, classes, split)
        if not images:
            raise DataRecordError(f"{self.dataset_name} at {self.data_root}: the {split} split has no images")
        transform = (classification_train_transform(self.image_size, self.augment) if split == "train"
                     else classification_test_transform(self.image_size, self.resize_size))
        return LabeledImages(images, labels, transform, classes)

    def _check_same_classes(self, expected: list[str], found: list[str], split: str) -> None:
        if expected != found:
            missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
            raise DataRecordError(
                f"{self.dataset_name} at {self.data_root}: the {split} split's classes differ from train's "
                f"(missing {missing[:5]}, extra {extra[:5]}{', or in another order' if not (missing or extra) else ''}): "
                "labels would not match"
            )

    @property
    def classes(self) -> list[str]:
        """The class names of the training split, in label order."""
        return self.dataset("train").classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        """Read and check the splits the stage uses, so bad data fails before training."""
        splits = {"fit": ("train", self.eval_split), "validate": ("train", self.eval_split),
                  "test": ("train", "test")}.get(stage, ("train",))
        for split in splits:
            self.dataset(split)

    # ---- loaders ------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(), **kwargs)

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        world_size, _ = trainer_world(self)
        if len(dataset) // world_size < self.batch_size:
            raise ValueError(f"{len(dataset)} training images over {world_size} process(es) is fewer than "
                             f"batch_size={self.batch_size}; the last partial batch is dropped, so none would run")
        return self._loader(dataset, self.batch_size, shuffle=True, drop_last=True)

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self.dataset(split)
        world_size, rank = trainer_world(self)
        sampler = None
        if world_size > 1:  # every image evaluated exactly once; torchmetrics sums the counts over ranks
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return self._loader(dataset, self.eval_batch_size, shuffle=False, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.eval_split)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _calibration_dataset(self) -> LabeledImages:
        config = self.calibration
        if not config.image_root:
            raise ValueError(f"{type(self).__name__} has no calibration images: set calibration.image_root "
                             "(recipe key data.calibration.image_root), e.g. ImageNet's train folder")
        files, labels, classes = read_calibration_folder(config.image_root)
        transform = build_train_transform(config.image_size, config.crop_scale)
        return LabeledImages(files, labels, transform, classes, augment_seed=self.seed)

    def calibration_dataloader(self, num_replicas: int = 1, rank: int = 0) -> DataLoader:
        """Calibration batches ``{"image"}`` (+ ``"label"`` from class folders): seeded order and crops, sharded."""
        dataset = self.dataset("calibration")
        sampler = ShardSampler(len(dataset), shuffle=True, seed=self.seed, num_replicas=num_replicas, rank=rank)
        return self._loader(dataset, self.calibration.batch_size, sampler=sampler)
