"""Lightning checkpoints at RL-iteration boundaries (plus ``last.ckpt``), on exceptions, and the run's
configuration recorded in every checkpoint. Resume explicitly: ``ckpt_path=<file>`` or ``ckpt_path=auto``.

Both savers subclass Lightning's ``Checkpoint`` base (so Lightning adds no default ``ModelCheckpoint``),
but neither is an ``OnExceptionCheckpoint``: with one of those configured Lightning turns
``fit(ckpt_path=None)`` into ``"last"`` and silently continues an old ``interrupted.ckpt``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks._iteration import finished_iteration
from spear_lit.training.checkpoints import find_latest, resume_hint, save_checkpoint

log = logging.getLogger("spear_lit")


def _folder(dirpath: str | None, trainer) -> Path:
    return Path(dirpath or Path(trainer.default_root_dir) / "checkpoints")


class IterationCheckpoint(Checkpoint):
    """Save ``iter_<t>.ckpt`` every ``k`` iterations and refresh ``last.ckpt`` (atomically) every ``m``.

    The checkpoint holds the model, optimizer, RL iteration, pending mini-batches, every rank's replay
    buffer, the baseline history and callback state: ``python train.py ckpt_path=.../last.ckpt``
    continues the run where it stopped.

    ``last.ckpt`` is also written after the run's last iteration, and preemption (``Preemption``) and
    exceptions (``ExceptionCheckpoint``) save on their own; what ``m > 1`` risks is the iterations since
    the last refresh when a multi-process run dies of anything else (a node failure, an OOM kill).

    Args:
        every_n_iterations: keep a numbered checkpoint every ``k`` iterations (0 = only ``last.ckpt``).
        last_every_n_iterations: refresh ``last.ckpt`` every ``m`` iterations (≥ 1; 1 = every iteration).
            A large model writes its whole sharded state and optimizer each time (a 32B policy with AdamW
            in bf16: ~200 GB), so a cluster run may want the refresh less often than its iterations.
        dirpath: folder; ``None`` = ``<default_root_dir>/checkpoints``.
        keep_last_n: keep only the newest ``n`` numbered checkpoints, deleting older ones after each new one
            is written (0 = keep all).
    """

    def __init__(
        self,
        every_n_iterations: int = 0,
        dirpath: str | None = None,
        last_every_n_iterations: int = 1,
        keep_last_n: int = 0,
    ):
        if every_n_iterations < 0 or last_every_n_iterations < 1 or keep_last_n < 0:
            raise ValueError(
                "callbacks.checkpoint: every_n_iterations and keep_last_n must be >= 0 and "
                f"last_every_n_iterations >= 1, got {every_n_iterations}, {keep_last_n} and {last_every_n_iterations}"
            )
        self.every, self.dirpath, self.last_every = every_n_iterations, dirpath, last_every_n_iterations
        self.keep = keep_last_n

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = finished_iteration(pl_module)
        if record is None:
            return
        folder = _folder(self.dirpath, trainer)
        t = record["iteration"]
        if self.every and t % self.every == 0:
            save_checkpoint(trainer, folder / f"iter_{t:05d}.ckpt")  # collective: returns when all wrote
            if self.keep and trainer.is_global_zero:
                for old in sorted(folder.glob("iter_*.ckpt"))[: -self.keep]:
                    shutil.rmtree(old) if old.is_dir() else old.unlink()  # a distributed one is a folder
        final = t >= getattr(trainer.datamodule, "iterations", float("inf"))
        if t % self.last_every == 0 or final:
            save_checkpoint(trainer, folder / "last.ckpt")


class ExceptionCheckpoint(Checkpoint):
    """On an exception during training, save ``interrupted.ckpt`` and log how to resume.

    Saved only when it holds something new: training had started (the restore succeeded, so a broken
    ``ckpt_path`` never leaves a bogus file) and optimizer steps were taken since. With several processes
    only on SIGTERM, which Lightning raises on every rank at the same point; any other exception reaches
    ranks at different points, where the collective save would hang (the last iteration checkpoint and the
    preemption callback's step-boundary save cover those runs).

    Args:
        dirpath: folder; ``None`` = ``<default_root_dir>/checkpoints``.
        filename: file name without ``.ckpt``.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "interrupted"):
        self.dirpath, self.filename = dirpath, filename
        self._start_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_step = trainer.global_step

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        folder = _folder(self.dirpath, trainer)
        aligned = trainer.world_size == 1 or isinstance(exception, SIGTERMException)
        if self._start_step is not None and trainer.global_step > self._start_step and aligned:
            save_checkpoint(trainer, folder / f"{self.filename}.ckpt")
        if trainer.is_global_zero:
            latest = find_latest(Path(trainer.default_root_dir))
            log.error(
                "run interrupted (%s) at optimizer step %d; %s",
                type(exception).__name__,
                trainer.global_step,
                resume_hint(trainer.default_root_dir, latest),
            )


class ConfigRecord(L.Callback):
    """Store the run's composed configuration (a plain dict) and its RL iteration in every checkpoint
    (``checkpoint["spear_lit"]``), so a resume can be checked against it (``train.py``)."""

    def __init__(self, config: dict):
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        dm = trainer.datamodule
        checkpoint["spear_lit"] = {"config": self.config, "iteration": int(getattr(dm, "iteration", -1))}
