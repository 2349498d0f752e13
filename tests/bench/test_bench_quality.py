"""The quality benchmark runs end to end in tiny mode, writes well-formed output and resumes (no timing asserted)."""
import json

import pytest

from mflightning.bench.__main__ import main
from mflightning.bench.quality import METRICS, QualitySettings, markdown_tables, summarise


def test_quality_benchmark_tiny_writes_runs_tables_and_plots(tmp_path, capsys):
    out, cache = tmp_path / "quality", tmp_path / "cache"
    # one process, whatever the load (--jobs defaults to the free cores): the log order below is the grid's
    main(["quality", "--tiny", "--out", str(out), "--cache-dir", str(cache), "--threads", "1", "--jobs", "1"])
    report = json.loads((out / "quality.json").read_text())
    assert set(report) >= {"settings", "runs", "summary", "wall_seconds"}
    runs = report["runs"]
    # tiny grid: blip x (dense + multiflow@75%) x 3 tasks x 1 seed
    assert sorted((r["task"], r["method"], r["sparsity"]) for r in runs) == sorted(
        (t, m, s) for t in ("retrieval", "captioning", "vqa") for m, s in (("dense", None), ("multiflow", 0.75)))
    for r in runs:
        assert set(r["metrics"]) >= {key for key, _ in METRICS[r["task"]]}, r
        if r["method"] == "multiflow":
            assert abs(r["realised_sparsity"]["total"] - 0.75) < 0.01  # kept sparse through fine-tuning
        else:
            assert r["realised_sparsity"] == {}
    assert (out / "masks" / "blip" / "multiflow@0.75.safetensors").is_file()
    table = (out / "quality.md").read_text()
    for heading in ("Image-text retrieval: BLIP", "Image captioning: BLIP", "VQA: BLIP"):
        assert f"### {heading}" in table
    assert "| Method | TR@1 75% | TR@5 75% | IR@1 75% | IR@5 75% |" in table
    assert "| Method | BLEU@4 75% | CIDEr 75% |" in table
    # one row per task table, plus MultiFlow's row in the cross-task summary (dense is its reference)
    assert table.count("| Dense |") == 3 and table.count("| MultiFlow |") == 4
    assert table.startswith("## Across tasks") and "### Across tasks: BLIP" in table
    assert "## Dense against the image-blind level" in table and "| BLIP | vqa | VQA acc |" in table
    assert set(report["reference"]["image_blind"]) == {"retrieval", "captioning", "vqa"}
    assert "| Method | score 75% | rank 75% |" in table
    assert report["cross_task"] == [] or {e["method"] for e in report["cross_task"]} == {"multiflow"}
    for task in ("retrieval", "captioning", "vqa", "cross_task"):
        png = out / f"quality_{task}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2/2 blip vqa multiflow@0.75-s0" in capsys.readouterr().out

    # Resume: every run is read back, nothing is fine-tuned again.
    main(["quality", "--tiny", "--out", str(out), "--cache-dir", str(cache), "--threads", "1"])
    assert "2 of 2 backbones cached; 0 to run" in capsys.readouterr().out
    assert json.loads((out / "quality.json").read_text())["runs"] == runs

    # Two worker processes (one thread each, with a DataLoader process each) give the same runs as one
    # process with one thread; a missing run is redone, the others are read back.
    parallel = tmp_path / "parallel"
    main(["quality", "--tiny", "--out", str(parallel), "--cache-dir", str(cache), "--jobs", "2", "--loader-workers", "1"])
    assert "in 2 processes" in capsys.readouterr().out
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "mask_seconds")} for r in rows]
    assert strip(json.loads((parallel / "quality.json").read_text())["runs"]) == strip(runs)
    (parallel / "runs" / "blip" / "vqa" / "dense@0-s0.json").unlink()
    main(["quality", "--tiny", "--out", str(parallel), "--cache-dir", str(cache), "--jobs", "2"])
    shown = capsys.readouterr().out
    assert "1 of 2 backbones cached; 1 to run" in shown and "blip vqa dense@0-s0" in shown
    assert "blip retrieval dense@0-s0" not in shown
    assert strip(json.loads((parallel / "quality.json").read_text())["runs"]) == strip(runs)


