"""ImageClassificationDataModule on small generated folders in each layout: torchvision's CIFAR-10/100 pickles,
the authors' Flowers-102 split files, ImageFolder; the authors' transforms; the seeded calibration loader."""
import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mflightning.data import ImageClassificationDataModule, ImageFolderCalibration
from mflightning.data.classification import classification_test_transform, classification_train_transform
from mflightning.data.records import DataRecordError
from mflightning.testing import write_image_folder

SIZE = 16


def _image(path: Path, colour: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(colour)
    Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(path)


def write_cifar(root: Path, hundred: bool) -> np.ndarray:
    """torchvision's extracted CIFAR layout with a few images per file; returns the train images (N, 32, 32, 3)."""
    rng = np.random.default_rng(0)
    folder, files, key = (("cifar-100-python", {"train": ["train"], "test": ["test"]}, "fine_labels") if hundred else
                          ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)],
                                                   "test": ["test_batch"]}, "labels"))
    (root / folder).mkdir(parents=True)
    names = [f"class{i}" for i in range(4)]
    train = []
    for split, chunks in files.items():
        for i, chunk in enumerate(chunks):
            data = rng.integers(0, 255, (3, 3 * 32 * 32), dtype=np.uint8)
            labels = [(i + j) % 4 for j in range(3)]
            with open(root / folder / chunk, "wb") as f:
                pickle.dump({"data": data, key: labels}, f)
            if split == "train":
                train.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    meta = ("meta", {"fine_label_names": names, "coarse_label_names": ["x"]}) if hundred else \
        ("batches.meta", {"label_names": names})
    with open(root / folder / meta[0], "wb") as f:
        pickle.dump(meta[1], f)
    return np.concatenate(train)


def write_flowers_split_file(root: Path) -> None:
    """The authors' layout: annots/split.csv (filename, split, class), annots/metadata.csv (idx, class_name), images/."""
    (root / "annots").mkdir(parents=True)
    classes = ["rose", "tulip", "daisy"]
    with open(root / "annots" / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["idx", "class_name"])
        writer.writerows([[i, name] for i, name in enumerate(classes)])
    rows = []
    for n, split in enumerate(["train"] * 6 + ["val"] * 3 + ["test"] * 3):
        filename = f"image_{n:05d}.jpg"
        _image(root / "images" / filename, n)
        rows.append([filename, split, classes[n % 3]])
    with open(root / "annots" / "split.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "split", "class"])
        writer.writerows(rows)


def module(root, dataset, **kwargs):
    return ImageClassificationDataModule(root, dataset=dataset, image_size=SIZE, resize_size=18, batch_size=2,
                                         num_workers=0, **kwargs)


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_pickles_in_torchvisions_layout(tmp_path, hundred):
    train_images = write_cifar(tmp_path, hundred)
    dm = module(tmp_path, "cifar100" if hundred else "cifar10")
    dm.setup("fit")
    assert dm.classes == [f"class{i}" for i in range(4)] and dm.eval_split == "test"
    assert len(dm.dataset("train")) == (3 if hundred else 15) and len(dm.dataset("test")) == 3
    assert dm.dataset("train").labels[:3] == [0, 1, 2]
    # pixels arrive as stored (rows of 3x32x32, channel-major): item 1 of the first file
    np.testing.assert_array_equal(dm.dataset("train").sources[1], train_images[1])
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, SIZE, SIZE) and batch["label"].dtype == torch.long
    # the folder itself works as data_root too
    inner = next(tmp_path.iterdir())
    assert len(module(inner, "cifar100" if hundred else "cifar10").dataset("test")) == 3


def test_flowers_split_files_merge_val_into_train_as_the_authors(tmp_path):
    write_flowers_split_file(tmp_path)
    merged = module(tmp_path, "flowers102", merge_val=True)
    merged.setup("fit")
    assert merged.classes == ["rose", "tulip", "daisy"]
    assert len(merged.dataset("train")) == 9 and merged.eval_split == "test"
    assert merged.dataset("test").labels == [0, 1, 2]  # rows 9, 10, 11: classes n % 3
    separate = module(tmp_path, "flowers102")
    assert len(separate.dataset("train")) == 6 and separate.eval_split == "val"
    assert len(separate.val_dataloader().dataset) == 3


