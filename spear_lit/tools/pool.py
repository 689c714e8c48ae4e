"""A pool of long-lived bubblewrap sandboxes, each serving one call at a time in a fresh child.

Starting a sandbox (bwrap namespaces + a Python interpreter) costs tens of milliseconds; forking a call
from an already running, pristine worker inside it costs about one. Isolation is that of the one-shot
sandbox (:func:`spear_lit.tools.sandbox.bwrap_command`: all namespaces, no network, read-only system,
uid 65534, rlimits) plus what a persistent worker needs so that no call can reach the next
(:mod:`spear_lit.tools.sandbox_worker`): the worker is the sandbox's PID 1 and not dumpable, each call
runs under a seccomp filter, and after each call every other process of the sandbox is killed and
reaped and its tmpfs mounts are wiped. A cgroup per sandbox (:mod:`spear_lit.tools.cgroup`) caps the
memory of everything it holds, tmpfs included.

A worker is retired (killed; a fresh one is started when next needed) after any call that hit a limit,
left something it could not clean, or broke the protocol; a worker that dies mid-call answers that call
with an infrastructure error and is replaced, so a batch always gets one answer per call.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import select
import signal
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from spear_lit.tools.cgroup import Cgroup, make_cgroup
from spear_lit.tools.sandbox import (
    MIN_PATH,
    PYTHON_FLAGS,
    SANDBOX_UID,
    WORK_DIR,
    ExecResult,
    Limits,
    bwrap_base,
    shielded_spawn,
)

log = logging.getLogger(__name__)
WORKER_SRC = (Path(__file__).parent / "sandbox_worker.py").read_text()
GRACE_S = 5.0  # beyond the call's wall limit the host waits this long for the worker before killing it
START_TIMEOUT_S = 20.0
_names = itertools.count()


# fmt: off
def worker_command(bwrap: str, python: str, limits: Limits, worker_args: dict,
                   extra_ro_binds: tuple[str, ...] = ()) -> list[str]:
    """bubblewrap running :mod:`~spear_lit.tools.sandbox_worker` as the sandbox's PID 1."""
    tmpfs = str(limits.tmpfs_mb << 20)
    cmd = bwrap_base(bwrap, extra_ro_binds, as_pid_1=True)
    cmd += [
        "--proc", "/proc", "--dev", "/dev",
        "--size", tmpfs, "--tmpfs", "/dev/shm",  # bwrap's /dev is an uncapped tmpfs: cap shm, freeze the rest
        "--remount-ro", "/dev",
        "--size", tmpfs, "--tmpfs", "/tmp",
        "--size", tmpfs, "--tmpfs", WORK_DIR, "--chdir", WORK_DIR,
        "--remount-ro", "/",
        python, *PYTHON_FLAGS, "-c", WORKER_SRC, json.dumps(worker_args),
    ]
    return cmd
# fmt: on


def _write_frame(fd: int, payload: bytes) -> None:
    data = memoryview(struct.pack(">I", len(payload)) + payload)
    while data:
        data = data[os.write(fd, data) :]


def _read_exact(fd: int, n: int, deadline: float) -> bytes | None:
    """``n`` bytes from ``fd``; None at EOF; TimeoutError past ``deadline``."""
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _read_frame(fd: int, deadline: float, max_len: int) -> bytes | None:
    head = _read_exact(fd, 4, deadline)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    if n > max_len:
        raise ValueError(f"sandbox worker sent a {n}-byte frame (at most {max_len} expected)")
    return _read_exact(fd, n, deadline)