def test_tables_show_mean_std_and_mark_best_pruned():
    settings = QualitySettings(models=("xvlm",), methods=("dense", "omp", "multiflow"), sparsities=(0.5,),
                               seeds=(0, 1), tasks=("vqa",))
    runs = [{"model": "xvlm", "task": "vqa", "method": m, "sparsity": sp, "seed": seed,
             "metrics": {"vqa_acc": value}, "realised_sparsity": {}}
            for m, sp, values in (("dense", None, (80.0, 82.0)), ("omp", 0.5, (50.0, 52.0)),
                                  ("multiflow", 0.5, (60.0, 64.0)))
            for seed, value in zip((0, 1), values)]
    table = markdown_tables(summarise(runs), settings)
    assert "| Dense | 81.00±1.41 |" in table  # dense is not ranked among pruned methods
    assert "| MultiFlow | **62.00±2.83** |" in table
    assert "| OMP | <u>51.00±1.41</u> |" in table


def test_tied_methods_share_the_mark():
    settings = QualitySettings(models=("blip",), methods=("random", "omp", "lamp"), sparsities=(0.9,), seeds=(0,),
                               tasks=("vqa",))
    runs = [{"model": "blip", "task": "vqa", "method": m, "sparsity": 0.9, "seed": 0, "metrics": {"vqa_acc": v},
             "realised_sparsity": {}} for m, v in (("random", 10.0), ("omp", 30.0), ("lamp", 30.0))]
    table = markdown_tables(summarise(runs), settings)
    assert "| OMP | **30.00** |" in table and "| LAMP | **30.00** |" in table
    assert "| Random | <u>10.00</u> |" in table


def test_bad_grid_values_are_named():
    with pytest.raises(ValueError, match="methods"):
        QualitySettings(methods=("multiflow", "obs"))
    with pytest.raises(ValueError, match="sparsities"):
        QualitySettings(sparsities=(0.75, 1.0))


def test_a_pattern_sets_the_sparsity_and_joins_the_fingerprint_only_when_given():
    from mflightning.bench.quality_settings import QualitySettings, settings_fingerprint

    patterned = QualitySettings(methods=("dense", "omp", "wanda", "multiflow"), pattern="2:4")
    assert patterned.sparsities == (0.5,) and settings_fingerprint(patterned)["pattern"] == "2:4"
    assert "pattern" not in settings_fingerprint(QualitySettings())  # older unstructured runs still resume
    with pytest.raises(ValueError, match="pattern"):
        QualitySettings(pattern="4:4")


def _runs(model, table):
    """Run records from {(task, method, sparsity): [value per seed]} (every metric of the task set to it)."""
    return [{"model": model, "task": task, "method": method, "sparsity": sp, "seed": seed,
             "metrics": {key: v for key, _ in METRICS[task]}, "realised_sparsity": {}}
            for (task, method, sp), values in table.items() for seed, v in enumerate(values)]


def test_cross_task_score_normalises_by_dense_per_seed_and_ranks_per_task():
    from mflightning.bench.quality_report import cross_task, cross_task_table

    s = QualitySettings(models=("blip",), methods=("dense", "omp", "multiflow"), sparsities=(0.75,), seeds=(0, 1),
                        tasks=("retrieval", "vqa"))
    runs = _runs("blip", {("retrieval", "dense", None): [20.0, 40.0], ("vqa", "dense", None): [50.0, 50.0],
                          ("retrieval", "omp", 0.75): [10.0, 30.0], ("vqa", "omp", 0.75): [40.0, 40.0],
                          ("retrieval", "multiflow", 0.75): [15.0, 20.0], ("vqa", "multiflow", 0.75): [45.0, 45.0]})
    entries = {e["method"]: e for e in cross_task(runs, s)}
    # seed 0: omp (10/20 + 40/50)/2 = 0.65, seed 1: (30/40 + 40/50)/2 = 0.775
    assert entries["omp"]["score"]["mean"] == pytest.approx((0.65 + 0.775) / 2)
    assert entries["omp"]["score"]["std"] == pytest.approx(abs(0.65 - 0.775) / 2 ** 0.5)
    # multiflow: seed 0 (0.75 + 0.9)/2 = 0.825, seed 1 (0.5 + 0.9)/2 = 0.7
    assert entries["multiflow"]["score"]["mean"] == pytest.approx(0.7625)
    # ranks: retrieval omp 20 > multiflow 17.5; vqa multiflow 45 > omp 40
    assert entries["omp"]["mean_rank"] == entries["multiflow"]["mean_rank"] == 1.5
    table = cross_task_table(list(entries.values()), s)
    assert "| Method | score 75% | rank 75% |" in table
    assert "no method is ahead" in table  # 0.7625 vs 0.7125 is within the seed spread: no mark
    assert "**" not in table


