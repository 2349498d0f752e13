"""Image transforms of the recipes: random crops + flip + RandAugment for training, resize for eval.

Two augmentations: torchvision's ``RandAugment(2, 7)`` (14 ops, magnitude 7 of 30 bins) and the authors' own
``RandomAugment(2, 7)`` (10 ops, each applied with probability 0.5, level 7 of 10), written here from their
definitions (``augment="authors"``).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

#: ``augment`` values: True/"torchvision" (RandAugment), "authors" (RandomAugment), False (none).
Augment = bool | Literal["torchvision", "authors"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TASK_CROP_SCALE = (0.5, 1.0)
CALIBRATION_CROP_SCALE = (0.2, 1.0)


def normalize() -> T.Normalize:
    """CLIP mean/std normalisation (what BLIP's and XVLM's image encoders expect)."""
    return T.Normalize(CLIP_MEAN, CLIP_STD)


def build_train_transform(
    image_size: int,
    scale: tuple[float, float] = TASK_CROP_SCALE,
    augment: Augment = True,
    hflip: bool = True,
) -> T.Compose:
    """RandomResizedCrop(scale) + horizontal flip + augmentation: torchvision's RandAugment(2, 7) (True or
    "torchvision"), the authors' RandomAugment(2, 7) ("authors") or none (False)."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if augment not in (True, False, "torchvision", "authors"):
        raise ValueError(f"augment must be True, False, 'torchvision' or 'authors', got {augment!r}")
    steps = [T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if augment == "authors":
        steps.append(RandomAugment())
    elif augment:
        steps.append(T.RandAugment(num_ops=2, magnitude=7))
    steps += [T.ToTensor(), normalize()]
    return T.Compose(steps)


def build_test_transform(image_size: int) -> T.Compose:
    """Resize to (image_size, image_size), bicubic, then CLIP normalisation."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return T.Compose(
        [T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC), T.ToTensor(), normalize()]
    )


# ---------------------------------------------------------------------------------------------------------------
# The authors' RandomAugment(2, 7) (their datasets/randaugment.py, from the X-VLM code), re-implemented from its
# definition: N=2 ops drawn uniformly WITH replacement from 10, each applied with probability 0.5, at level 7 of 10.
AUTHORS_AUGMENT_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
                       "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
AUTHORS_AUGMENT_LEVEL = 7
MAX_LEVEL = 10
AUGMENT_FILL = 128  # grey fill of the pixels the geometric ops uncover (their replace_value)
_SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}  # magnitude negated with probability 0.5


def augment_arguments(name: str, level: float, negate: bool = False) -> tuple[float, ...]:
    """An op's arguments at ``level`` (of ``MAX_LEVEL``), as their ``arg_dict``: Brightness/Sharpness factor
    ``level/10 * 1.8 + 0.1`` (1.36 at 7, never below 1 there); shear ``level/10 * 0.3``; translation
    ``level/10 * 10`` PIXELS (7 px whatever the image size); rotation ``level/10 * 30`` degrees; signed ops
    negated when ``negate``."""
    if name not in AUTHORS_AUGMENT_OPS:
        raise ValueError(f"unknown augmentation op {name!r}; known: {AUTHORS_AUGMENT_OPS}")
    fraction = level / MAX_LEVEL
    magnitude = {"Brightness": fraction * 1.8 + 0.1, "Sharpness": fraction * 1.8 + 0.1,
                 "ShearX": fraction * 0.3, "ShearY": fraction * 0.3,
                 "TranslateX": fraction * 10.0, "TranslateY": fraction * 10.0, "Rotate": fraction * 30.0}.get(name)
    if magnitude is None:
        return ()
    return (-magnitude if negate and name in _SIGNED else magnitude,)


def _per_channel(img: np.ndarray, table_of: Callable[[np.ndarray], np.ndarray | None]) -> np.ndarray:
    """Map each channel through the 256-entry lookup table ``table_of(channel)`` (None: unchanged)."""
    out = img.copy()
    for c in range(img.shape[2]):
        table = table_of(img[:, :, c])
        if table is not None:
            out[:, :, c] = table[img[:, :, c]]
    return out


def _autocontrast_table(ch: np.ndarray) -> np.ndarray | None:
    low, high = int(ch.min()), int(ch.max())
    if high <= low:
        return None
    scale = 255.0 / (high - low)
    return (np.arange(256) * scale - low * scale).clip(0, 255).astype(np.uint8)  # truncated, as theirs


def _equalize_table(ch: np.ndarray) -> np.ndarray | None:
    hist = np.bincount(ch.ravel(), minlength=256)
    nonzero = hist[hist != 0]
    step = int(nonzero[:-1].sum()) // 255
    if step == 0:
        return None
    shifted = np.empty_like(hist)
    shifted[0], shifted[1:] = step // 2, hist[:-1]
    return (np.cumsum(shifted) // step).clip(0, 255).astype(np.uint8)


def _sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the 3x3 smoothing kernel [[1,1,1],[1,5,1],[1,1,1]]/13 inside a 1-pixel border (kept as is).

    Their result is cast to uint8 without clipping, so values past 255 wrap around; we clip (as PIL does).
    """
    if factor == 1.0:
        return img.copy()
    x = img.astype(np.float32)
    h, w = img.shape[:2]
    neighbours = sum(x[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    smooth = np.rint((neighbours + 4 * x[1:-1, 1:-1]) / 13)  # uint8 filter output, rounded
    out = x.copy()
    out[1:-1, 1:-1] = smooth + factor * (x[1:-1, 1:-1] - smooth)
    return out.clip(0, 255).astype(np.uint8)


def _warp_affine(img: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """OpenCV's ``warpAffine(img, M)``: output pixel p takes the input at ``M^-1 p`` (pixel centres at integer
    coordinates), bilinear, uncovered input reading the grey fill; rounded to uint8."""
    h, w = img.shape[:2]
    forward = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)[:2]
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    grid = torch.from_numpy(np.stack([2 * src_x / max(w - 1, 1) - 1, 2 * src_y / max(h - 1, 1) - 1], -1))[None]
    centred = torch.from_numpy(img.astype(np.float64) - AUGMENT_FILL).permute(2, 0, 1)[None]
    out = F.grid_sample(centred, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return (out[0].permute(1, 2, 0).numpy() + AUGMENT_FILL).round().clip(0, 255).astype(np.uint8)


def _rotation_matrix(img: np.ndarray, degrees: float) -> np.ndarray:
    """OpenCV's ``getRotationMatrix2D((W/2, H/2), degrees, 1)``: counter-clockwise for positive degrees."""
    h, w = img.shape[:2]
    cx, cy = w / 2, h / 2
    a, b = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]])


def apply_augment_op(img: np.ndarray, name: str, *args: float) -> np.ndarray:
    """Apply one of ``AUTHORS_AUGMENT_OPS`` to an RGB uint8 ``(H, W, 3)`` array with its arguments."""
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return _per_channel(img, _autocontrast_table)
    if name == "Equalize":
        return _per_channel(img, _equalize_table)
    if name == "Brightness":
        return (np.arange(256, dtype=np.float32) * args[0]).clip(0, 255).astype(np.uint8)[img]
    if name == "Sharpness":
        return _sharpness(img, args[0])
    if name == "Rotate":
        return _warp_affine(img, _rotation_matrix(img, args[0]))
    matrices = {"ShearX": [[1, args[0], 0], [0, 1, 0]] if args else None,
                "ShearY": [[1, 0, 0], [args[0], 1, 0]] if args else None,
                "TranslateX": [[1, 0, -args[0]], [0, 1, 0]] if args else None,
                "TranslateY": [[1, 0, 0], [0, 1, -args[0]]] if args else None}
    if name not in matrices:
        raise ValueError(f"unknown augmentation op {name!r}; known: {AUTHORS_AUGMENT_OPS}")
    return _warp_affine(img, np.array(matrices[name], dtype=np.float64))


class RandomAugment:
    """The authors' ``RandomAugment(2, 7, isPIL=True, augs=[10 ops])`` on PIL images (returns a PIL image).

    Draws ``num_ops`` ops uniformly with replacement from ``ops``; each is skipped with probability
    ``1 - prob``, else applied at ``level`` (``augment_arguments``; the signed ops take either sign).
    Randomness comes from torch's global RNG, so the datasets' per-item seeding covers it.
    """

    def __init__(self, num_ops: int = 2, level: float = AUTHORS_AUGMENT_LEVEL, ops: Sequence[str] = AUTHORS_AUGMENT_OPS,
                 prob: float = 0.5):
        unknown = [op for op in ops if op not in AUTHORS_AUGMENT_OPS]
        if unknown or not ops:
            raise ValueError(f"unknown augmentation ops {unknown or '(none given)'}; known: {AUTHORS_AUGMENT_OPS}")
        self.num_ops, self.level, self.ops, self.prob = int(num_ops), float(level), tuple(ops), float(prob)

    def sample(self) -> list[tuple[str, tuple[float, ...]]]:
        """The ops to apply to one image, with their arguments (skipped ones left out)."""
        chosen = torch.randint(len(self.ops), (self.num_ops,)).tolist()
        applied = []
        for index in chosen:
            if float(torch.rand(())) > self.prob:
                continue
            name = self.ops[index]
            negate = name in _SIGNED and float(torch.rand(())) < 0.5
            applied.append((name, augment_arguments(name, self.level, negate)))
        return applied

    def __call__(self, image: Image.Image) -> Image.Image:
        img = np.asarray(image.convert("RGB"), dtype=np.uint8)
        for name, args in self.sample():
            img = apply_augment_op(img, name, *args)
        return Image.fromarray(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_ops={self.num_ops}, level={self.level}, prob={self.prob}, ops={list(self.ops)})"
