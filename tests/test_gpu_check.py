"""scripts/gpu_check.sh --dry-run: every section of the GPU report runs on the CPU at tiny sizes and gives numbers."""

import os
import re
import subprocess
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_check_dry_run_writes_every_section(tmp_path):
    pytest.importorskip("peft")
    import sys

    done = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "FAILED" not in report and "failed" not in report, report
    sections = re.split(r"^## ", report, flags=re.M)[1:]
    assert len(sections) == 5
    assert "scaled_dot_product" in sections[1]  # the SDPA kernel the profiler saw
    assert re.search(r"\| dmd2 \| bf16_ckpt_lora \| measured \| [\d.]+ ", sections[2])
    assert re.search(r"\| dmd2 \| bf16_ckpt_8bit \| (measured|estimated[^|]*) \| [\d.]+ ", sections[2])
    assert re.search(r'"[^"]*fd[^"]*": [\d.]+', sections[3].lower())
    assert re.search(r"one-step student [\d.]+ images/s, teacher 50 DDIM steps [\d.]+ images/s", sections[4])
