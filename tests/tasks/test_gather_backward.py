"""XVLM retrieval as the authors train it on several GPUs, checked on 2 CPU processes (a script:
gather_backward_script.py): their all-gather's backward returns only the local slice, so the encoders
get 1/world of the exact ITC gradient; ITM negatives come from each process's own batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("gather_backward_script.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("gather_backward")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=str(root))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(root / f"rank{r}.pt") for r in (0, 1)]


def test_local_backward_gives_the_authors_gradients_and_sum_the_exact_ones(ranks):
    """The authors' (global loss on every rank, local-slice backward) gradients equal gather_backward='local';
    the encoders' are half of 'sum' on 2 processes, while the temperature (read outside the gather) gets
    the full gradient in both."""
    out = ranks[0]
    assert out["authors"].keys() == out["ours_local"].keys() and len(out["authors"]) > 20
    encoder = [n for n in out["authors"] if n != "backbone.temp"]
    for name, grad in out["authors"].items():
        torch.testing.assert_close(out["ours_local"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for name in encoder:
        torch.testing.assert_close(out["ours_sum"][name], 2 * out["ours_local"][name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(out["ours_local"][n].abs().max() > 1e-4 for n in encoder)
    torch.testing.assert_close(out["ours_sum"]["backbone.temp"], out["ours_local"]["backbone.temp"])
    for name, grad in out["authors"].items():  # DDP-averaged: the same on both ranks
        torch.testing.assert_close(ranks[1]["authors"][name], grad)


def test_local_itm_negatives_are_each_process_alone(ranks):
    """With itm_negatives='local' each rank draws its negatives among its own 4 rows (both directions) and its
    ITM is one process's on those rows alone; 'global' draws among the 8 rows of both ranks."""
    for out in ranks:
        assert out["candidates_local"] == [4, 4] and out["candidates_global"] == [8, 8]
        assert out["itm_local"] == pytest.approx(out["itm_alone"], rel=1e-6)
    assert ranks[0]["itm_global"] != ranks[0]["itm_local"]  # rank 0's last candidates are rank 1's rows
