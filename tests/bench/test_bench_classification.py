"""The quality benchmark's vision-only miniature: the world's objects as 30 classes, fine-tuning the image encoder of a
pruned BLIP with the same task-agnostic masks; the default grid and its fingerprint are unchanged."""
import filecmp

import pytest
import torch

from mflightning import prune
from mflightning.bench.quality_classification import (CLASSES, blind_level, classification_world,
                                                      finetune_classification)
from mflightning.bench.quality_settings import QualitySettings, optimizer_steps, settings_fingerprint
from mflightning.families import TaskSettings
from mflightning.models import BlipBackbone, tiny_config


def test_the_images_are_seeded_one_object_per_image_and_thirty_classes(tmp_path):
    a = classification_world(tmp_path / "a", seed=3, image_size=16, per_class=(2, 1))
    b = classification_world(tmp_path / "b", seed=3, image_size=16, per_class=(2, 1))
    folders = sorted(p.name for p in (a / "train").iterdir())
    assert len(CLASSES) == len(folders) == 30 and "red_circle" in folders
    assert len(list((a / "train").rglob("*.png"))) == 60 and len(list((a / "test").rglob("*.png"))) == 30
    assert not filecmp.dircmp(a / "train", b / "train").diff_files  # byte-identical for a seed
    assert all(not filecmp.dircmp(a / "train" / f, b / "train" / f).diff_files for f in folders)
    # balanced classes: the blind guess (most frequent training class) is one class in 30, five in 30
    assert blind_level(a) == pytest.approx({"top1": 100 / 30, "top5": 500 / 30})


def test_classification_is_opt_in_and_leaves_the_default_fingerprint_alone():
    default = QualitySettings()
    assert "classification" not in default.tasks
    assert all("classification" not in per_task for per_task in settings_fingerprint(default)["budgets"].values())
    with_it = QualitySettings(tasks=("classification",))
    assert settings_fingerprint(with_it)["budgets"]["blip"]["classification"] == {"epochs": 20, "lr": 1e-3,
                                                                                  "batch_size": 32}
    # 32 images per class at the CPU world's 160 training images: 960 per epoch, batches of 32
    assert optimizer_steps(with_it)["steps_per_fine_tuning"]["blip"]["classification"] == 20 * 30


def test_the_pruned_backbone_is_fine_tuned_on_its_image_encoder_with_exact_masks(tmp_path):
    root = classification_world(tmp_path / "classes", seed=0, image_size=16, per_class=(2, 1))
    torch.manual_seed(0)
    backbone = BlipBackbone(tiny_config(vocab_size=50, image_size=16, patch_size=8)).eval()
    calibration = [{"image": torch.randn(2, 3, 16, 16), "input_ids": torch.randint(5, 50, (2, 6)),
                    "attention_mask": torch.ones(2, 6, dtype=torch.long)}]
    masks = prune(backbone, sparsity=0.6, calibration=calibration)
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    metrics, sparsity = finetune_classification(backbone, root, TaskSettings(epochs=1, lr=1e-3, batch_size=8), seed=0,
                                                image_size=16, masks=masks, root_dir=tmp_path / "run")
    assert set(metrics) == {"top1", "top5"} and all(0 <= v <= 100 for v in metrics.values())
    # the same task-agnostic masks hold on both groups after fine-tuning; the caller's backbone is untouched
    assert sparsity["total"] == pytest.approx(masks.sparsity) and set(sparsity) >= {"vision", "text"}
    assert all(torch.equal(p, before[n]) for n, p in backbone.named_parameters())