def test_flowers_and_any_image_folder(tmp_path):
    write_image_folder(tmp_path / "flowers", splits=("train", "val", "test"))
    dm = module(tmp_path / "flowers", "flowers102", merge_val=True)
    dm.setup("fit")
    assert dm.classes == ["cat", "dog", "owl"] and len(dm.dataset("train")) == 12
    write_image_folder(tmp_path / "folder")
    dm = module(tmp_path / "folder", "imagefolder")
    dm.setup("fit")
    assert dm.eval_split == "test" and dm.dataset("test").labels == [0, 0, 1, 1, 2, 2]
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, SIZE, SIZE) and batch["label"].tolist() == [0, 0]


def test_bad_layouts_name_the_problem(tmp_path):
    write_image_folder(tmp_path / "a")
    (tmp_path / "a" / "test" / "owl").rename(tmp_path / "a" / "test" / "eagle")
    with pytest.raises(DataRecordError, match=r"test split's classes differ.*missing \['owl'\], extra \['eagle'\]"):
        module(tmp_path / "a", "imagefolder").setup("fit")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        module(tmp_path / "a", "cifar10").setup("fit")
    with pytest.raises(ValueError, match="dataset must be"):
        module(tmp_path / "a", "svhn")
    write_flowers_split_file(tmp_path / "f")
    with open(tmp_path / "f" / "annots" / "split.csv", "a") as f:
        f.write("image_99999.jpg,test,orchid\n")
    with pytest.raises(DataRecordError, match="line 14: class 'orchid' is not in metadata.csv"):
        module(tmp_path / "f", "flowers102").dataset("test")
    with pytest.raises(ValueError, match="calibration.image_root"):
        module(tmp_path / "a", "imagefolder").calibration_dataloader()


def test_the_authors_transforms():
    train = classification_train_transform(224).transforms
    assert isinstance(train[0], T.RandAugment) and (train[0].num_ops, train[0].magnitude) == (2, 9)
    crop = train[1]
    assert isinstance(crop, T.RandomResizedCrop) and crop.size == (224, 224) and crop.scale == (0.08, 1.0)
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    test = classification_test_transform(224, 256).transforms
    assert test[0].size == 256 and test[0].interpolation == T.InterpolationMode.BICUBIC and test[1].size == (224, 224)
    assert train[-1].mean == test[-1].mean == (0.48145466, 0.4578275, 0.40821073)


def test_calibration_folder_is_seeded_sharded_and_labels_are_optional(tmp_path):
    write_image_folder(tmp_path / "imagenet", splits=("train",), classes=("n01", "n02"), per_class=3)
    calibration = ImageFolderCalibration(image_root=str(tmp_path / "imagenet" / "train"), image_size=SIZE, batch_size=2)
    dm = module(tmp_path, "imagefolder", calibration=calibration, seed=3)
    first = [b for b in dm.calibration_dataloader()]
    torch.manual_seed(123)  # the global RNG plays no part
    again = [b for b in dm.calibration_dataloader()]
    assert len(first) == 3 and all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert sorted(torch.cat([b["label"] for b in first]).tolist()) == [0, 0, 0, 1, 1, 1]
    # two ranks share the images without overlap, each crop the same as on one process
    shards = [list(dm.calibration_dataloader(num_replicas=2, rank=r)) for r in (0, 1)]
    one = torch.cat([b["image"] for b in first])
    two = torch.stack([x for r in (0, 1) for b in shards[r] for x in b["image"]])
    assert sorted(map(tuple, one.flatten(1)[:, :8].tolist())) == sorted(map(tuple, two.flatten(1)[:, :8].tolist()))
    # loose images: no labels needed
    for i in range(2):
        _image(tmp_path / "loose" / f"{i}.jpg", i)
    loose = module(tmp_path, "imagefolder", calibration=ImageFolderCalibration(str(tmp_path / "loose"), SIZE, 2))
    assert set(next(iter(loose.calibration_dataloader()))) == {"image"}