class Worker:
    """One running sandbox: the outer bwrap process, the worker's host pid, its cgroup and pipes."""

    def __init__(self, cmd: list[str], cgroup: Cgroup | None):
        self.cgroup = cgroup
        kwargs = dict(user=SANDBOX_UID, group=SANDBOX_UID, extra_groups=[]) if os.geteuid() == 0 else {}
        with shielded_spawn():  # the job's SIGTERM must not kill a sandbox mid-rollout (see sandbox.py)
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={"PATH": MIN_PATH}, start_new_session=True, close_fds=True, **kwargs,
            )  # fmt: skip
        self.pid: int | None = None
        self._pidfd: int | None = None
        self.calls = 0
        try:
            self._start()
        except BaseException:
            self.kill()
            raise

    def _start(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.pid is None:  # the sandbox's PID 1 is the outer bwrap's only child
            try:
                with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                    kids = f.read().split()
            except OSError:
                kids = []
            if kids:
                self.pid = int(kids[0])
                self._pidfd = os.pidfd_open(self.pid)  # signals through it can never hit a reused pid
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bubblewrap did not start the sandbox: {self._stderr()}")
            else:
                time.sleep(0.0005)
        if self.cgroup is not None:
            self.cgroup.add(self.pid)  # before "go": every call process inherits the cgroup
        _write_frame(self.proc.stdin.fileno(), b"go")
        try:
            ready = _read_frame(self.proc.stdout.fileno(), deadline, 1 << 16)
        except TimeoutError:
            ready = None
        if ready is None or not json.loads(ready).get("ready"):
            raise RuntimeError(f"the sandbox worker did not start: {self._stderr()}")
        self.seccomp = json.loads(ready)["seccomp"]

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            self.kill()
        fd = self.proc.stderr.fileno()
        os.set_blocking(fd, False)
        try:
            return (
                os.read(fd, 4096).decode("utf-8", "replace").strip() or f"exit status {self.proc.returncode}"
            )
        except OSError:
            return f"exit status {self.proc.returncode}"

    def call(self, code: str, limits: Limits) -> tuple[ExecResult, bool]:
        """Run ``code``; returns the result and whether this worker may serve another call."""
        start = time.monotonic()
        oom0 = self.cgroup.oom_kills() if self.cgroup else 0
        self.calls += 1
        try:
            _write_frame(self.proc.stdin.fileno(), code.encode("utf-8", "replace"))
            frame = _read_frame(
                self.proc.stdout.fileno(), start + limits.timeout_s + GRACE_S, 2 * limits.capture_bytes + 4096
            )
        except TimeoutError:
            return ExecResult("", "", None, True, "the sandbox worker did not answer", time.monotonic() - start,
                              limit="wall"), False  # fmt: skip
        except (OSError, ValueError) as e:
            frame, why = None, f"{type(e).__name__}: {e}"
        else:
            why = "it exited"
        if frame is None:
            return ExecResult("", "", None, False, f"the sandbox worker died during the call ({why})",
                              time.monotonic() - start), False  # fmt: skip
        head, _, body = frame.partition(b"\n")
        h = json.loads(head)
        out, err = body[: h["out"]], body[h["out"] : h["out"] + h["err"]]
        limit, exit_code, error = h["limit"], h["exit"], None
        if self.cgroup and self.cgroup.oom_kills() > oom0:
            limit = "memory"
        if limit == "cpu":
            exit_code = -signal.SIGXCPU
        elif limit == "wall":
            exit_code = None
        if exit_code == 121 and b"could not confine the call" in err:
            error = err.decode("utf-8", "replace").strip()
        res = ExecResult(
            out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), exit_code, limit == "wall", error,
            time.monotonic() - start, limit=limit, cpu_s=h["cpu_s"],
        )  # fmt: skip
        return res, h["clean"] and limit is None and error is None

    def kill(self) -> None:
        """Kill the whole sandbox and reap it, leaving no zombie behind.

        SIGKILL goes to the sandbox's PID 1 only: the kernel takes every process of its namespace along,
        and the outer bwrap reaps it and exits. Killing bwrap first would orphan the worker: a zombie for
        the host's PID 1, which in a container whose PID 1 is the trainer is never reaped.
        """
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(self._pidfd)
            self._pidfd = None
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f and not f.closed:
                f.close()
        if self.cgroup is not None:
            self.cgroup.remove()


class SandboxPool:
    """Up to ``size`` sandbox workers, each serving one call at a time; thread-safe.

    Args:
        bwrap, python, limits, extra_ro_binds: as for :class:`~spear_lit.tools.CodeInterpreter`.
        size: workers (and calls in flight) at most.
        use_cgroup: cap each sandbox's total memory with a cgroup where the trainer may create one.
    """

    def __init__(self, bwrap: str, python: str, limits: Limits, size: int,
                 extra_ro_binds: tuple[str, ...] = (), use_cgroup: bool = True):  # fmt: skip
        self.limits, self.size, self.use_cgroup = limits, size, use_cgroup
        self._bwrap, self._python, self._binds = bwrap, python, tuple(extra_ro_binds)
        self._idle: list[Worker] = []
        self._busy: set[Worker] = set()
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._closed = False
        # Workers run under --die-with-parent, which tracks the *thread* that spawned them: spawn all of
        # them from one thread that lives as long as the pool.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")
        self.has_cgroup: bool | None = None

    def _spawn(self) -> Worker:
        cgroup = None
        if self.use_cgroup:
            name = f"spear-sandbox-{os.getpid()}-{next(_names)}"
            cgroup = make_cgroup(name, self.limits.memory_mb << 20, self.limits.max_procs + 4)
        if self.has_cgroup is None:
            self.has_cgroup = cgroup is not None
            if cgroup is None:
                log.warning("no cgroup for the sandbox: its total memory is polled, not capped by the kernel")
        args = dict(
            cpu_s=self.limits.cpu_s, memory_mb=self.limits.memory_mb, file_size_mb=self.limits.file_size_mb,
            max_procs=self.limits.max_procs, max_open_files=self.limits.max_open_files,
            capture_bytes=self.limits.capture_bytes, timeout_s=self.limits.timeout_s,
            cgroup=cgroup is not None, seccomp=True,
        )  # fmt: skip
        cmd = worker_command(self._bwrap, self._python, self.limits, args, self._binds)
        try:
            return Worker(cmd, cgroup)
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            raise

    def run(self, code: str) -> ExecResult:
        """Run one program in a fresh child of an idle worker. Never raises for the program's behaviour."""
        start = time.monotonic()
        with self._slots:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the sandbox pool is closed")
                worker = self._idle.pop() if self._idle else None
            if worker is None:
                try:
                    worker = self._spawner.submit(self._spawn).result()
                except Exception as e:  # noqa: BLE001 - reported as an infrastructure error
                    return ExecResult(
                        "", "", None, False, f"could not start a sandbox: {e}", time.monotonic() - start
                    )
            with self._lock:
                self._busy.add(worker)
            keep = False
            try:
                result, keep = worker.call(code, self.limits)
            finally:
                with self._lock:
                    self._busy.discard(worker)
                    if keep and not self._closed:
                        self._idle.append(worker)
                    else:
                        keep = False
                if not keep:
                    worker.kill()
        return result

    def worker_pids(self) -> list[int]:
        """Host pids of the running workers (each its sandbox's PID 1), idle and busy."""
        with self._lock:
            return [w.pid for w in [*self._idle, *self._busy] if w.pid is not None]

    def close(self) -> None:
        """Kill every worker; calls in flight get an error answer."""
        with self._lock:
            self._closed = True
            workers, self._idle = [*self._idle, *self._busy], []
        for w in workers:
            w.kill()
        self._spawner.shutdown(wait=True)
