"""`python -m mflightning.bench gpu` on a machine without CUDA: the stop, the plan, and every part's logic
with the device forced to the CPU (tiny shapes; the figures themselves mean nothing here)."""
import json
import subprocess
import sys

import pytest
import torch

from mflightning.bench import gpu
from mflightning.bench.__main__ import main as bench_main


def test_without_cuda_it_stops_at_once_with_a_message_and_the_plan(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        bench_main(["gpu", "--output", str(tmp_path / "gpu.json")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "Traceback" not in err
    for name in gpu.PART_NAMES:  # the dry listing names every part
        assert f"  {name} " in err
    assert not (tmp_path / "gpu.json").exists()


def test_plan_skips_what_the_machine_cannot_run_and_what_passes_the_budget():
    one_gpu = gpu.Settings(device="cuda", processes=1)
    steps = dict((p.name, skip) for p, skip in gpu.plan(None, None, one_gpu))
    assert steps["ddp"] and "2+ GPUs" in steps["ddp"] and "2+ GPUs" in steps["fsdp2"]
    assert all(steps[n] is None for n in ("env", "step", "calibration", "memory", "speed"))
    assert gpu.planned_seconds(gpu.plan(None, None, one_gpu), one_gpu) <= 600  # fits 10 minutes on one GPU
    cpu = gpu.Settings(device="cpu", processes=2)
    steps = dict((p.name, skip) for p, skip in gpu.plan(None, 200, cpu))
    assert "needs CUDA" in steps["speed"]
    assert steps["env"] is None and steps["step"] is None  # 10 + 150 s fit 200 s
    assert "--budget 200" in steps["calibration"] and "40 s left" in steps["calibration"]
    only = [p.name for p, skip in gpu.plan(["memory", "step"], None, cpu)]
    assert only == ["step", "memory"]  # the usual order, whatever order --only gives
    doubled = gpu.Settings(device="cpu", processes=2, time_scale=2.0)
    assert "would take the run past" in dict((p.name, s) for p, s in gpu.plan(None, 200, doubled))["step"]


def test_single_device_parts_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    report = bench_main(["gpu", "--device", "cpu", "--shape", "tiny", "--no-isolate", "--only", "env", "step",
                         "calibration", "memory", "speed", "--steps", "2", "--rounds", "1", "--batch-size", "2",
                         "--calib-batches", "2", "--calib-batch-size", "2", "--image-sizes", "32", "48",
                         "--time-scale", "20", "--output", str(out)])
    saved = json.loads(out.read_text())
    parts = saved["parts"]
    assert {n: p["status"] for n, p in parts.items()} == {
        "env": "ok", "step": "ok", "calibration": "ok", "memory": "ok", "speed": "skipped"}
    assert "needs CUDA" in parts["speed"]["note"]
    step = parts["step"]
    assert step["masks_exact"] and step["pruned_nonzero_after_steps"] == 0
    assert step["prunable_weights"] > 0 and step["rounds"] == 1
    med = step["median_step_s"]
    assert step["hooks_over_dense_step"] == pytest.approx(step["hooks_s_per_step"] / med["dense"])
    assert step["multiflow_over_dense"] == pytest.approx(med["multiflow"] / med["dense"])
    rows = parts["calibration"]["rows"]
    assert [r["image_size"] for r in rows] == [32, 48]
    for r in rows:
        assert r["calibration_pairs_per_s"] == pytest.approx(4 / r["calibration_s"])  # 2 timed batches of 2
        assert r["authors_calibration_estimate_s"] == pytest.approx(192_000 / r["calibration_pairs_per_s"])
    memory = parts["memory"]
    assert memory["measure"].startswith("process peak RSS")
    assert memory["train_step_peak_bytes"]["dense"] > 0 and memory["calibration_peak_bytes"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| mask hooks / dense step |" in table and "192,000 pairs" in table
    assert report["parts"]["step"]["masks_exact"]


def test_a_failing_part_is_reported_and_the_others_still_run(monkeypatch):
    def broken(settings, deadline):
        raise RuntimeError("out of memory in the step part")

    monkeypatch.setitem(gpu.RUNNERS, "step", broken)
    report = gpu.run(gpu.Settings(device="cpu"), ["env", "step"], None)
    assert report["parts"]["env"]["status"] == "ok"
    assert report["parts"]["step"]["status"] == "failed"
    assert "out of memory in the step part" in report["parts"]["step"]["error"]


def test_multi_process_parts_on_cpu_processes(tmp_path):
    """DDP and FSDP2 (per-block + root fully_shard) with two gloo processes against one process."""
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "-m", "mflightning.bench", "gpu", "--device", "cpu", "--shape", "tiny",
                           "--only", "ddp", "fsdp2", "--processes", "2", "--precision", "32-true", "--time-scale", "5",
                           "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    for name in ("ddp", "fsdp2"):
        p = parts[name]
        assert p["status"] == "ok", p
        assert p["masks_identical_across_ranks"] and p["entries_differing_from_one_process"] == 0
        assert p["pruned_zero_after_every_step"]
        assert p["calibration_forwards_per_rank"] == [3, 3]  # 6 batches split over 2 ranks
    assert parts["fsdp2"]["resume_restored_masks"] and parts["fsdp2"]["resume_calibration_forwards"] == 0
    assert parts["fsdp2"]["resume_pruned_zero_after_every_step"]
