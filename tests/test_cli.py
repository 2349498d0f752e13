"""The `mflightning` CLI in-process: prune then fit on a tiny synthetic world, overrides, path errors, dry runs."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mflightning.cli import ConfigPathError, RecipeError, check_recipe, cli_main, main
from mflightning.data.synthetic import WorldSizes, generate_world
from mflightning.pruning import PruningResult

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY_BACKBONE = {
    "text_config": {"hidden_size": 32, "encoder_hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "max_position_embeddings": 40},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "image_size": 32, "patch_size": 16, "initializer_range": 0.02},
    "image_text_hidden_size": 16,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny world (32 px) and a random tiny BLIP saved as a pretrained model folder (tied decoder)."""
    from mflightning.pretrain import PretrainModule

    root = tmp_path_factory.mktemp("cli")
    world = generate_world(root / "world", seed=3, image_size=32, sizes=WorldSizes(
        calibration=16, train=8, val=4, test=4, vqa_train=8, vg=2, vqa_test=4, questions_per_image=2))
    torch.manual_seed(0)
    module = PretrainModule(backbone=TINY_BACKBONE, tokenizer=world.vocab)
    model_dir = module.backbone.save_pretrained(root / "pretrained")
    shutil.copyfile(world.vocab, model_dir / "vocab.txt")
    return {"root": root, "world": world, "model": str(model_dir), "vocab": str(model_dir / "vocab.txt")}


def prune_args(tiny, out, *extra):
    w = tiny["world"]
    return ["prune", "--config", str(RECIPES / "synthetic" / "prune_multiflow.yaml"),
            "--model.init_args.backbone", tiny["model"], "--model.init_args.tokenizer", tiny["vocab"],
            "--data.init_args.calibration_json", w.calibration, "--data.init_args.image_root", w.image_root,
            "--data.init_args.tokenizer", tiny["vocab"], "--data.init_args.image_size", "32",
            "--data.init_args.batch_size", "4", "--pruning.num_batches", "3", "--progress", "false",
            "--output_dir", str(out), *extra]


def retrieval_args(tiny, masks, *extra):
    w = tiny["world"]
    return ["fit", "--config", str(RECIPES / "synthetic" / "retrieval.yaml"),
            "--model.init_args.backbone", tiny["model"], "--model.init_args.tokenizer", tiny["vocab"],
            "--model.init_args.k_test", "4",
            "--data.init_args.train_json", w.retrieval_train, "--data.init_args.val_json", w.retrieval_val,
            "--data.init_args.test_json", w.retrieval_test, "--data.init_args.image_root", w.image_root,
            "--data.init_args.tokenizer", tiny["vocab"], "--data.init_args.image_size", "32",
            "--data.init_args.batch_size", "8", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tiny["root"] / "fit"),
            "--pruning.masks", str(masks), *extra]


@pytest.fixture(scope="module")
def pruned(tiny):
    out = tiny["root"] / "prune"
    outputs = cli_main(prune_args(tiny, out))
    return out, outputs


def test_prune_writes_masks_scores_and_reports(pruned):
    out, outputs = pruned
    masks = PruningResult.load(out / "masks.safetensors")
    scores = PruningResult.load(out / "scores.safetensors")
    assert masks.scores is None and scores.scores is not None
    assert masks.method == "multiflow" and masks.allocation == "modality"
    assert masks.sparsity == pytest.approx(0.75, abs=0.01)
    assert set(masks.groups.values()) == {"vision", "text"}
    # pruned on the bare backbone: names do not depend on the PretrainModule wrapper
    assert all(not name.startswith("backbone.") for name in masks.masks)
    assert masks.calibration["num_batches"] == 3
    report = json.loads((out / "report.json").read_text())
    assert set(report["groups"]) == {"vision", "text"}
    assert len(report["layers"]) == len(masks.masks)
    for name, layer in report["layers"].items():
        assert layer["sparsity"] == pytest.approx(1 - masks.masks[name].float().mean().item())
    # the JSON report carries the result's own figures and words, as report.txt does
    assert report["sparsity"] == masks.sparsity and report["counted"] == masks.coverage()
    assert {g: v["sparsity"] for g, v in report["groups"].items()} == masks.group_sparsity()
    assert sum(v["layers"] for v in report["groups"].values()) == masks.num_layers
    assert sum(v["weights"] for v in report["groups"].values()) == masks.num_weights
    assert report["summary"] == masks.summary() and masks.summary() in (out / "report.txt").read_text()
    assert "total" in (out / "report.txt").read_text()
    assert yaml.safe_load((out / "config.yaml").read_text())["pruning"]["sparsity"] == 0.75


