"""Two CPU processes (DDP, gloo) end with the same masks as one process calibrating on all batches.

Lightning's DDP launcher re-executes the current command per rank, so the run lives in a script
started as a subprocess rather than inside pytest.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_calibration_script.py")


def run(tmp_path: Path, devices: int, kind: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), str(devices), kind],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("kind", ["loader", "list"])
def test_two_processes_give_identical_masks_equal_to_one_process(tmp_path, kind):
    run(tmp_path, 2, kind)
    run(tmp_path, 1, kind)
    rank0 = torch.load(tmp_path / f"{kind}-2-rank0.pt")
    rank1 = torch.load(tmp_path / f"{kind}-2-rank1.pt")
    single = torch.load(tmp_path / f"{kind}-1-rank0.pt")
    # the 5 calibration batches were split 3 + 2 over the ranks, none calibrated twice
    assert rank0["calibration_calls"] + rank1["calibration_calls"] == single["calibration_calls"] == 5
    assert rank0["masks"].keys() == rank1["masks"].keys() == single["masks"].keys()
    for name in single["masks"]:
        assert torch.equal(rank0["masks"][name], rank1["masks"][name]), name
        assert torch.equal(rank0["masks"][name], single["masks"][name]), name
    assert rank0["zeros"] and rank1["zeros"] and single["zeros"]


def test_a_loader_already_sharded_by_a_distributed_sampler_is_not_sharded_again(tmp_path):
    """Each rank loads its 10 of the 20 samples (3 batches); re-sharding would keep only 1/4 of them."""
    run(tmp_path, 2, "sampler")
    run(tmp_path, 1, "loader")
    rank0 = torch.load(tmp_path / "sampler-2-rank0.pt")
    rank1 = torch.load(tmp_path / "sampler-2-rank1.pt")
    single = torch.load(tmp_path / "loader-1-rank0.pt")
    assert rank0["calibration_calls"] == rank1["calibration_calls"] == 3
    for name in single["masks"]:
        # the same samples in other batches: the statistic is a sum over all tokens, so the same masks
        assert torch.equal(rank0["masks"][name], single["masks"][name]), name
        assert torch.equal(rank1["masks"][name], single["masks"][name]), name


def test_ddp_spawn_hands_the_masks_back_to_the_launching_process(tmp_path):
    """After a ddp_spawn fit the launching process knows the masks and the figures of the weights it got
    back, and a second fit of that module keeps them instead of recalibrating."""
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(SCRIPT.with_name("ddp_spawn_script.py")), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    report = torch.load(tmp_path / "spawn.pt", weights_only=False)
    first, second = report["first"], report["second"]
    assert first["masks"] and first["zeros_where_pruned"] and second["zeros_where_pruned"]
    assert first["figures"]["total"] == pytest.approx(first["weight_zeros"]) == pytest.approx(0.6, abs=0.01)
    assert all(torch.equal(second["masks"][n], m) for n, m in first["masks"].items()), "the second fit recalibrated"
    assert second["figures"]["total"] == pytest.approx(second["weight_zeros"])
