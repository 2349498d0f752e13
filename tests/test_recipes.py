"""Every recipe in recipes/ parses and type-checks; the paper's recipes carry the authors' hyperparameters."""
from pathlib import Path

import pytest
import yaml

from mflightning.cli import PruningSettings, check_recipe, recipe_kind

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL = sorted(RECIPES.rglob("*.yaml"))
METHOD_RECIPES = {  # file stem -> (method, allocation, invert)
    "multiflow": ("multiflow", None, False),
    "omp": ("omp", None, False),
    "lamp": ("lamp", None, False),
    "random": ("random", None, False),
    "wanda": ("wanda", None, False),
    "snip": ("snip", None, False),
    "itersnip": ("itersnip", None, False),
    "multiflow_no_distribution": ("multiflow", "global", False),
    "multiflow_no_multimodality": ("multiflow", "magnitude", False),
    "multiflow_inversion": ("multiflow", None, True),
}
# (task recipe, lr, weight decay, epochs, per-process batch size x 4 GPUs = the authors' total batch)
AUTHORS = {
    "blip/retrieval_coco.yaml": (1e-5, 0.05, 6, 128),
    "blip/captioning_coco.yaml": (1e-5, 0.05, 5, 256),
    "blip/vqa_vqav2.yaml": (2e-5, 0.05, 10, 256),
    "xvlm/retrieval_coco.yaml": (3e-5, 0.01, 10, None),
    "xvlm/captioning_coco.yaml": (1e-5, 0.01, 5, None),
    "xvlm/vqa_vqav2.yaml": (5e-5, 0.01, 10, None),
}


def load(relative: str) -> dict:
    return yaml.safe_load((RECIPES / relative).read_text())


def test_the_recipe_set_is_complete():
    names = {str(p.relative_to(RECIPES)) for p in ALL}
    for model in ("blip", "xvlm"):
        assert {f"{model}/prune/{stem}.yaml" for stem in METHOD_RECIPES} <= names
    assert set(AUTHORS) <= names
    assert {"synthetic/prune_multiflow.yaml", "synthetic/retrieval.yaml", "synthetic/captioning.yaml",
            "synthetic/vqa.yaml", "synthetic/pretrain.yaml"} <= names


@pytest.mark.parametrize("recipe", ALL, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_parses_and_type_checks(recipe):
    report = check_recipe(recipe)  # resolves every class_path and validates every argument, builds nothing
    assert report.kind == recipe_kind(recipe)
    data = yaml.safe_load(recipe.read_text())
    if data.get("pruning"):
        PruningSettings(**data["pruning"]).validate()


@pytest.mark.parametrize("model", ["blip", "xvlm"])
@pytest.mark.parametrize("stem", sorted(METHOD_RECIPES))
def test_pruning_recipes_select_their_method(model, stem):
    data = load(f"{model}/prune/{stem}.yaml")
    method, allocation, invert = METHOD_RECIPES[stem]
    pruning = data["pruning"]
    assert (pruning["method"], pruning.get("allocation"), pruning.get("invert", False)) == (method, allocation, invert)
    assert pruning["sparsity"] == 0.75
    assert data["output_dir"].endswith(f"{model}/prune/{stem}")
    if method in ("omp", "lamp", "random"):
        assert "data" not in data  # data-free
    else:
        assert data["data"]["class_path"] == "mflightning.data.CalibrationDataModule"
        assert data["data"]["init_args"]["max_length"] == 30
    if method == "itersnip":
        assert (pruning["rounds"], pruning["num_batches"]) == (60, 3000)


@pytest.mark.parametrize("relative", sorted(AUTHORS))
def test_downstream_recipes_use_the_authors_settings(relative):
    lr, weight_decay, epochs, total_batch = AUTHORS[relative]
    data = load(relative)
    trainer, model, datamodule = data["trainer"], data["model"]["init_args"], data["data"]["init_args"]
    assert (trainer["devices"], trainer["strategy"], trainer["precision"]) == (-1, "ddp", "bf16-mixed")
    assert trainer["max_epochs"] == epochs
    assert model["lr"] == pytest.approx(lr) and model["weight_decay"] == pytest.approx(weight_decay)
    assert datamodule["image_size"] == 384
    if total_batch is not None:
        assert datamodule["batch_size"] * 4 == total_batch
    if relative.startswith("xvlm/"):
        assert model["betas"] == [0.9, 0.98] and model["warmup_ratio"] == 0.1
    if "captioning" in relative:
        assert (model["num_beams"], model["max_length"], model["min_length"]) == (3, 20, 5)
        assert model["prompt"] == datamodule["prompt"] == "a picture of "
    if "retrieval" in relative:
        assert model["k_test"] == 256
    if "vqa" in relative:
        assert model["k_test"] == 128
        assert len(datamodule["train_json"]) == 3  # VQA v2 train + val + VG QA
    assert data["pruning"]["masks"].endswith("prune/multiflow/scores.safetensors")
