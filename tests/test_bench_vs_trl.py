"""Smoke test of bench/vs_trl.py: one iteration of TRL's GRPOTrainer, of our trainer and of the floor.

Nothing is timed or compared here (benchmarks print tables; tests do not time things): the test checks that
both trainers ran the workload as specified (one optimizer step, exactly 128 new tokens per completion) and
that the JSON line carries the keys and a ratio consistent with its own numbers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("trl") is None,
    reason="trl not installed: pip install -e '.[bench]' torch==2.13.0 (make bench-trl)",
)


def test_vs_trl_one_iteration_each():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "bench/vs_trl.py", "--iterations", "1", "--rounds", "1", "--no-vllm"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    for key in (
        "ours_s_per_iter",
        "trl_s_per_iter",
        "ratio",
        "floor_s_per_iter",
        "ours_over_floor",
        "trl_over_floor",
        "ours_cpu_s_per_iter",
        "trl_cpu_s_per_iter",
        "cpu_ratio",
    ):
        assert result[key] > 0, key
    assert result["ratio"] == pytest.approx(result["ours_s_per_iter"] / result["trl_s_per_iter"])
    assert result["ours_over_floor"] == pytest.approx(result["ours_s_per_iter"] / result["floor_s_per_iter"])
    assert (result["iterations"], result["rounds"], result["threads"]) == (1, 1, 1)
    assert "ours_vllm_cpu_s_per_iter" not in result
    # the table: every run made exactly one optimizer step and generated exactly 128 tokens per completion
    rows = [line for line in lines if line.startswith("| ") and "s/iter" not in line]
    assert len(rows) == 3, proc.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[-2:] == ["128", "1"], row
