"""`bench speed` needs a CUDA GPU; here it says so and writes a report marked skipped."""
import json

import pytest
import torch

from mflightning.bench.__main__ import main
from mflightning.bench.speed import two_four


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path; on a GPU the benchmark really runs")
def test_speed_on_cpu_says_it_needs_a_gpu_and_writes_a_skipped_report(tmp_path, capsys):
    main(["speed", "--output", str(tmp_path / "speed.json")])
    report = json.loads((tmp_path / "speed.json").read_text())
    assert "no CUDA GPU" in report["skipped"]
    assert "skipped" in capsys.readouterr().out


def test_two_four_zeroes_the_two_smallest_of_every_four():
    weight = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.5, -0.2, 0.3]])
    assert two_four(weight).tolist() == [[0.0, -3.0, 2.0, 0.0, 1.0, 1.5, 0.0, 0.0]]