def test_marks_need_a_gap_larger_than_the_seed_spread():
    from mflightning.bench.quality_report import separated_marks

    assert separated_marks({"a": (10.0, 0.5), "b": (8.0, 0.5), "c": (5.0, 0.1)}) == {"a": "best", "b": "second"}
    assert separated_marks({"a": (10.0, 3.0), "b": (8.0, 0.5), "c": (5.0, 0.1)}) == {"a": "best", "b": "best",
                                                                                      "c": "second"}
    assert separated_marks({"a": (10.0, 3.0), "b": (8.0, 3.0)}) == {}  # within the spread: no mark at all
    assert separated_marks({"a": (10.0, 0.0), "b": (10.0, 0.0), "c": (1.0, 0.0)}) == {"a": "best", "b": "best",
                                                                                       "c": "second"}


def test_budgets_are_per_model_and_task_and_join_the_fingerprint():
    from mflightning.bench.quality_settings import default_budgets, settings_fingerprint
    from mflightning.families import TaskSettings

    s = QualitySettings(budgets={"blip": {"vqa": TaskSettings(epochs=24, lr=1e-3, batch_size=8)}})
    assert s.budget("blip", "vqa") == TaskSettings(epochs=24, lr=1e-3, batch_size=8)
    # the other (model, task) budgets keep their defaults
    for model, task in (("blip", "retrieval"), ("blip", "captioning"), ("xvlm", "vqa")):
        assert s.budget(model, task) == default_budgets()[model][task]
    assert settings_fingerprint(s)["budgets"]["blip"]["vqa"] == {"epochs": 24, "lr": 1e-3, "batch_size": 8}
    assert settings_fingerprint(s) != settings_fingerprint(QualitySettings())
    with pytest.raises(ValueError, match="unknown task 'segmentation'"):
        QualitySettings(budgets={"blip": {"segmentation": TaskSettings(epochs=1, lr=1e-3)}})
    with pytest.raises(ValueError, match="unknown model 'clip'"):
        QualitySettings(budgets={"clip": {}})
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        TaskSettings(epochs=0, lr=1e-3)


def _parse(*argv):
    import argparse

    from mflightning.bench.quality import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(list(argv)))


def test_budget_flags_set_one_model_and_task_and_the_shorthands_all():
    from mflightning.bench.quality_settings import default_budgets

    defaults = default_budgets()
    s = _parse("--budget", "blip.vqa.epochs=24", "--budget", "blip.vqa.batch_size=8", "--budget", "xvlm.*.lr=1e-3")
    assert (s.budget("blip", "vqa").epochs, s.budget("blip", "vqa").batch_size) == (24, 8)
    assert s.budget("blip", "retrieval") == defaults["blip"]["retrieval"]  # a VQA budget leaves the others alone
    assert s.budget("blip", "captioning") == defaults["blip"]["captioning"]
    assert s.budget("xvlm", "vqa").epochs == defaults["xvlm"]["vqa"].epochs
    assert {s.budget("xvlm", t).lr for t in ("retrieval", "captioning", "vqa")} == {1e-3}
    # shorthands: every model; --budget is applied after them
    s = _parse("--epochs", "2", "--vqa-epochs", "5", "--batch-size", "16", "--lr", "3e-4", "--budget", "blip.vqa.epochs=7")
    for model in ("blip", "xvlm"):
        assert [s.budget(model, t).epochs for t in ("retrieval", "captioning")] == [2, 2]
        assert {s.budget(model, t).batch_size for t in ("retrieval", "captioning", "vqa")} == {16}
        assert {s.budget(model, t).lr for t in ("retrieval", "captioning", "vqa")} == {3e-4}
    assert (s.budget("blip", "vqa").epochs, s.budget("xvlm", "vqa").epochs) == (7, 5)


@pytest.mark.parametrize("flag, message", [
    ("blip.vqa", "use MODEL.TASK.FIELD=VALUE"),
    ("clip.vqa.epochs=2", "unknown model 'clip'"),
    ("blip.segmentation.epochs=2", "unknown task 'segmentation'"),
    ("blip.vqa.warmup=2", "unknown field 'warmup'"),
    ("blip.vqa.epochs=many", "epochs needs an integer"),
    ("blip.vqa.epochs=0", "epochs must be an integer >= 1"),
    ("blip.vqa.lr=0", "lr must be > 0"),
])
def test_bad_budget_flags_are_named(flag, message, capsys):
    with pytest.raises(SystemExit):
        _parse("--budget", flag)
    err = capsys.readouterr().err
    assert "--budget" in err and message in err, err


