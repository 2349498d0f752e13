"""Every recipe in recipes/ parses and type-checks; the paper's recipes carry the authors' hyperparameters."""
from pathlib import Path

import pytest
import torch
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
    "chita": ("chita", None, False),
    "chita++": ("chita++", None, False),
    "sparsegpt": ("sparsegpt", None, False),
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
        # the MULTIFLOW code's calibration: 3000 steps of 32 CC3M + 32 VG captions, per-model texts, fp32
        init = data["data"]["init_args"]
        assert init["pair_sources"] is True and init["batch_size"] == 32 and len(init["calibration_json"]) == 2
        texts = (init["max_length"], init.get("add_sep", True))
        assert texts == ((30, True) if model == "blip" else (40, False))
        assert pruning["num_batches"] == (50 if method == "chita" else 3000)
    assert data["precision"] == "32-true"
    if method in ("itersnip", "chita++"):  # the authors' 60 rounds of 50 batches
        assert (pruning["rounds"], pruning["num_batches"]) == (60, 3000)
    if method == "chita":
        assert pruning["num_batches"] == 50


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
        assert (model["num_beams"], model["max_generated_length"], model["min_generated_length"]) == (3, 20, 5)
        assert model["prompt"] == datamodule["prompt"] == "a picture of "
    if "retrieval" in relative:
        assert model["k_test"] == 256
    if "vqa" in relative:
        assert model["k_test"] == 128
        assert len(datamodule["train_json"]) == 3  # VQA v2 train + val + VG QA
    assert data["pruning"]["masks"].endswith("prune/multiflow/scores.safetensors")


# The switches that reproduce the authors' code (README "Our fine-tuning vs the authors' code"), per recipe:
# model settings, datamodule settings.
PROTOCOL = {
    "blip/retrieval_coco.yaml": ({"momentum_rule": "swapped", "gather": False, "momentum": 0.995, "alpha": 0.4}, {}),
    "xvlm/retrieval_coco.yaml": ({"gather": True, "gather_backward": "local", "itm_negatives": "local"},
                                 {"max_length": 40}),
    "blip/captioning_coco.yaml": ({"length_normalisation": "sequence"}, {}),
    "xvlm/captioning_coco.yaml": ({"length_normalisation": "sequence"}, {}),
    "blip/vqa_vqav2.yaml": ({"rank_score": "smoothed_loss", "label_smoothing": 0.1},
                            {"vg_answer_weight": 0.5, "answer_suffix": "[SEP]"}),
    "xvlm/vqa_vqav2.yaml": ({"rank_score": "first_token_twice", "candidate_suffix": "[SEP]", "label_smoothing": 0.0},
                            {"vg_answer_weight": 0.5, "answer_suffix": "[SEP]", "max_length": 40}),
}


@pytest.mark.parametrize("relative", sorted(PROTOCOL))
def test_downstream_recipes_reproduce_the_authors_protocol(relative):
    model_settings, data_settings = PROTOCOL[relative]
    data = load(relative)
    model, datamodule = data["model"]["init_args"], data["data"]["init_args"]
    assert {k: model.get(k) for k in model_settings} == model_settings
    assert {k: datamodule.get(k) for k in data_settings} == data_settings
    if "captioning" in relative:  # evaluated every epoch, no checkpoint selected: the last one is kept
        checkpoint = next(c["init_args"] for c in data["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
        assert "monitor" not in checkpoint and checkpoint["save_last"] is True
        assert data["trainer"].get("check_val_every_n_epoch", 1) == 1


# ---------------------------------------------------------------- zero-shot CLIP / SigLIP recipes, run for real
ZERO_SHOT = ("clip", "siglip")


def _zero_shot_helpers():
    """The tiny tokenizer / model builders of tests/tasks/test_zero_shot.py (loaded by path: no package there)."""
    import importlib.util

    path = Path(__file__).parent / "tasks" / "test_zero_shot.py"
    spec = importlib.util.spec_from_file_location("_zero_shot_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_zero_shot(tmp_path_factory):
    """A tiny world, and per family a saved random model and processor (local dirs: nothing downloads)."""
    from transformers import CLIPImageProcessor, CLIPProcessor, SiglipImageProcessor, SiglipProcessor

    from mflightning.data import generate_world

    helpers = _zero_shot_helpers()
    root = tmp_path_factory.mktemp("zero_shot")
    world = generate_world(root / "world", seed=0, sizes=helpers.SIZES, image_size=32)
    with open(world.vocab) as f:
        tokenizer = helpers.clip_tokenizer(str(root / "vocab"), f.read().split())
    processors = {
        "clip": CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                 crop_size={"height": 16, "width": 16}),
                              tokenizer=tokenizer),
        "siglip": SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 16, "width": 16}),
                                  tokenizer=tokenizer),
    }
    dirs = {}
    for kind in ZERO_SHOT:
        helpers.tiny_model(kind, tokenizer).save_pretrained(root / kind / "model")
        processors[kind].save_pretrained(root / kind / "processor")
        dirs[kind] = root / kind
    return world, dirs, helpers.MAX_LENGTH


def _tiny_overrides(kind, tiny_zero_shot, out):
    world, dirs, max_length = tiny_zero_shot
    return [
        "--model.model", str(dirs[kind] / "model"), "--data.processor", str(dirs[kind] / "processor"),
        "--data.image_root", world.image_root, "--data.num_workers", "0", "--data.max_length", str(max_length),
        "--data.calibration.json", world.calibration, "--data.calibration.image_root", world.image_root,
        "--data.calibration.batch_size", "4", "--data.calibration.max_length", str(max_length),
        "--pruning.num_batches", "4",
    ]


