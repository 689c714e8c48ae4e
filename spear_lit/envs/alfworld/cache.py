"""ALFWorld games generated on first use into a cache folder, so a tiny ALFWorld run needs no download and
no extra command: ``python train.py +experiment=alfworld_tiny_spear`` works on a fresh machine.

``generated_env`` is a drop-in for :class:`~spear_lit.envs.alfworld.AlfWorldEnv` as the agent's environment
factory. The games of a split are games ``start..stop-1`` of the set :mod:`.generate` draws with ``seed``
(a game depends only on ``(seed, index)``), so disjoint index ranges give disjoint train/validation games.
They are written once under ``<data_path>/seed<seed>-<start>-<stop>/<split>/`` (about 1 s per game, in a
child process that imports the ``alfworld`` package), behind a file lock so that concurrent ranks or runs
generate them once; a folder is used only after it is complete.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from spear_lit.envs.alfworld.env import AlfWorldEnv

__all__ = ["ensure_games", "generated_env"]

log = logging.getLogger(__name__)

_GENERATE = """
import sys
from spear_lit.envs.alfworld.generate import make_game
out, seed, split, start, stop = sys.argv[1:]
for i in range(int(start), int(stop)):
    make_game(out, i, int(seed), split)
"""


def ensure_games(
    root: str | Path, split: str, *, seed: int, start: int, stop: int, python: str | None = None
) -> str:
    """The ``data_path`` holding games ``start..stop-1`` (drawn with ``seed``) under its ``split`` folder,
    generating them first if no complete copy exists under ``root``."""
    if not 0 <= start < stop:
        raise ValueError(f"game range [{start}, {stop}) of split {split!r} is empty")
    data_path = Path(os.path.expandvars(str(root))).expanduser() / f"seed{seed}-{start}-{stop}"
    done = data_path / f".{split}.complete"
    if done.exists():
        return str(data_path)
    data_path.mkdir(parents=True, exist_ok=True)
    with open(data_path / f".{split}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank/run may be generating the same games
        if not done.exists():
            _generate(data_path, split, seed, start, stop, python or sys.executable)
            done.touch()
    return str(data_path)


def _generate(data_path: Path, split: str, seed: int, start: int, stop: int, python: str) -> None:
    partial = data_path / f".{split}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(data_path / split, ignore_errors=True)  # left by an interrupted earlier attempt
    log.info(
        "generating ALFWorld games %d..%d (seed %d) for split %r into %s (first use, ~1 s per game)",
        start,
        stop - 1,
        seed,
        split,
        data_path,
    )
    t0 = time.perf_counter()
    env = dict(os.environ)  # the child must import this spear_lit, installed or not
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[3]), env.get("PYTHONPATH")])
    )
    proc = subprocess.run(
        [python, "-c", _GENERATE, str(partial), str(seed), split, str(start), str(stop)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"generating ALFWorld games failed (does {python} have the `alfworld` extra?):\n"
            + "\n".join(proc.stderr.strip().splitlines()[-5:])
        )
    (partial / split).rename(data_path / split)
    shutil.rmtree(partial, ignore_errors=True)
    log.info("wrote %d ALFWorld games in %.1f s", stop - start, time.perf_counter() - t0)


def generated_env(
    *, split: str, data_path: str, games: dict, seed: int = 0, python: str | None = None, **env_kwargs
) -> AlfWorldEnv:
    """An :class:`AlfWorldEnv` on generated games of ``split`` (generated into ``data_path`` on first use).

    Args:
        split: the split asked for by the agent (``train``, ``valid_seen``, ...).
        data_path: cache root (``~`` and ``$VARS`` expanded).
        games: per split, the ``[start, stop)`` range of game indices (e.g. ``{train: [0, 48],
            valid_seen: [48, 64]}``: disjoint ranges, disjoint games).
        seed: the generator's seed.
        python: interpreter with the ``alfworld`` extra, for generation and the engine workers.
        env_kwargs: the rest of :class:`AlfWorldEnv`'s arguments (``max_steps``, ``reward_scale``, ...).
    """
    if split not in games:
        raise KeyError(f"no game range for split {split!r}; configured: {sorted(games)}")
    start, stop = games[split]
    path = ensure_games(data_path, split, seed=seed, start=int(start), stop=int(stop), python=python)
    return AlfWorldEnv(data_path=path, split=split, python=python, **env_kwargs)
