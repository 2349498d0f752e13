"""The core benchmark runs end to end in tiny mode and writes well-formed figures (no timing asserted)."""
import json

from mflightning.bench.__main__ import main


def test_core_benchmark_tiny(tmp_path):
    out = tmp_path / "core.json"
    main(["core", "--shape", "tiny", "--steps", "2", "--warmup", "1", "--repeats", "1", "--rounds", "1",
          "--calib-batches", "2", "--batch-size", "2", "--no-isolate", "--output", str(out)])
    report = json.loads(out.read_text())
    calibration, training = report["calibration"], report["training"]
    assert calibration["prunable_weights"] > 0 and calibration["calibration_over_forward"] > 0
    assert abs(calibration["realised_sparsity"] - 0.75) < 0.01
    for mode in ("dense", "multiflow", "modelpruning"):
        assert training[mode]["median_step_s"] > 0 and training[mode]["steps_timed"] == 2
    # bool masks: exactly one byte per prunable weight; ModelPruning keeps weight_orig + a float mask
    assert training["multiflow"]["extra_bytes_per_prunable_weight"] == 1.0
    assert training["modelpruning"]["extra_bytes_per_prunable_weight"] >= 4.0
    assert 0 < training["multiflow"]["mask_hooks_s_per_step"] < training["multiflow"]["median_step_s"]
    assert "training step / dense step" in out.with_suffix(".md").read_text()


def test_cost_benchmark_puts_two_sizes_side_by_side(tmp_path):
    out = tmp_path / "cost.json"
    main(["cost", "--shapes", "tiny", "tiny", "--steps", "1", "--warmup", "1", "--repeats", "1", "--rounds", "1",
          "--calib-batches", "1", "--batch-size", "2", "--no-isolate", "--output", str(out)])
    report = json.loads(out.read_text())
    assert list(report["shapes"]) == ["tiny"]  # the same size twice is measured once
    table = out.with_suffix(".md").read_text()
    assert "tiny: MultiFlowCallback" in table and "checkpoint size (MB)" in table
