"""Real SLURM jobs of ``scripts/slurm/train.sbatch`` on the local cluster (``scripts/slurm/local_cluster.sh up``).

The preemption test runs beside the uninterrupted reference job (one node each); each test waits for its
jobs by polling ``squeue`` / ``scontrol show job`` (``sbatch --wait`` returns up to 30 s late). Skipped with
a reason when no cluster answers.
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY_RUN, subprocess_env

# one xdist group: with `-n N --dist loadgroup` the jobs are submitted once, by one worker
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

ITERATIONS = 4
DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu"]
TINY = [*TINY_RUN, f"iterations={ITERATIONS}", *DDP_CPU]


def _cluster_up() -> str | None:
    """``None`` if a SLURM controller answers with usable nodes, else why not."""
    if shutil.which("sinfo") is None:
        return "SLURM is not installed: run `sudo scripts/slurm/local_cluster.sh up` (or `make slurm-up`)"
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if out.returncode != 0 or not re.search(r"idle|mixed|allocated", out.stdout):
        return f"no SLURM cluster is up ({out.stderr.strip() or out.stdout.strip()}): `make slurm-up`"
    return None


def _slurm(*cmd: str) -> str:
    """A query's stdout; retried, because a busy controller (2 loaded cores) can time out a request."""
    for _ in range(10):
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout
        time.sleep(1)
    raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")