def test_fit_applies_the_scores_file_rethresholded_by_a_sparsity_override(tiny, pruned):
    out, _ = pruned
    cli = cli_main(retrieval_args(tiny, out / "scores.safetensors", "--pruning.sparsity", "0.5"))
    callback = cli.pruning_callback
    assert callback is not None and callback in cli.trainer.callbacks
    assert cli.trainer.global_step == 2  # training did run
    assert callback.result.target_sparsity == 0.5
    assert callback.measured_sparsity(cli.model)["total"] == pytest.approx(0.5, abs=0.01)
    params = dict(cli.model.named_parameters())
    # the untied decoder's cross-attention/FFN inherited the encoder's masks and are sparse too
    assert any(name.startswith("backbone.text_decoder.") for name in callback.kept_masks)
    for name, kept in callback.kept_masks.items():
        assert (params[name].detach()[~kept] == 0).all(), name


def test_fit_with_a_mask_only_file_refuses_another_sparsity(tiny, pruned):
    out, _ = pruned
    with pytest.raises(RecipeError, match="holds no scores"):
        cli_main(retrieval_args(tiny, out / "masks.safetensors", "--pruning.sparsity", "0.9"))


def test_missing_paths_are_named_by_config_key_before_anything_is_built(tiny, tmp_path, capsys):
    args = retrieval_args(tiny, tmp_path / "nope.safetensors", "--data.init_args.test_json", str(tmp_path / "gone.json"),
                          "--model.init_args.backbone", str(tmp_path / "no_model"))
    with pytest.raises(ConfigPathError) as err:
        cli_main(args)
    message = str(err.value)
    assert "pruning.masks" in message and "nope.safetensors" in message
    assert "data.test_json" in message and "gone.json" in message
    assert "model.backbone" in message and "no_model" in message
    with pytest.raises(SystemExit) as exit_info:  # the console entry point: one clear line, status 2
        main(args)
    assert exit_info.value.code == 2
    assert "data.test_json" in capsys.readouterr().err


def test_a_missing_calibration_file_is_named_by_its_nested_key(tmp_path):
    recipe = RECIPES / "synthetic" / "vqa.yaml"
    report = check_recipe(recipe, ["--data.init_args.calibration.json", str(tmp_path / "calib.json")])
    assert [entry.key for entry in report.missing if entry.path.endswith("calib.json")] == ["data.calibration.json"]


def test_python_dash_m_runs_the_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mflightning.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "mflightning {prune,check,export,fit" in done.stdout


def test_prune_rejects_bad_settings_before_loading(tiny, tmp_path):
    with pytest.raises(RecipeError, match="sparsity"):
        cli_main(prune_args(tiny, tmp_path / "o", "--pruning.sparsity", "1.5"))
    with pytest.raises(RecipeError, match="unknown pruning method"):
        cli_main(prune_args(tiny, tmp_path / "o", "--pruning.method", "magnitude"))


def test_print_config_shows_dotted_overrides(capsys):
    recipe = RECIPES / "blip" / "retrieval_coco.yaml"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(recipe), "--pruning.sparsity", "0.9", "--data.batch_size", "8", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["pruning"]["sparsity"] == 0.9
    assert printed["data"]["init_args"]["batch_size"] == 8
    assert printed["trainer"]["strategy"] == "ddp"