def test_a_resumed_run_with_other_budgets_is_refused(tmp_path):
    import json as _json

    from mflightning.bench.quality import run_benchmark
    from mflightning.bench.quality_settings import settings_fingerprint

    s = QualitySettings.tiny()
    (tmp_path / "settings.json").write_text(_json.dumps(settings_fingerprint(s)))
    other = _parse("--tiny")  # the same settings: accepted up to the world (not generated here)
    assert settings_fingerprint(other) == settings_fingerprint(s)
    changed = QualitySettings.tiny()
    changed.budgets["blip"]["vqa"].epochs = 2
    with pytest.raises(ValueError, match=r"other settings \(differ: \['budgets'\]\)"):
        run_benchmark(tmp_path, tmp_path / "cache", changed, log=lambda _m: None)


def test_pretraining_lr_is_per_model_and_the_flag_sets_every_one():
    import argparse

    from mflightning.bench.quality import add_arguments, settings_from_args
    from mflightning.families import get_family

    s = QualitySettings()
    assert s.pretrain_config(get_family("blip")).lr == 1e-3 and s.pretrain_config(get_family("xvlm")).lr == 2e-3
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flagged = settings_from_args(parser.parse_args(["--pretrain-lr", "5e-4"]))
    assert flagged.pretrain_lrs == {"blip": 5e-4, "xvlm": 5e-4}
    with pytest.raises(ValueError, match="pretrain_lrs: 'clip'"):
        QualitySettings(pretrain_lrs={"clip": 1e-3})


def test_the_gpu_scale_is_a_valid_larger_setting_and_keeps_grid_and_budget_flags():
    import argparse

    from mflightning.bench.quality import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    s = settings_from_args(parser.parse_args(["--scale", "gpu", "--models", "blip", "--sparsities", "0.9",
                                              "--budget", "blip.vqa.epochs=20", "--hidden-size", "8"]))
    assert (s.image_size, s.patch_size, s.hidden_size, s.layers) == (224, 16, 256, 4)  # size flags ignored
    assert s.models == ("blip",) and s.sparsities == (0.9,) and s.seeds == (0, 1, 2)
    assert s.budget("blip", "vqa").epochs == 20 and s.budget("blip", "retrieval").epochs == 6
    assert s.sizes.train > 10 * QualitySettings().sizes.train // 2


def test_dense_check_applies_the_retrieval_factor_and_the_blind_margin():
    from mflightning.bench.quality_report import dense_check

    s = QualitySettings(models=("blip",), methods=("dense",), sparsities=(0.75,), seeds=(0, 1))
    runs = _runs("blip", {("retrieval", "dense", None): [10.0, 10.0], ("captioning", "dense", None): [60.0, 60.0],
                          ("vqa", "dense", None): [50.0, 52.0]})
    blind = {"retrieval": {"txt_r1": 1.67, "img_r1": 2.5}, "captioning": {"cider": 55.0}, "vqa": {"vqa_acc": 46.0}}
    table = dense_check(summarise(runs), blind, s)
    assert "| BLIP | retrieval | TR@1 | 10.00±0.00 | 1.67 | yes (>= 5x: 6.0x) |" in table
    assert "| BLIP | retrieval | IR@1 | 10.00±0.00 | 2.50 | **no** (>= 5x: 4.0x) |" in table
    assert "| BLIP | captioning | CIDEr | 60.00±0.00 | 55.00 | yes (>= +5: +5.0) |" in table
    assert "| BLIP | vqa | VQA acc | 51.00±1.41 | 46.00 | yes (>= +5: +5.0) |" in table


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_busy_worker_dies_with_the_benchmark_process(tmp_path):
    """A killed benchmark leaves no worker fine-tuning on into its output folder."""
    import os
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from mflightning.bench.quality import _init_worker\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'), initializer=_init_worker)\n"
        "    open(sys.argv[1], 'w').write(str(pool.submit(os.getpid).result()))\n"
        "    pool.submit(time.sleep, 60)\n"
        "    time.sleep(1)\n"
        "    os._exit(0)  # dies without shutting the pool down, as when killed\n")
    pid_file = tmp_path / "worker.pid"  # not a pipe: an orphan holding it open would block the wait
    subprocess.run([sys.executable, str(script), str(pid_file)], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=120, check=True)
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(worker, 9)
    pytest.fail(f"worker {worker} outlived its parent by 20 s")


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from mflightning.data.synthetic import WorldSizes, generate_world

    sizes = WorldSizes(calibration=8, train=40, val=1, test=2, vqa_train=20, vg=6, vqa_test=2, questions_per_image=2)
    return generate_world(tmp_path_factory.mktemp("world"), seed=0, sizes=sizes, image_size=32), sizes


