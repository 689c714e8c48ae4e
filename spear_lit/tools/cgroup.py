"""Per-sandbox control groups: one memory cap for everything a sandbox holds, its tmpfs pages included.

RLIMIT_AS caps one process; four children of 300 MiB each still hold 1.2 GiB together, and tmpfs pages
(``/tmp``, ``/dev/shm``) belong to no process at all. A memory cgroup charges both to the sandbox. The
trainer creates one cgroup per sandbox worker below its own cgroup and moves the worker in before the
worker forks anything (so every call process inherits it).

Two layouts are supported:

* cgroup v1 (one hierarchy per controller, e.g. ``/sys/fs/cgroup/memory``): ``memory`` (+ ``pids``
  where mounted) below the trainer's own cgroups. This is what a root container without systemd has.
* cgroup v2 (unified): a child of the trainer's cgroup, if that cgroup already delegates ``memory`` in
  ``cgroup.subtree_control`` or lets us enable it (the kernel refuses while the trainer's cgroup holds
  processes itself, unless it is the root cgroup).

Anything else (no write access, no memory controller) makes :func:`make_cgroup` return ``None``; the
sandbox worker then polls the resident memory of its processes plus its tmpfs usage instead (best
effort: a spike between two 10 ms polls is not seen; RLIMIT_AS and the tmpfs sizes still bound it).
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)


def _mounts() -> dict[str, str]:
    """controller name (or ``"unified"``) -> mount point, from /proc/self/mountinfo."""
    found: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        fstype, point = rfields[0], fields[4]
        if fstype == "cgroup2":
            found.setdefault("unified", point)
        elif fstype == "cgroup":
            for opt in rfields[2].split(","):
                if opt in ("memory", "pids"):
                    found.setdefault(opt, point)
    return found


def _own_paths() -> dict[str, str]:
    """controller (or ``"unified"``) -> this process's cgroup path, from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f.read().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else ["unified"]:
                paths[c] = path
    return paths


class Cgroup:
    """One sandbox's cgroup(s): create, cap, add a process, read the OOM-kill count, remove."""

    def __init__(self, dirs: dict[str, str], v2: bool):
        self.dirs, self.v2 = dirs, v2  # controller -> directory ("memory", optionally "pids")

    def add(self, pid: int) -> None:
        for d in self.dirs.values():
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(pid))

    def oom_kills(self) -> int:
        """How many processes the kernel killed for this cgroup's memory limit so far."""
        name = "memory.events" if self.v2 else "memory.oom_control"
        try:
            with open(os.path.join(self.dirs["memory"], name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove(self) -> None:
        """rmdir the cgroup(s); their processes must be dead (retries briefly while the kernel lets go)."""
        for d in set(self.dirs.values()):
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def make_cgroup(name: str, memory_bytes: int, max_pids: int) -> Cgroup | None:
    """A fresh cgroup capping memory (RAM + swap + tmpfs) at ``memory_bytes`` and tasks at ``max_pids``,
    or ``None`` where this process may not create one (see the module docstring)."""
    try:
        mounts, own = _mounts(), _own_paths()
        if "memory" in mounts and "memory" in own:
            return _make_v1(name, mounts, own, memory_bytes, max_pids)
        if "unified" in mounts and "unified" in own:
            return _make_v2(name, mounts["unified"], own["unified"], memory_bytes, max_pids)
    except OSError as e:
        log.debug("no sandbox cgroup: %s", e)
    return None


def _make_v1(name, mounts, own, memory_bytes, max_pids) -> Cgroup | None:
    dirs: dict[str, str] = {}
    try:
        for ctl in ("memory", "pids"):
            if ctl not in mounts or ctl not in own:
                continue
            d = os.path.join(mounts[ctl] + own[ctl], name)
            os.makedirs(d, exist_ok=True)
            dirs[ctl] = d
        mem = dirs["memory"]
        _write(os.path.join(mem, "memory.limit_in_bytes"), str(memory_bytes))
        if os.path.exists(os.path.join(mem, "memory.memsw.limit_in_bytes")):  # no escape into swap
            _write(os.path.join(mem, "memory.memsw.limit_in_bytes"), str(memory_bytes))
        if "pids" in dirs:
            _write(os.path.join(dirs["pids"], "pids.max"), str(max_pids))
        return Cgroup(dirs, v2=False)
    except OSError as e:
        log.debug("no v1 sandbox cgroup: %s", e)
        Cgroup(dirs, v2=False).remove()
        return None


def _make_v2(name, mount, own, memory_bytes, max_pids) -> Cgroup | None:
    parent = mount + own
    d = os.path.join(parent, name)
    try:
        with open(os.path.join(parent, "cgroup.subtree_control")) as f:
            enabled = f.read().split()
        if "memory" not in enabled:
            _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +pids")
        os.makedirs(d, exist_ok=True)
        _write(os.path.join(d, "memory.max"), str(memory_bytes))
        if os.path.exists(os.path.join(d, "memory.swap.max")):
            _write(os.path.join(d, "memory.swap.max"), "0")
        if os.path.exists(os.path.join(d, "pids.max")):
            _write(os.path.join(d, "pids.max"), str(max_pids))
        return Cgroup({"memory": d}, v2=True)
    except OSError as e:
        log.debug("no v2 sandbox cgroup: %s", e)
        Cgroup({"memory": d}, v2=True).remove()
        return None
