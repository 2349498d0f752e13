"""Image transforms of the BLIP recipes: random crops + flip + RandAugment for training, resize for eval."""

from __future__ import annotations

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

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
    augment: bool = True,
    hflip: bool = True,
) -> T.Compose:
    """RandomResizedCrop(scale) + horizontal flip + RandAugment(2, 7) (skipped when augment=False)."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    steps = [T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if augment:
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
