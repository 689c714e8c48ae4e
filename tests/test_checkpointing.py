"""Checkpoints that always load, explicit resume, runs that never overwrite each other (issue 12 items 1-3).

The end-to-end tests run ``train.py`` in subprocesses (as a user does) on the shipped tiny policy: a run is
interrupted at a chosen phase (Ctrl-C raises ``KeyboardInterrupt``; :class:`Interrupt` raises it at an exact
point), resumed with ``ckpt_path=auto``, and its ``metrics.csv`` must equal an uninterrupted run's.
"""

from __future__ import annotations

import csv
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import REPO, TINY_RUN, TINY_RUN_WITH_VALIDATION, compose_cfg, subprocess_env
from omegaconf import OmegaConf

from spear_lit.training import checkpoints as ckpts

ckpts.register_checkpoint_types()  # this process loads checkpoints with torch.load(weights_only=True) too

# 3 iterations, validation after each; replay fires from iteration 2 (spear.buffer_size=2).
RUN = [*TINY_RUN_WITH_VALIDATION, "callbacks.validation.every_n_iterations=1"]


class Interrupt(L.Callback):
    """Raise ``KeyboardInterrupt`` (what Ctrl-C raises) once, at ``phase`` of RL iteration ``at``.

    Phases: ``rollout`` (inside generation of iteration ``at``), ``mid_iteration`` (after an optimizer step
    that leaves both on-policy and replay mini-batches queued), ``before_replay`` (after the last on-policy
    step of an iteration that still has replay steps queued), ``validation`` (inside the evaluation after
    iteration ``at``), ``export`` (while the final policy is written). ``flag`` is created when it fires, so
    the same configuration resumes without firing again (a resume must not change the configuration).
    """

    def __init__(self, phase: str, flag: str, at: int = 2):
        self.phase, self.flag, self.at = phase, Path(flag), at

    def _fire(self) -> None:
        if not self.flag.exists():
            self.flag.write_text(self.phase)
            raise KeyboardInterrupt(f"test interrupt: {self.phase}")

    def setup(self, trainer, pl_module, stage) -> None:
        dm = trainer.datamodule
        if self.phase == "rollout":
            generate = dm.engine.generate

            def gen(*a, **kw):
                if dm.upcoming_iteration == self.at:
                    self._fire()
                return generate(*a, **kw)

            dm.engine.generate = gen
        elif self.phase == "validation":
            evaluate = dm.evaluate

            def ev(t, **kw):
                if t == self.at:
                    self._fire()
                return evaluate(t, **kw)

            dm.evaluate = ev
        elif self.phase == "export":
            save = dm.tokenizer.save_pretrained

            def sp(*a, **kw):  # the model's weights are written by then: an export cut in the middle
                self._fire()
                return save(*a, **kw)

            dm.tokenizer.save_pretrained = sp

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pending = {mb.kind for mb in trainer.datamodule.queue if not getattr(mb, "done", False)}
        if self.phase == "mid_iteration" and {"on_policy", "replay"} <= pending:
            self._fire()
        if self.phase == "before_replay" and pending == {"replay"}:
            self._fire()


def _summary_start(stdout: str) -> list[tuple[str, str]]:
    """``(metric, value at iteration 0)`` of the closing summary's validation lines (none may be nan)."""
    start = re.findall(r"^\s*(val/\S+)\s+(\S+) -> ", stdout, re.M)
    assert all(v != "nan" for _, v in start), stdout[-2000:]
    return start