def test_prune_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["prune", "--config", str(RECIPES / "blip" / "prune" / "wanda.yaml"), "--pruning.sparsity", "0.63",
                  "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["pruning"] == {**printed["pruning"], "method": "wanda", "sparsity": 0.63}


def test_check_lists_paths_and_strict_requires_them(tmp_path):
    recipe = RECIPES / "blip" / "vqa_vqav2.yaml"
    report = check_recipe(recipe)
    assert report.kind == "lightning"
    keys = {entry.key for entry in report.missing}
    assert {"data.train_json", "data.test_json", "data.answer_list_json", "model.answer_list", "pruning.masks"} <= keys
    # the pretrained file a backbone spec names is an input path, checked like the others
    assert "model.backbone.checkpoint" in keys
    with pytest.raises(ConfigPathError, match="data.image_root"):
        check_recipe(recipe, strict=True)


def test_check_rejects_a_broken_recipe(tmp_path):
    broken = yaml.safe_load((RECIPES / "blip" / "captioning_coco.yaml").read_text())
    broken["model"]["init_args"]["num_beam"] = 3  # misspelt argument
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(SystemExit):
        check_recipe(path)
    bad_sparsity = yaml.safe_load((RECIPES / "blip" / "captioning_coco.yaml").read_text())
    bad_sparsity["pruning"]["sparsity"] = 1.0
    path.write_text(yaml.safe_dump(bad_sparsity))
    with pytest.raises(RecipeError, match="sparsity"):
        check_recipe(path)


def test_fit_calibrates_in_on_fit_start_when_no_mask_file_is_given(tiny, tmp_path):
    w = tiny["world"]
    saved = tmp_path / "vqa_masks.safetensors"
    cli = cli_main([
        "fit", "--config", str(RECIPES / "synthetic" / "vqa.yaml"),
        "--model.init_args.backbone", tiny["model"], "--model.init_args.tokenizer", tiny["vocab"],
        "--data.init_args.train_json", f"[{w.vqa_train}, {w.vg_train}]", "--data.init_args.val_json", w.vqa_test,
        "--data.init_args.test_json", w.vqa_test, "--data.init_args.answer_list_json", w.answer_list,
        "--data.init_args.image_root", w.image_root, "--data.init_args.tokenizer", tiny["vocab"],
        "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4",
        "--data.init_args.calibration.json", w.calibration, "--data.init_args.calibration.image_size", "32",
        "--data.init_args.calibration.batch_size", "4",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false", "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--pruning.masks", "null", "--pruning.sparsity", "0.5", "--pruning.method", "wanda",
        "--pruning.num_batches", "2", "--pruning.save_masks", str(saved),
    ])
    callback = cli.pruning_callback
    assert callback.result.method == "wanda" and callback.result.calibration["num_batches"] == 2
    assert PruningResult.load(saved).sparsity == pytest.approx(0.5, abs=0.01)
    assert callback.measured_sparsity(cli.model)["total"] == pytest.approx(0.5, abs=0.01)


def task_data_args(world, task):
    """Overrides pointing a synthetic recipe's data section at `world`."""
    if task == "vqa":
        paths = [("train_json", f"[{world.vqa_train}, {world.vg_train}]"), ("val_json", world.vqa_test),
                 ("test_json", world.vqa_test), ("answer_list_json", world.answer_list)]
    else:
        paths = [(f"{split}_json", getattr(world, f"retrieval_{split}")) for split in ("train", "val", "test")]
    return [arg for key, value in paths + [("image_root", world.image_root)]
            for arg in (f"--data.init_args.{key}", value)]


@pytest.mark.parametrize("task", ["retrieval", "captioning", "vqa"])
def test_synthetic_recipes_fit_with_the_logger_they_configure(tiny, pruned, tmp_path, task):
    """The recipes as written, logger included. With a logger, Lightning merges the module's and the
    datamodule's hyperparameters and refuses a name they share with different values: captioning's
    generation length, once `max_length` like the datamodule's text length, stopped every captioning fit."""
    out, _ = pruned
    cli = cli_main([
        "fit", "--config", str(RECIPES / "synthetic" / f"{task}.yaml"),
        "--model.init_args.backbone", tiny["model"], "--model.init_args.tokenizer", tiny["vocab"],
        *task_data_args(tiny["world"], task), "--data.init_args.tokenizer", tiny["vocab"],
        "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.default_root_dir", str(tmp_path), "--pruning.masks", str(out / "masks.safetensors"),
    ])
    assert cli.trainer.global_step == 1 and cli.trainer.logger is not None
    logged = yaml.safe_load((Path(cli.trainer.logger.log_dir) / "hparams.yaml").read_text())
    assert logged["max_length"] == cli.datamodule.max_length  # the datamodule's, next to the module's own
    assert logged["lr"] == cli.model.hparams.lr
    if task == "captioning":
        assert logged["max_generated_length"] == 24 != logged["max_length"]


def test_pruning_settings_are_a_pruning_config_checked_when_built():
    from mflightning.cli import PruningSettings, RecipeError
    from mflightning.pruning import PruningConfig

    settings = PruningSettings(pattern="2:4", masks=None, save_scores=True)
    assert isinstance(settings, PruningConfig) and settings.sparsity == 0.5
    assert settings.config == PruningConfig(pattern="2:4")
    with pytest.raises(RecipeError, match="pruning section: unknown pruning method 'nope'"):
        PruningSettings(method="nope")
    # random needs only its seed, not calibration data (it is not data-driven)
    assert not PruningSettings(sparsity=0.5, method="random").config.spec.data_driven


def test_check_fails_a_recipe_that_calibrates_without_calibration_data(tmp_path):
    recipe = RECIPES / "synthetic" / "retrieval.yaml"
    with pytest.raises(RecipeError, match=r"pruning\.masks is null.*data\.calibration\.json is not set"):
        check_recipe(recipe, ["--pruning.masks", "null"])
    given = check_recipe(recipe, ["--pruning.masks", "null", "--data.init_args.calibration.json", str(tmp_path / "c.json")])
    assert "data.calibration.json" in {entry.key for entry in given.missing}  # valid; the file is listed as missing
    check_recipe(recipe, ["--pruning.masks", "null", "--pruning.sparsity", "null"])  # dense: nothing to calibrate
