"""Checkpoints that always load and never overwrite another run: atomic writes, explicit resume
(``ckpt_path=<file>`` or ``ckpt_path=auto``), run-directory and configuration checks before a resume.

Plain values in, plain values out: the caller (``train.py``) passes the run's configuration as a dict.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import sys
from contextlib import suppress
from pathlib import Path

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from spear_lit.atomic import fsync_dir, replace_dir, temp_sibling

log = logging.getLogger("spear_lit")

# The file names a run writes under <run_dir>/checkpoints (ckpt_path=auto chooses among them), plus the
# hpc_ckpt_<n>.ckpt Lightning's SLURM handler writes into <run_dir> when auto_requeue is left on.
CHECKPOINT_GLOBS = ("last.ckpt", "interrupted.ckpt", "iter_*.ckpt")
HPC_GLOB = "hpc_ckpt_*.ckpt"

# Configuration keys a resumed run may change (a warning names them); any other difference refuses
# the resume, because it changes the algorithm or the data the checkpoint's state was built for (loss
# terms, replay settings, data sizes, model, task, seed, schedules, added or removed callbacks ...).
# Patterns match dotted keys; `a.b` also covers everything below it.
SAFE_TO_CHANGE = (
    "iterations",
    "run_dir",
    "ckpt_path",
    "export_hf",
    "plan",
    "trainer",  # engineering: devices, precision, logger, strategy plumbing
    "callbacks.validation",
    "callbacks.report",
    "callbacks.checkpoint",
    "callbacks.on_exception",
    "callbacks.preemption",
    "callbacks.entropy",  # monitoring and I/O, not the algorithm
    "data.val_*",
    "tool.num_workers",
)
EXIT_INTERRUPTED = 3  # train.py's exit status for a run stopped by a signal with a resumable checkpoint


class CheckpointError(ValueError):
    """A checkpoint, a run directory or a resume that the run refuses, with a message for the user."""


class RunInterrupted(RuntimeError):
    """The run was stopped (SIGTERM, preemption) after saving a checkpoint; the message says how to resume."""


def register_checkpoint_types() -> None:
    """Allow-list the project's own dataclasses for ``torch.load(weights_only=True)``.

    A checkpoint written mid-iteration holds queued :class:`MiniBatch` es (with their ``TokenBatch`` es).
    We keep ``weights_only=True`` (instead of ``False``) because checkpoints travel between people and
    cluster directories, and unrestricted unpickling would run whatever code a file names; these types
    hold only tensors and numbers. A new type stored in a checkpoint must be added here (the
    mid-iteration resume test fails otherwise).
    """
    from spear_lit.batch import Episode, MiniBatch, Normalizers, TokenBatch

    torch.serialization.add_safe_globals([MiniBatch, Normalizers, TokenBatch, Episode])


# ---------------------------------------------------------------------------------------- writing
class AtomicCheckpointIO(TorchCheckpointIO):
    """Write beside the target (same directory, so the rename never crosses a filesystem), fsync, then
    ``os.replace``: a failed write (full disk, kill) leaves the previous file intact and no partial one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or type(get_filesystem(path)).__name__ != "LocalFileSystem":
            return super().save_checkpoint(
                checkpoint, path, storage_options
            )  # remote stores: their own rules
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(path)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                tmp.unlink()
            raise
        fsync_dir(path.parent)


def save_checkpoint(trainer, path: str | Path) -> None:
    """``trainer.save_checkpoint(path)`` that never leaves a half-written checkpoint at ``path``.

    Single-file checkpoints are atomic through :class:`AtomicCheckpointIO` (set on the trainer). A
    distributed checkpoint (``ModelParallelStrategy(save_distributed_checkpoint=True)``) is a folder
    written by every rank: it is written to a hidden sibling and swapped in by rank 0 after all ranks
    finished. Collective: call on every rank.
    """
    path = Path(path)
    if not getattr(trainer.strategy, "_save_distributed_checkpoint", False):
        trainer.save_checkpoint(path, weights_only=False)
        return
    tmp = path.with_name(f".{path.name}.partial")  # the same name on every rank (no pid)
    trainer.save_checkpoint(tmp, weights_only=False)  # ends with a barrier: every shard is written
    if trainer.is_global_zero:
        replace_dir(tmp, path)
    trainer.strategy.barrier("spear_lit.save_checkpoint")


# ---------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's contents (tensors memory-mapped, not read), or a :class:`CheckpointError` naming
    the file. A distributed checkpoint folder yields its ``meta.pt`` (everything but weights/optimizer)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"ckpt_path={path}: no such file or directory")
    target = p / "meta.pt" if p.is_dir() else p
    register_checkpoint_types()
    try:
        ckpt = torch.load(target, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # text file, truncated file, foreign pickle ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"ckpt_path={path} is not a readable Lightning checkpoint ({reason[:300]})"
        ) from e
    if not isinstance(ckpt, dict) or "pytorch-lightning_version" not in ckpt:
        raise CheckpointError(
            f"ckpt_path={path} is not a Lightning checkpoint (no 'pytorch-lightning_version')"
        )
    return ckpt


def progress(ckpt: dict) -> tuple[int, int]:
    """How far the run had come when ``ckpt`` was written: ``(optimizer steps, RL iteration)``."""
    record = ckpt.get("spear_lit") or {}
    return int(ckpt.get("global_step", -1)), int(record.get("iteration", -1))