def _run(args, timeout=600):
    run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("run_dir="))
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run_dir}/hydra"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _rows(run_dir: Path) -> list[dict]:
    """metrics.csv without the timing columns (the only ones that may differ between equal runs)."""
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run; started with ckpt_path=auto in an empty run_dir, which must be a fresh run."""
    run_dir = tmp_path_factory.mktemp("reference")
    proc = _run([*RUN, f"run_dir={run_dir}", "ckpt_path=auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ckpt_path=auto: no checkpoint, fresh run" in proc.stderr + proc.stdout
    (run_dir / "stdout.txt").write_text(proc.stdout)
    assert [int(r["iteration"]) for r in _rows(run_dir)] == [1, 2, 3]
    assert float(_rows(run_dir)[2]["buffer/replayed"] or 0) > 0  # replay fired: its queue is tested below
    return run_dir


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
@pytest.mark.parametrize("phase", ["rollout", "mid_iteration", "validation", "export"])
def test_interrupt_at_any_phase_resumes_to_the_uninterrupted_run(tmp_path, reference, phase):
    args = [
        *RUN,
        f"run_dir={tmp_path}",
        "+callbacks.interrupt._target_=test_checkpointing.Interrupt",
        f"+callbacks.interrupt.phase={phase}",
        f"+callbacks.interrupt.flag={tmp_path}/fired",
    ]
    first = _run(args)
    assert first.returncode != 0 and (tmp_path / "fired").exists(), first.stderr[-3000:]
    saved = tmp_path / "checkpoints" / ("last.ckpt" if phase == "export" else "interrupted.ckpt")
    assert saved.exists(), first.stderr[-3000:]
    if phase != "export":
        assert "ckpt_path=auto run_dir=" in first.stderr + first.stdout  # the resume hint
    if phase == "mid_iteration":  # the checkpoint holds queued on-policy and replay steps, and loads safely
        ckpt = torch.load(saved, map_location="cpu", weights_only=True)
        queue = ckpt["RolloutDataModule"]["ranks"][0]["queue"]
        assert {"on_policy", "replay"} <= {mb.kind for mb in queue if not getattr(mb, "done", False)}
    if phase == "export":  # an export cut short leaves nothing half-written
        assert not (tmp_path / "policy_hf").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".policy_hf")]

    resumed = _run([*args, "ckpt_path=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"ckpt_path=auto: resuming from {saved}" in resumed.stderr + resumed.stdout
    assert _rows(tmp_path) == _rows(reference)
    # the summary still compares against the initial policy's validation (iteration 0, before the interrupt)
    start = _summary_start(resumed.stdout)
    assert start and start == _summary_start((reference / "stdout.txt").read_text()), resumed.stdout[-2000:]
    from spear_lit.policy import PolicySource

    assert sum(p.numel() for p in PolicySource(str(tmp_path / "policy_hf")).model().parameters()) > 100_000


def test_a_used_run_dir_refuses_a_fresh_run_and_a_foreign_file_is_no_checkpoint(tmp_path, reference):
    again = _run([*RUN, f"run_dir={reference}"])
    assert again.returncode == 2
    out = again.stdout + again.stderr
    assert f"run_dir={reference} already holds another run's outputs" in out
    assert "ckpt_path=auto" in out and "run_dir=<new dir>" in out

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    bad = _run([*RUN, f"run_dir={tmp_path}/run", f"ckpt_path={text}"])
    out = bad.stdout + bad.stderr
    assert bad.returncode == 2 and f"ckpt_path={text} is not a readable Lightning checkpoint" in out
    assert "Traceback" not in out and not (tmp_path / "run" / "checkpoints").exists()

    truncated = tmp_path / "truncated.ckpt"
    data = (reference / "checkpoints" / "last.ckpt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpts.CheckpointError, match="truncated.ckpt is not a readable Lightning checkpoint"):
        ckpts.read_checkpoint(truncated)


def test_auto_picks_the_most_advanced_valid_checkpoint(tmp_path, reference):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    last = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for name, step in (("iter_00001.ckpt", 2), ("last.ckpt", 8), ("interrupted.ckpt", 5)):
        torch.save({**last, "global_step": step}, folder / name)
    (folder / "iter_00009.ckpt").write_text("cut short")  # unreadable: skipped
    os.utime(folder / "interrupted.ckpt", (time.time() + 60,) * 2)  # newer file, but less progress
    assert ckpts.find_latest(tmp_path) == folder / "last.ckpt"
    assert ckpts.resolve_resume("auto", tmp_path) == str(folder / "last.ckpt")
    assert ckpts.resolve_resume("auto", tmp_path / "empty") is None


def test_resuming_a_spear_checkpoint_under_grpo_is_refused_naming_the_keys(reference):
    path = str(reference / "checkpoints" / "last.ckpt")
    saved = ckpts.read_checkpoint(path)["spear_lit"]["config"]

    def current(*overrides):
        cfg = compose_cfg(saved["run_dir"], [*RUN, "ckpt_path=auto", *overrides])
        return OmegaConf.to_container(cfg, resolve=False)

    with pytest.raises(ckpts.CheckpointError) as err:
        ckpts.check_config(saved, current("loss=grpo"), path)
    msg = str(err.value)
    assert "data.replay:" in msg and "-> None" in msg
    assert (
        "loss.terms.policy.objective._target_: 'spear_lit.algos.clip_cov_loss' -> 'spear_lit.algos.ppo_clip_loss'"
        in msg
    )
    assert "\n  iterations:" not in msg and "\n  seed:" not in msg  # unchanged keys are not listed
    with pytest.raises(ckpts.CheckpointError, match=r"seed: 0 -> 1"):
        ckpts.check_config(saved, current("seed=1"), path)
    # keys that are safe to change only warn
    warned = ckpts.check_config(
        saved, current("iterations=5", "callbacks.validation.every_n_iterations=2"), path
    )
    assert warned == ["callbacks.validation.every_n_iterations: 1 -> 2", "iterations: 3 -> 5"]


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    """A full disk during the write (ENOSPC from write or fsync) must leave the old last.ckpt loadable."""
    io, path = ckpts.AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"pytorch-lightning_version": "2", "global_step": 1, "w": torch.ones(1000)}, path)

    def full_disk(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_save = torch.save

    def half_written(obj, f, *a, **kw):  # writes part of the file, then the disk is full
        real_save(obj, f, *a, **kw)
        f.truncate(f.tell() // 2)
        full_disk()

    for patch in (("os.fsync", full_disk), ("torch.save", half_written)):
        with monkeypatch.context() as m:
            m.setattr(*patch)
            with pytest.raises(OSError, match="No space left"):
                io.save_checkpoint(
                    {"pytorch-lightning_version": "2", "global_step": 2, "w": torch.zeros(10**6)}, path
                )
        assert ckpts.read_checkpoint(path)["global_step"] == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left


def test_a_failed_export_raises_and_keeps_the_previous_policy(tmp_path, monkeypatch):
    from spear_lit.policy import PolicySource
    from spear_lit.policy.source import save_hf

    src = PolicySource("builtin:tiny-math-sft")
    model, tok = src.model(), src.tokenizer()
    out = save_hf(model, tok, tmp_path / "policy_hf")
    before = sorted(p.name for p in out.iterdir())

    def full_disk(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tok), "save_pretrained", full_disk)  # weights written, then the disk is full
    with pytest.raises(OSError, match=f"saving the policy to {out} failed"):
        save_hf(model, tok, out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy_hf"]
    PolicySource(str(out)).model()  # still loads


def test_an_interrupt_after_an_in_step_on_policy_step_keeps_the_old_logp_of_the_stored_rows(tmp_path):
    # One on-policy step per iteration: no old-log-prob pass; the rows stored in the replay buffer get their old
    # log-probs from that step. Interrupted right after it (replay steps still queued), the checkpoint must hold
    # them: the resumed run replays those rows in iteration 3 exactly as the uninterrupted run does.
    one_step = [*TINY_RUN, "data.mini_batch_rows=16"]
    ref = tmp_path / "reference"
    proc = _run([*one_step, f"run_dir={ref}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [float(r["buffer/replayed"] or 0) > 0 for r in _rows(ref)] == [False, True, True]
    args = [
        *one_step,
        f"run_dir={tmp_path / 'run'}",
        "+callbacks.interrupt._target_=test_checkpointing.Interrupt",
        "+callbacks.interrupt.phase=before_replay",
        f"+callbacks.interrupt.flag={tmp_path}/fired",
    ]
    first = _run(args)
    assert first.returncode != 0 and (tmp_path / "fired").exists(), first.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run/checkpoints/interrupted.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["RolloutDataModule"]["ranks"][0]
    assert [mb.kind for mb in state["queue"]] == ["replay"]
    stored = state["replay"]["rows"].values()
    assert stored and all(float(r["old_logp"].abs().sum()) > 0 for r in stored)
    resumed = _run([*args, "ckpt_path=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _rows(tmp_path / "run") == _rows(ref)


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
def test_sigterm_exits_non_zero_with_the_resume_command(tmp_path):
    args = [*RUN, "iterations=50", f"run_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra"]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not (tmp_path / "metrics.csv").exists() and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == ckpts.EXIT_INTERRUPTED, out[-3000:]
    assert f"ckpt_path=auto run_dir={tmp_path}" in out, out[-3000:]
    assert ckpts.find_latest(tmp_path) is not None and not (tmp_path / "policy_hf").exists()
