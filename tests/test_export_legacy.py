"""Exported files checked against compressed-tensors 0.14's own sparse compressors.

Later releases dropped the compressors (only the config classes remain), so `make install` puts
0.14.0.1 in `.venv/ct014`, outside the environment (it pins transformers<5); the cross-check tests
of test_export.py run in a subprocess with it first on the path.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / ".venv" / "ct014"


@pytest.mark.skipif(not (LEGACY / "compressed_tensors").is_dir(),
                    reason="compressed-tensors 0.14 not installed in .venv/ct014 (make install puts it there)")
def test_exports_match_compressed_tensors_0_14_compressors_and_decompression():
    env = {**os.environ, "PYTHONPATH": str(LEGACY) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_export.py"),
         "-k", "files_match_compressed_tensors"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]
