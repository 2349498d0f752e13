"""Two-process CPU DDP evaluation gives the same metrics and results files as one process, on both backbones."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_eval_script.py")


def run(devices: int, workdir: Path, family: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for attempt in range(2):
        proc = subprocess.run([sys.executable, str(SCRIPT), str(devices), str(workdir), family], capture_output=True,
                              text=True, timeout=240, env=env, cwd=str(workdir.parent))
        # Seen once in ~6 runs on a 2-core box: both gloo ranks aborted in C++ ("terminate called without
        # an active exception", SIGABRT) mid-run. Only a death by signal is retried, and only once; a
        # Python error or a wrong result still fails the test.
        if proc.returncode >= 0:
            break
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT:")]
    assert proc.returncode == 0 and len(lines) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[0][len("RESULT:"):])


@pytest.mark.parametrize("family", ["blip", "xvlm"])
def test_two_process_evaluation_equals_one_process(tmp_path, family):
    """Each process re-ranks the images it owns, captions and answers its share; gathered, they give
    the one-process metrics."""
    one = run(1, tmp_path / "one", family)
    two = run(2, tmp_path / "two", family)
    assert one == two
    # 5 images on 2 processes: the sampler padded with a repeated image, counted once.
    assert [r["image_id"] for r in two["captioning_file"]] == [100, 101, 102, 103, 104]
    assert [r["question_id"] for r in two["vqa_file"]] == list(range(10))
    assert set(two["retrieval"]) >= {"txt_r1", "img_r1", "r_mean"}
