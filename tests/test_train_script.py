"""``train.py`` as a user runs it: end to end, two processes, Ctrl-C and resume (subprocesses)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO, TINY_RUN, TINY_RUN_WITH_VALIDATION, subprocess_env

from callbacks.report import SPEC_METRICS


def _run(args, timeout=600, **kw):
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args, *_hydra_dir(args)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def _hydra_dir(args) -> list[str]:
    """Keep Hydra's own logs beside the run's outputs (not in the repository's outputs/)."""
    run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("run_dir="))
    return [f"hydra.run.dir={run_dir}/hydra"]


def test_train_py_end_to_end_leaves_metrics_plot_summary_and_hf_policy(tmp_path):
    proc = _run(
        [
            *TINY_RUN_WITH_VALIDATION,
            "iterations=2",
            f"run_dir={tmp_path}",
            "callbacks.validation.every_n_iterations=1",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "spear_lit run summary" in proc.stdout and "success rate" in proc.stdout
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    assert set(SPEC_METRICS) <= set(rows[0])
    assert float(rows[0]["perf/rollout_tokens_per_s"]) > 0
    assert "val/arith/accuracy" in rows[0] and "val/arith/accuracy_sampled" in rows[0]
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    from spear_lit.policy import PolicySource

    model = PolicySource(str(tmp_path / "policy_hf")).model()
    assert sum(p.numel() for p in model.parameters()) > 100_000
    # any Lightning checkpoint exports to the same Hugging Face policy
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "spear_lit.training.export",
            str(tmp_path / "checkpoints" / "last.ckpt"),
            str(tmp_path / "exported"),
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    exported = PolicySource(str(tmp_path / "exported")).model()
    for (name, a), (_, b) in zip(model.state_dict().items(), exported.state_dict().items()):
        assert torch.equal(a, b), name


def test_two_ranks_run_identical_steps_with_uneven_filtering_and_replay_and_resume_own_buffers(tmp_path):
    """DDP (gloo) on 2 CPU processes; rank 1 masks out half of its rows. Then resume on 2 ranks."""
    common = [
        *TINY_RUN,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "spear.buffer_size=1",
        "data.prompts_per_iteration=8",
        "+data.filters.asym={_target_:helpers.odd_rows_on_rank,_partial_:true}",
        "+callbacks.log._target_=helpers.StepLog",
    ]
    common.append(
        f"+callbacks.log.out_dir={tmp_path}/log"
    )  # the same in both runs: a resume keeps the callbacks
    first = _run([*common, "iterations=5", f"run_dir={tmp_path}/a"])
    assert first.returncode == 0, first.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / "log" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"], (r0["steps"], r1["steps"])  # same steps, kinds and micro-batch counts
    assert any(s.startswith("replay") for v in r0["steps"].values() for s in v), r0["steps"]
    assert r0["global_step"] == r1["global_step"] > 0
    assert r0["final_buffer"] != r1["final_buffer"]  # rank-local buffers really differ
    with open(tmp_path / "a" / "metrics.csv") as f:  # rank 1 drops its 8 odd rows of 16, rank 0 none
        assert [float(r["filter/asym"]) for r in csv.DictReader(f)] == [8.0] * 5

    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    second = _run([*common, "iterations=6", f"run_dir={tmp_path}/b", f"ckpt_path={ckpt}"])
    assert second.returncode == 0, second.stderr[-3000:]
    s0, s1 = (json.loads((tmp_path / "log" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert s0["loaded_buffer"] == r0["final_buffer"] and s1["loaded_buffer"] == r1["final_buffer"]
    assert s0["iteration"] == s1["iteration"] == 6


def test_fsdp2_on_two_cpu_processes_trains_and_exports(tmp_path):
    """ModelParallelStrategy (FSDP2, fully_shard per decoder layer) with gloo: sharded generate, update, export."""
    proc = _run(
        [
            *TINY_RUN,
            "trainer=fsdp",
            "trainer.accelerator=cpu",
            "iterations=2",
            f"run_dir={tmp_path}",
            "+callbacks.log._target_=helpers.StepLog",
            f"+callbacks.log.out_dir={tmp_path}/log",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / "log" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"] and r0["global_step"] == r1["global_step"] > 0
    from spear_lit.policy import PolicySource

    exported = PolicySource(str(tmp_path / "policy_hf")).model()
    shipped = PolicySource("builtin:tiny-math-sft").model()
    changed = [not torch.equal(a, b) for a, b in zip(exported.parameters(), shipped.parameters())]
    assert any(changed)  # the gathered full weights were trained and saved


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path):
    # a run that cannot end on its own before the signal, however fast or slow the machine is
    args = [*TINY_RUN, "iterations=100000", f"run_dir={tmp_path}"]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args, *_hydra_dir(args)],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Both waits only catch a hang: on two busy cores an iteration of this run takes ~1.5 min, and the
    # interrupted one still finishes its step and saves before exiting (120 s was once too short).
    deadline = time.time() + 900
    while not (tmp_path / "metrics.csv").exists() and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=900)
    ckpt = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert ckpt.exists(), out[-3000:]
    assert proc.returncode != 0 and f"ckpt_path=auto run_dir={tmp_path}" in out  # says how to resume
    done = len(list(csv.DictReader(open(tmp_path / "metrics.csv"))))
    resumed = _run([*TINY_RUN, f"iterations={done + 1}", f"run_dir={tmp_path}/resumed", f"ckpt_path={ckpt}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "resumed" / "metrics.csv")))
    assert int(rows[-1]["iteration"]) == done + 1