def find_latest(run_dir: str | Path) -> Path | None:
    """The checkpoint of ``run_dir`` with the most progress (ties: the newest file); unreadable ones are
    skipped with a warning (e.g. a file cut short by a kill before writes were atomic)."""
    run_dir = Path(run_dir)
    found = [p for g in CHECKPOINT_GLOBS for p in (run_dir / "checkpoints").glob(g)]
    found += list(run_dir.glob(HPC_GLOB))
    ranked = []
    for p in set(found):
        try:
            ranked.append((progress(read_checkpoint(p)), p.stat().st_mtime, p))
        except CheckpointError as e:
            log.warning("ckpt_path=auto: skipping %s", e)
    return max(ranked)[2] if ranked else None


# ----------------------------------------------------------------------------------- run directory
def used_outputs(run_dir: str | Path) -> list[str]:
    """Outputs of a run already in ``run_dir`` that a new run would overwrite (Hydra's own files, SLURM
    logs and Lightning's versioned logger folders do not count)."""
    run_dir = Path(run_dir)
    used = [n for n in ("metrics.csv", "policy_hf") if (run_dir / n).exists()]
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(not p.name.startswith(".") for p in ckpts.iterdir()):
        used.append("checkpoints/")
    used += sorted(p.name for p in run_dir.glob(HPC_GLOB))
    return used


def resolve_resume(ckpt_path: str | None, run_dir: str | Path, *, check_dir: bool = True) -> str | None:
    """The checkpoint to resume from (``None``: a fresh run), after refusing what would lose work.

    * ``None``: a fresh run; refused if ``run_dir`` holds another run's outputs.
    * ``"auto"``: the most advanced checkpoint of ``run_dir`` (:func:`find_latest`), else a fresh run.
    * a path: must be a readable checkpoint; ``run_dir`` must be unused or the checkpoint's own run dir.

    ``check_dir=False`` skips the run-directory checks (processes that Lightning launched after rank 0
    passed them: by then rank 0 may already have written there).
    """
    run_dir = Path(run_dir)
    used = used_outputs(run_dir) if check_dir else []
    if ckpt_path == "auto":
        found = find_latest(run_dir)
        if found is None and used:
            log.warning(
                "ckpt_path=auto: no checkpoint in %s; starting a fresh run that replaces %s",
                run_dir,
                ", ".join(used),
            )
        log.info("ckpt_path=auto: %s", f"resuming from {found}" if found else "no checkpoint, fresh run")
        return str(found) if found else None
    if ckpt_path is None:
        if used:
            raise CheckpointError(
                f"run_dir={run_dir} already holds another run's outputs ({', '.join(used)}); a new run would "
                f"overwrite them. Resume it with `ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}` (or "
                f"`ckpt_path=auto run_dir={run_dir}`), or write elsewhere with `run_dir=<new dir>`."
            )
        return None
    read_checkpoint(ckpt_path)  # fails clearly before any process starts
    inside = run_dir.resolve() in Path(ckpt_path).resolve().parents
    if used and not inside:
        raise CheckpointError(
            f"run_dir={run_dir} already holds another run's outputs ({', '.join(used)}); resuming "
            f"{ckpt_path} there would overwrite them. Choose an empty `run_dir=<new dir>`."
        )
    return str(ckpt_path)


# ---------------------------------------------------------------------------------- configuration
_ABSENT = "<absent>"


def config_diff(old, new, prefix: str = "") -> dict[str, tuple]:
    """``{dotted key: (old, new)}`` for every difference; a subtree present on one side only is one entry."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = {}
        for k in sorted(old.keys() | new.keys(), key=str):
            out.update(config_diff(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{prefix}{k}."))
        return out
    return {prefix[:-1]: (old, new)} if old != new else {}


def is_safe_to_change(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") or fnmatch.fnmatchcase(key, p) for p in SAFE_TO_CHANGE)


def check_config(saved: dict | None, current: dict, ckpt_path: str) -> list[str]:
    """Compare the checkpoint's recorded configuration with the current one (both unresolved, so an
    interpolated value differs only at its source key). Returns the safe differences (for a warning);
    raises :class:`CheckpointError` naming the others with their old and new values."""
    if saved is None:
        log.warning(
            "%s records no configuration (written before spear_lit recorded it): not compared", ckpt_path
        )
        return []
    diffs = config_diff(saved, current)
    refused = {k: v for k, v in diffs.items() if not is_safe_to_change(k)}
    if refused:
        lines = "\n".join(f"  {k}: {_short(a)} -> {_short(b)}" for k, (a, b) in refused.items())
        raise CheckpointError(
            f"cannot resume {ckpt_path}: the configuration differs in key(s) that change the algorithm or "
            f"the data (checkpoint -> now):\n{lines}\nResume with the checkpoint's settings, or start a "
            f"new run (ckpt_path=null) in a new run_dir."
        )
    return [f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in diffs.items()]


def _short(v, limit: int = 120) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resume_hint(run_dir: str | Path, ckpt: str | Path | None) -> str:
    """How to continue this run, as commands (the original command-line overrides kept)."""
    args = [a for a in sys.argv[1:] if a.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "run_dir")]
    base = " ".join(["python train.py", *args])
    if ckpt is None:
        return f"no checkpoint was written; rerun `{base} run_dir=<new dir>`"
    return (
        f"resume with `{base} ckpt_path=auto run_dir={run_dir}` "
        f"(or `{base} ckpt_path={ckpt} run_dir={run_dir}`)"
    )
