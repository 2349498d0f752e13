"""The DINO recipes: the authors' settings, and prune once -> fine-tune through the CLI on a tiny random ViT with
generated ImageNet-style and CIFAR-10 folders (the recipes' own files, only sizes overridden)."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mflightning import PruningResult
from mflightning.cli import cli_main
from mflightning.testing import write_image_folder

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "dino"
TINY = json.dumps(dict(family="vit", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=8))
METHODS = {"multiflow": ("multiflow", None, False), "omp": ("omp", None, False), "lamp": ("lamp", None, False),
           "random": ("random", None, False), "wanda": ("wanda", None, False), "snip": ("snip", None, False),
           "itersnip": ("itersnip", None, False), "multiflow_no_distribution": ("multiflow", "global", False),
           "multiflow_inversion": ("multiflow", None, True)}


@pytest.mark.parametrize("stem", sorted(METHODS))
def test_pruning_recipes_prune_dino_once_on_imagenet(stem):
    data = yaml.safe_load((RECIPES / "prune" / f"{stem}.yaml").read_text())
    method, allocation, invert = METHODS[stem]
    pruning = data["pruning"]
    assert (pruning["method"], pruning.get("allocation"), pruning.get("invert", False)) == (method, allocation, invert)
    assert pruning["sparsity"] == 0.75 and data["output_dir"] == f"outputs/dino/prune/{stem}"
    assert data["model"]["init_args"] == {"backbone": "facebook/dino-vitb16", "num_classes": 1000}
    if method in ("omp", "lamp", "random"):
        assert "data" not in data
    else:
        calibration = data["data"]["init_args"]["calibration"]
        assert (calibration["image_size"], calibration["batch_size"]) == (224, 32)
        assert pruning["num_batches"] == 3000


@pytest.mark.parametrize("stem,classes", [("cifar10", 10), ("cifar100", 100), ("flowers102", 102)])
def test_transfer_recipes_use_the_authors_settings(stem, classes):
    data = yaml.safe_load((RECIPES / f"{stem}.yaml").read_text())
    trainer, model, dm = data["trainer"], data["model"]["init_args"], data["data"]["init_args"]
    assert (trainer["max_epochs"], trainer["precision"], trainer["devices"], data["seed_everything"]) == \
        (10, "16-mixed", 1, 42)
    assert model == {"backbone": "facebook/dino-vitb16", "num_classes": classes, "lr": 1e-5, "weight_decay": 0.0,
                     "warmup_ratio": 0.1, "schedule": "cosine"}
    assert (dm["dataset"], dm["batch_size"], dm["image_size"], dm["resize_size"]) == (stem, 32, 224, 256)
    assert dm.get("merge_val", False) == (stem == "flowers102")
    assert data["pruning"]["masks"] == "outputs/dino/prune/multiflow/scores.safetensors"


def write_cifar10(root: Path) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (2, 3072), dtype=np.uint8), "labels": [0, 1]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_prune_once_with_snip_then_fine_tune_on_cifar10(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipes' relative data/ and outputs/ paths
    write_image_folder("data/imagenet", splits=("train",), classes=("n01", "n02"), per_class=2)
    write_cifar10(tmp_path / "data" / "cifar10")
    small = ["--model.backbone", TINY, "--data.num_workers", "0"]
    cli_main(["prune", "--config", str(RECIPES / "prune" / "snip.yaml"), *small, "--data.calibration.image_size", "16",
              "--data.calibration.batch_size", "2", "--pruning.num_batches", "2", "--device", "cpu",
              "--progress", "false"])
    scores = PruningResult.load("outputs/dino/prune/snip/scores.safetensors")
    assert scores.method == "snip" and len(scores.masks) == 12 and set(scores.groups.values()) == {"vision"}
    assert all(name.startswith("layers.") for name in scores.masks)  # the bare ViTModel: fits any head
    cli = cli_main(["fit", "--config", str(RECIPES / "cifar10.yaml"), *small, "--data.image_size", "16",
                    "--data.resize_size", "16", "--data.batch_size", "2", "--trainer.accelerator", "cpu",
                    "--trainer.precision", "32-true", "--trainer.max_epochs", "1",
                    "--trainer.enable_progress_bar", "false",
                    "--pruning.masks", "outputs/dino/prune/snip/scores.safetensors", "--pruning.sparsity", "0.5"])
    callback = cli.pruning_callback
    assert cli.trainer.global_step == 5 and cli.model.head.out_features == 10
    assert set(callback.kept_masks) == {f"backbone.{n}" for n in scores.masks}
    params = dict(cli.model.named_parameters())
    assert all((params[n].detach()[~kept] == 0).all() for n, kept in callback.kept_masks.items())
    assert callback.measured_sparsity()["total"] == pytest.approx(0.5, abs=0.01)
    assert 0.0 <= float(cli.trainer.callback_metrics["val/top1"]) <= 1.0
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