def test_the_plan_counts_the_optimizer_steps_the_loaders_take(small_world):
    from mflightning.bench.quality import optimizer_steps
    from mflightning.families import TaskSettings, task_datamodule

    world, sizes = small_world
    budgets = {m: {"retrieval": TaskSettings(epochs=3, lr=1e-3, batch_size=8),
                   "captioning": TaskSettings(epochs=2, lr=1e-3, batch_size=4),
                   "vqa": TaskSettings(epochs=5, lr=1e-3, batch_size=4)} for m in ("blip", "xvlm")}
    s = QualitySettings(sizes=sizes, budgets=budgets, methods=("dense", "omp", "multiflow"), seeds=(0, 1),
                        sparsities=(0.5, 0.9), pretrain_epochs=7, pretrain_batch_size=4)
    plan = optimizer_steps(s)
    assert plan["backbones"] == 2 * (1 + 2 * 2) and plan["fine_tunings"] == 10 * 3 * 2
    assert plan["pretrain_steps"] == {"blip": 7 * 2, "xvlm": 7 * 2}  # 8 captions, batch 4
    for task in ("retrieval", "captioning", "vqa"):
        budget = budgets["blip"][task]
        data = task_datamodule(task, world, image_size=32, batch_size=budget.batch_size, seed=0)
        data.setup("fit")
        taken = budget.epochs * len(data.train_dataloader())
        planned = plan["steps_per_fine_tuning"]["blip"][task]
        if task == "vqa":  # (20 VQA + 6 VG images) x 2 questions, counted exactly
            assert planned == taken == 5 * (52 // 4)
        else:  # 3-5 captions per image, counted at 4: within an epoch's worth of a batch or two
            assert abs(planned - taken) <= 2 * budget.epochs, (task, planned, taken)
    per_backbone = sum(plan["steps_per_fine_tuning"]["blip"].values())
    assert plan["fine_tuning_steps"] == 2 * 5 * 2 * per_backbone  # both models have the same budgets here


def test_loader_workers_change_no_batch_and_no_fingerprint(small_world):
    import argparse

    import torch

    from mflightning.bench.quality import add_arguments, settings_fingerprint, settings_from_args
    from mflightning.families import task_datamodule

    world, _ = small_world
    for task in ("retrieval", "captioning", "vqa"):
        batches = []
        for workers in (0, 2):
            data = task_datamodule(task, world, image_size=32, batch_size=4, seed=3, num_workers=workers)
            data.setup("fit")
            torch.manual_seed(0)  # the shuffle draws from the global RNG, seeded before each fine-tuning
            batches.append(next(iter(data.train_dataloader())))
        serial, parallel = batches
        assert serial.keys() == parallel.keys()
        for key, value in serial.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, parallel[key]), (task, key)
            else:
                assert value == parallel[key], (task, key)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    gpu = settings_from_args(parser.parse_args(["--scale", "gpu"]))
    assert gpu.loader_workers == 8
    assert settings_from_args(parser.parse_args(["--scale", "gpu", "--loader-workers", "2"])).loader_workers == 2
    cpu = settings_from_args(parser.parse_args(["--loader-workers", "3"]))
    assert cpu.loader_workers == 3 and settings_fingerprint(cpu) == settings_fingerprint(QualitySettings())
    with pytest.raises(ValueError, match="--loader-workers must be >= 0, got -1"):
        QualitySettings(loader_workers=-1)


def test_benchmark_workers_fork_their_loader_processes():
    """A spawned worker would spawn its DataLoader processes too, each re-importing torch (~8 s a loader)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from mflightning.bench.quality import _init_worker

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker) as pool:
        assert pool.submit(_start_method).result() == "fork"


def _start_method() -> str:
    """The worker's own start method (`multiprocessing.get_start_method` submitted directly would travel
    bound to a pickled copy of the calling process's context, and answer for it)."""
    import multiprocessing

    return multiprocessing.get_start_method()