def test_the_zero_shot_recipes_exist():
    names = {str(p.relative_to(RECIPES)) for p in ALL}
    for kind in ZERO_SHOT:
        assert {f"{kind}/zero_shot_coco.yaml", f"{kind}/prune/multiflow.yaml"} <= names
        data = load(f"{kind}/zero_shot_coco.yaml")
        assert data["model"]["class_path"] == "mflightning.tasks.ZeroShotRetrievalModule"
        assert data["data"]["class_path"] == "mflightning.data.ProcessorDataModule"
        assert data["model"]["init_args"]["model"] == data["data"]["init_args"]["processor"]
        assert data["pruning"]["method"] == "multiflow" and data["pruning"]["sparsity"] == 0.5
    assert load("siglip/zero_shot_coco.yaml")["model"]["init_args"]["use_attention_mask"] is False


@pytest.mark.parametrize("kind", ZERO_SHOT)
def test_zero_shot_recipe_prunes_at_test_start_and_scores(kind, tiny_zero_shot, tmp_path):
    """`mflightning test` on the recipe, with only the model, processor, data and trainer made tiny/CPU."""
    from mflightning.cli import cli_main

    world = tiny_zero_shot[0]
    cli = cli_main([
        "test", "--config", str(RECIPES / kind / "zero_shot_coco.yaml"),
        *_tiny_overrides(kind, tiny_zero_shot, tmp_path),
        "--data.test_json", world.retrieval_test, "--data.val_json", world.retrieval_val,
        "--data.eval_batch_size", "5", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.strategy", "auto", "--trainer.precision", "32-true", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--pruning.save_masks", str(tmp_path / "masks.safetensors"),
    ])
    metrics = cli.model.eval_results["test"]
    assert {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"} <= set(metrics)
    assert metrics["num_images"] == 12
    callback = cli.pruning_callback
    assert callback.measured_sparsity()["total"] == pytest.approx(0.5, abs=0.01)
    assert (tmp_path / "masks.safetensors").is_file()
    params = dict(cli.model.named_parameters())
    projections = [n for n in params if "projection" in n or "model.head." in n]  # heads into the joint space
    assert projections and not any(n in callback.kept_masks for n in projections)


@pytest.mark.parametrize("kind", ZERO_SHOT)
def test_zero_shot_prune_recipe_writes_masks_the_test_recipe_applies(kind, tiny_zero_shot, tmp_path):
    from mflightning.cli import cli_main
    from mflightning.pruning import PruningResult

    world = tiny_zero_shot[0]
    outputs = cli_main(["prune", "--config", str(RECIPES / kind / "prune" / "multiflow.yaml"),
                        *_tiny_overrides(kind, tiny_zero_shot, tmp_path), "--output_dir", str(tmp_path / "prune"),
                        "--device", "cpu", "--precision", "32-true", "--progress", "false"])
    saved = PruningResult.load(outputs.scores)
    assert saved.sparsity == pytest.approx(0.5, abs=0.01) and set(saved.group_sparsity()) == {"vision", "text"}
    cli = cli_main([
        "test", "--config", str(RECIPES / kind / "zero_shot_coco.yaml"),
        *_tiny_overrides(kind, tiny_zero_shot, tmp_path),
        "--data.test_json", world.retrieval_test, "--data.val_json", world.retrieval_val,
        "--pruning.masks", str(outputs.scores),
        "--pruning.save_masks", "null", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.strategy", "auto", "--trainer.precision", "32-true", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
    ])
    kept = cli.pruning_callback.kept_masks
    assert set(kept) == set(saved.masks)
    assert all(torch.equal(kept[name], saved.masks[name].bool()) for name in kept)
    assert "r_mean" in cli.model.eval_results["test"]


def test_paper_recipes_follow_the_authors_fine_tuning_protocol():
    """Issue 23 part B: the authors' augmentation and text cleaning (tasks and calibration), BLIP VQA's drop path,
    BLIP retrieval's momentum encoders and queue from the pretraining file, XVLM VQA's dense decoder, and the
    optional XVLM captioning-pretraining stage that the captioning recipe can start from."""
    for relative in sorted(AUTHORS) + [f"{m}/prune/{s}.yaml" for m in ("blip", "xvlm") for s in METHOD_RECIPES]:
        data = load(relative)
        if "data" not in data:
            continue  # data-free pruning (omp, lamp, random)
        datamodule = data["data"]["init_args"]
        assert (datamodule["augment"], datamodule["text_cleaning"]) == ("authors", "authors"), relative
    assert load("blip/vqa_vqav2.yaml")["model"]["init_args"]["backbone"]["drop_path_rate"] == 0.1
    assert "drop_path_rate" not in load("blip/retrieval_coco.yaml")["model"]["init_args"]["backbone"]
    assert load("blip/retrieval_coco.yaml")["model"]["init_args"]["momentum_from_checkpoint"] is True
    assert load("xvlm/vqa_vqav2.yaml")["model"]["init_args"]["inherit_decoder_masks"] is False
    stage = load("xvlm/captioning_pretrain.yaml")
    model, trainer = stage["model"]["init_args"], stage["trainer"]
    assert (trainer["max_epochs"], trainer["gradient_clip_val"], model["lr"], model["prompt"],
            model["label_smoothing"]) == (1, 1.0, 3e-5, "", 0.0)
    saved = [c["init_args"]["dirpath"] for c in trainer["callbacks"] if c["class_path"].endswith("SaveBackbone")]
    assert saved == ["outputs/xvlm/captioning_pretrain/backbone"]
    assert f"checkpoint: {saved[0]}" in (RECIPES / "xvlm/captioning_coco.yaml").read_text()
