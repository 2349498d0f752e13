"""Retrieval training on two CPU processes (DDP, gloo) equals one process on the concatenated batch: ITC
and ITM hard negatives over the global batch, gradients flowing back to each process's own rows; the
queue holds the global batch in rank order on every process. (A script: DDP re-executes its command.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_retrieval_script.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_retrieval")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for devices in (1, 2):
        for attempt in range(2):  # a gloo rank may die by signal at exit on a busy 2-core box: retried once
            proc = subprocess.run([sys.executable, str(SCRIPT), str(devices), str(root / str(devices))],
                                  capture_output=True, text=True, timeout=300, env=env, cwd=str(root))
            if proc.returncode >= 0:
                break
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return lambda name, devices, rank=0: torch.load(root / str(devices) / f"{name}-{devices}-rank{rank}.pt")


def test_two_processes_train_like_one_process_on_the_concatenated_batch(runs):
    one, rank0, rank1 = runs("equal", 1), runs("equal", 2, 0), runs("equal", 2, 1)
    # each process's loss is the mean over its rows; DDP averages: their mean is the one-process loss
    assert (rank0["loss"][0] + rank1["loss"][0]) / 2 == pytest.approx(one["loss"][0], rel=1e-5)
    assert rank0["loss"][0] != pytest.approx(rank1["loss"][0], rel=1e-6)  # each process has its own share
    assert one["grads"].keys() == rank0["grads"].keys() and len(one["grads"]) > 40
    for name, grad in one["grads"].items():
        torch.testing.assert_close(rank0["grads"][name], grad, rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(rank0["grads"][name], rank1["grads"][name]), name


def test_without_gathering_each_process_sees_only_its_own_batch(runs):
    """The check above can fail: with gather=False the positives on the other process are missed."""
    one, rank0, rank1 = runs("equal", 1), runs("local", 2, 0), runs("local", 2, 1)
    assert (rank0["loss"][0] + rank1["loss"][0]) / 2 != pytest.approx(one["loss"][0], rel=1e-3)
    assert any(not torch.allclose(rank0["grads"][n], g, rtol=1e-3, atol=1e-4) for n, g in one["grads"].items())


def test_the_queue_holds_the_global_batch_in_rank_order_on_every_process(runs):
    rank0, rank1 = runs("queue", 2, 0), runs("queue", 2, 1)
    for key, value in rank0["queue"].items():
        assert torch.equal(value, rank1["queue"][key]), key
    queue = rank0["queue"]
    # two steps of 2 x 4 rows fill the 16 slots: step 1 rank 0, step 1 rank 1, step 2 rank 0, step 2 rank 1
    assert int(queue["filled"]) == 16 and int(queue["ptr"]) == 0
    assert queue["idx_queue"].tolist() == [0, 1, 2, 3] * 4
    for key, features in (("image_queue", "momentum_image_feat"), ("text_queue", "momentum_text_feat")):
        expected = torch.cat([rank0[features][0], rank1[features][0], rank0[features][1], rank1[features][1]])
        assert torch.equal(queue[key], expected), key
    assert not torch.equal(rank0[features][0], rank1[features][0])


def test_without_gather_the_queue_still_holds_the_global_batch_on_every_process(runs):
    """gather=False keeps ITC/ITM per process, but the queue must not drift apart between ranks."""
    rank0, rank1 = runs("queue-local", 2, 0), runs("queue-local", 2, 1)
    for key, value in rank0["queue"].items():
        assert torch.equal(value, rank1["queue"][key]), key
    assert rank0["queue"]["idx_queue"].tolist() == [0, 1, 2, 3] * 4


def test_ranks_padded_to_different_lengths_still_train_like_one_process(runs):
    """Each rank pads to its own longest caption: the gathered ITM candidates are padded to the global
    longest (masked), so nothing hangs and the loss and gradients are the one-process ones."""
    one, rank0, rank1 = runs("equal", 1), runs("equal-longest", 2, 0), runs("equal-longest", 2, 1)
    assert (rank0["loss"][0] + rank1["loss"][0]) / 2 == pytest.approx(one["loss"][0], rel=1e-5)
    for name, grad in one["grads"].items():
        torch.testing.assert_close(rank0["grads"][name], grad, rtol=1e-4, atol=1e-5, msg=name)
