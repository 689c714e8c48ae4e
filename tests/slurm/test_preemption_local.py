"""The Preemption callback without a cluster: SIGTERM to every process of a run, as SLURM delivers it.

SLURM (and systemd) signal the whole process tree of a job, not only the trainer: the sandboxed tool
workers get the SIGTERM too. The run must still save a checkpoint at the next step, exit with the
"interrupted" status and a resume command, and ``ckpt_path=auto`` must continue to the same rows as an
uninterrupted run (a tool worker killed mid-rollout would turn tool calls into errors and change them).
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY_RUN, subprocess_env

EXIT_INTERRUPTED = 3  # spear_lit.training.checkpoints.EXIT_INTERRUPTED


def _train(run_dir: Path, *extra: str) -> subprocess.Popen:
    args = [*TINY_RUN, "iterations=2", f"run_dir={run_dir}", f"hydra.run.dir={run_dir}/hydra", *extra]
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env={**subprocess_env(), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (what SLURM's proctrack/linuxproc signals)."""
    try:
        kids = [
            int(k) for t in Path(f"/proc/{pid}/task").iterdir() for k in (t / "children").read_text().split()
        ]
    except OSError:
        return [pid]
    return [pid, *(p for k in kids for p in _tree(k))]


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.csv"
    return list(csv.DictReader(open(path))) if path.exists() else []


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals and /proc")
def test_sigterm_to_the_whole_process_tree_saves_stops_and_resumes_exactly(tmp_path):
    reference = _train(tmp_path / "reference")  # beside the interrupted run: same seed, same rows expected
    run = _train(tmp_path / "run")
    deadline = time.time() + 300
    while not _rows(tmp_path / "run") and run.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    tree = _tree(run.pid)
    assert len(tree) > 1, "expected tool worker processes under the trainer"
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    out, _ = run.communicate(timeout=120)
    assert run.returncode == EXIT_INTERRUPTED, out[-3000:]
    assert "SIGTERM: saved" in out and "ckpt_path=auto" in out, out[-3000:]
    stopped_at = len(_rows(tmp_path / "run"))
    assert stopped_at < 2 and (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "run" / "policy_hf").exists()  # a preempted run does not export

    resumed = _train(tmp_path / "run", "ckpt_path=auto")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    ref_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_out[-3000:]
    got, want = _rows(tmp_path / "run"), _rows(tmp_path / "reference")
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want] == ["1", "2"]
    for g, w in zip(got, want):  # everything but timings
        diff = {k: (g[k], w[k]) for k in w if not k.startswith("perf/") and g[k] != w[k]}
        assert not diff, f"iteration {w['iteration']} after a stop in iteration {stopped_at + 1}: {diff}"