class Job:
    """One ``sbatch`` submission of the generic batch script, with its run directory and log."""

    def __init__(self, root: Path, name: str, sbatch_opts: list[str], overrides: list[str]):
        self.run_dir, self.log_pattern = root / name, root / f"{name}-%j.out"
        env = {
            **subprocess_env(),
            "OMP_NUM_THREADS": "1",
            "PYTHON": sys.executable,
            "RUN_DIR": str(self.run_dir),
        }
        out = subprocess.run(
            [
                "sbatch",
                "--parsable",
                f"--job-name={name}",
                f"--output={self.log_pattern}",
                *sbatch_opts,
                "scripts/slurm/train.sbatch",
                *overrides,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        self.id = out.stdout.strip().split(";")[0]
        self.log = Path(str(self.log_pattern).replace("%j", self.id))

    def info(self) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        return dict(re.findall(r"(\w+)=(\S*)", _slurm("scontrol", "show", "job", self.id)))

    def queued(self) -> bool:
        return bool(_slurm("squeue", "-h", "-j", self.id, "-o", "%T").strip())

    def rows(self) -> list[dict]:
        path = self.run_dir / "metrics.csv"
        return list(csv.DictReader(open(path))) if path.exists() else []

    def wait(self, timeout: float = 400) -> dict[str, str]:
        deadline = time.time() + timeout
        while self.queued():
            assert time.time() < deadline, (
                f"job {self.id} still queued after {timeout} s:\n{self.text()[-3000:]}"
            )
            time.sleep(2)
        return self.info()

    def wait_until(self, predicate, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not predicate():
            assert self.queued(), f"job {self.id} ended before {what}:\n{self.text()[-3000:]}"
            assert time.time() < deadline, (
                f"job {self.id}: no {what} after {timeout} s:\n{self.text()[-3000:]}"
            )
            time.sleep(1)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    why = _cluster_up()
    if why:
        pytest.skip(why)
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture
def submit(root):
    """``submit(name, sbatch_opts, overrides) -> Job``; jobs still queued at the end are cancelled."""
    submitted = []

    def _submit(name, sbatch_opts, overrides):
        submitted.append(Job(root, name, sbatch_opts, overrides))
        return submitted[-1]

    yield _submit
    for job in submitted:  # a failed test leaves nothing running
        if job.queued():
            subprocess.run(["scancel", job.id], capture_output=True)


@pytest.fixture(scope="module")
def reference(root):
    """The uninterrupted 2-task run (also the preemption test's expected rows); submitted once."""
    job = Job(root, "reference", ["--nodes=1", "--ntasks-per-node=2"], TINY)
    yield job
    if job.queued():
        subprocess.run(["scancel", job.id], capture_output=True)


def _assert_ranks_from_slurm(job: Job, world: int) -> None:
    """Lightning took the ranks from SLURM: one process per srun task, each a different rank of `world`."""
    log = job.text()
    # a set: Lightning's line may reach the log through two handlers (its own and Hydra's)
    ranks = sorted({int(r) for r in re.findall(r"GLOBAL_RANK: (\d+), MEMBER: \d+/" + str(world), log)})
    assert ranks == list(range(world)), log[-3000:]
    assert f"Starting with {world} processes" in log


def _assert_every_iteration_once(job: Job, n: int) -> list[dict]:
    rows = job.rows()
    assert [int(r["iteration"]) for r in rows] == list(range(1, n + 1))
    steps = [int(r["optimizer_steps"]) for r in rows]
    assert all(b > a for a, b in zip([0, *steps], steps)), steps  # every iteration took optimizer steps
    return rows


def test_requeue_and_time_limit_warning_resume_by_themselves(submit, reference):
    """SIGTERM (`scontrol requeue`) after iteration 1, then SIGUSR1 (the time-limit warning) once the
    requeued run has written another row: each time every rank saves last.ckpt at the same step and the
    job comes back by itself (the second time requeued by rank 0), resumes with ckpt_path=auto and
    finishes with the same rows as the uninterrupted reference run."""
    job = submit("preempted", ["--nodes=1", "--ntasks-per-node=2"], TINY)  # beside the reference run
    job.wait_until(lambda: len(job.rows()) >= 1, "first metrics row")
    subprocess.run(["scontrol", "requeue", job.id], check=True)
    job.wait_until(lambda: job.info().get("Restarts") == "1" and "start 2:" in job.text(), "restart")
    done = len(job.rows())
    assert done < ITERATIONS, "the run finished before the signal: raise ITERATIONS"
    job.wait_until(lambda: len(job.rows()) > done, "a row after the restart")
    subprocess.run(["scancel", "--signal=USR1", job.id], check=True)
    info = job.wait()

    log = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["Restarts"] == "2", log[-3000:]
    assert log.count("SIGTERM: saved") == 1 and log.count("SIGUSR1 (time-limit warning): saved") == 1, log[
        -3000:
    ]
    assert f"requeued SLURM job {job.id}" in log
    assert log.count("ckpt_path=auto: resuming from") == 2 * 2  # two restarts, logged by both ranks
    assert not list(job.run_dir.rglob("hpc_ckpt_*.ckpt"))  # Lightning's own auto-requeue stayed off
    rows = _assert_every_iteration_once(job, ITERATIONS)

    reference.wait()
    expected = _assert_every_iteration_once(reference, ITERATIONS)
    # everything but timings: rewards, success, losses, KL, clip fractions, buffer counts, schedules
    deterministic = [k for k in expected[0] if not k.startswith("perf/")]
    assert len(deterministic) > 30
    for got, want in zip(rows, expected):
        diff = {k: (got[k], want[k]) for k in deterministic if got[k] != want[k]}
        assert not diff, f"iteration {want['iteration']}: {diff}"


def test_two_tasks_on_one_node(reference):
    job = reference
    info = job.wait()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.text()[-3000:]
    assert info["Restarts"] == "0" and info["NumNodes"] == "1"
    _assert_ranks_from_slurm(job, world=2)
    _assert_every_iteration_once(job, ITERATIONS)
    assert (job.run_dir / "policy_hf").is_dir()  # a finished run exports its policy once


def test_two_nodes(submit):
    job = submit("two_nodes", ["--nodes=2", "--ntasks-per-node=1"], [*TINY_RUN, "iterations=2", *DDP_CPU])
    info = job.wait()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.text()[-3000:]
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]"
    _assert_ranks_from_slurm(job, world=2)
    _assert_every_iteration_once(job, 2)
