"""Preemption: on SIGUSR1 (SLURM's time-limit warning) or SIGTERM (requeue, scancel, cluster preemption)
save a checkpoint at the next step boundary, stop, and on SIGUSR1 requeue the SLURM job."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

from spear_lit.training.dist import all_reduce

log = logging.getLogger("spear_lit")


class Preemption(L.Callback):
    """Turn a warning or termination signal into a clean checkpoint at a step boundary.

    The signal handler only sets a flag: a checkpoint written from inside a handler would run a collective
    at an arbitrary point of the step (rank A in the middle of a backward, rank B elsewhere). After every
    optimizer step all ranks agree on the flags with one all-reduce (max), so a signal seen by any rank stops
    all of them at the same step; then every rank takes part in ``trainer.save_checkpoint`` (collective)
    to ``<dirpath>/last.ckpt`` and the trainer stops. At that point the step's mini-batch is consumed and
    the next one not yet drawn, so the checkpoint resumes without losing or repeating an optimizer step.

    * SIGUSR1 in a SLURM batch job (``#SBATCH --signal=USR1@N``): rank 0 runs ``scontrol requeue
      $SLURM_JOB_ID``; the job goes back to the queue and, started again with ``ckpt_path=auto``, resumes.
    * SIGTERM: SLURM sends it when the job is requeued (``scontrol requeue``, preemption with
      ``PreemptMode=REQUEUE``) or cancelled, then SIGKILL after ``KillWait``. The requeue (if any) is SLURM's
      own, so only save and stop. Outside SLURM, the log says how to resume.

    ``preempted`` is True after such a stop; ``train.py`` then skips the final export.
    Lightning's own SLURM auto-requeue (a checkpoint written inside its SIGUSR1 handler) is switched off
    in ``setup`` so that the two never race; the SLURM environment itself stays.

    Args:
        dirpath: checkpoint folder; ``None`` = ``<default_root_dir>/checkpoints``.
        requeue: run ``scontrol requeue`` on SIGUSR1 inside a SLURM batch job.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, dirpath: str | None = None, requeue: bool = True):
        self.dirpath, self.requeue = dirpath, requeue
        self.received: dict[int, bool] = {s: False for s in self.SIGNALS}
        self.preempted = False
        self.checkpoint: Path | None = None

    def _handler(self, signum, frame) -> None:
        self.received[signum] = True  # only a flag: acted upon at the next step boundary

    def _install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for s in self.SIGNALS:
                signal.signal(s, self._handler)

    def setup(self, trainer, pl_module, stage) -> None:
        # the environment Lightning's signal connector reads when it registers its handlers (after setup);
        # single-device runs have it only there, not on the strategy
        connector = getattr(trainer, "_accelerator_connector", None)
        env = getattr(connector, "cluster_environment", None) or getattr(
            trainer.strategy, "cluster_environment", None
        )
        if isinstance(env, SLURMEnvironment):
            env.auto_requeue = False
        self._install()  # early: a warning during model loading or engine start-up is not lost

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning registered its SIGTERM handler after `setup` (it broadcasts from inside the handler and
        # raises at the next batch end); ours takes over. A SIGTERM it saw in between is ours too (its
        # composite handler called ours as well), so drop Lightning's copy of the flag.
        self._install()
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None:
            connector.received_sigterm = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        usr1, term = (
            bool(v) for v in all_reduce([self.received[signal.SIGUSR1], self.received[signal.SIGTERM]], "max")
        )
        if not (usr1 or term):
            return
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")
        self.checkpoint = folder / "last.ckpt"
        trainer.save_checkpoint(self.checkpoint, weights_only=False)  # collective: every rank calls it
        self.preempted = True
        trainer.should_stop = True
        if not trainer.is_global_zero:
            return
        what = "SIGUSR1 (time-limit warning)" if usr1 else "SIGTERM"
        job = _slurm_batch_job()
        if usr1 and self.requeue and job:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode == 0:
                log.warning(
                    "%s: saved %s at step %d; requeued SLURM job %s, it resumes from there",
                    what,
                    self.checkpoint,
                    trainer.global_step,
                    job,
                )
            else:
                log.error(
                    "%s: saved %s; `scontrol requeue %s` failed: %s",
                    what,
                    self.checkpoint,
                    job,
                    result.stderr.strip(),
                )
        elif job:
            log.warning(
                "%s: saved %s at step %d and stopped; a requeued job resumes from it (ckpt_path=auto)",
                what,
                self.checkpoint,
                trainer.global_step,
            )
        else:
            log.warning(
                "%s: saved %s at step %d and stopped. Resume with `python train.py <same overrides> "
                "ckpt_path=%s` (or `ckpt_path=auto run_dir=%s`)",
                what,
                self.checkpoint,
                trainer.global_step,
                self.checkpoint,
                trainer.default_root_dir,
            )


def _slurm_batch_job() -> str | None:
    """The id to requeue when this process is a task of a SLURM batch job (not an interactive step)."""
    if not SLURMEnvironment.detect():
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")
