"""Run one untrusted Python program in a child process and collect its bounded outcome.

This is the one-shot path: one new process (and, for bubblewrap, one new sandbox) per program. The
``code_interpreter``'s default ``bwrap`` backend instead serves calls from a pool of long-lived sandboxes
(:mod:`spear_lit.tools.pool`); this module's one-shot runner serves the ``unsafe`` backend and the
before/after benchmark (``bench/sandbox.py``), and defines the shared result and limit types.

Two launchers build the command line; one runner spawns it, feeds the code on stdin, captures
stdout/stderr with a byte cap, enforces the wall timeout and always kills what is left:

* :func:`bwrap_command` – bubblewrap: new user/pid/net/ipc/uts/mount namespaces (the net namespace has
  only its own loopback, so neither the internet nor the host's ``127.0.0.1`` services are reachable),
  a read-only ``/usr`` and nothing else of the host (no ``/etc``, ``/root``, ``/home``, project dir),
  size-capped tmpfs ``/tmp`` and work dir that vanish with the sandbox, a cleared environment.
* :func:`unsafe_command` – the same interpreter and limits without isolation (opt-in only).

Resource limits are set by :data:`PRELUDE` inside the sandboxed interpreter before a line of the
model's code runs. Why there and not in a ``preexec_fn``: ``preexec_fn`` is unsafe with the tool's
thread pool, and ``RLIMIT_NPROC`` set *after* bubblewrap created the user namespace is counted per
sandbox (the kernel keys process counts by user namespace and uid), so a fork bomb in one sandbox
cannot starve the other workers' sandboxes, which all run as uid 65534.
"""

from __future__ import annotations

import math
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

# SLURM (proctrack) and systemd deliver SIGTERM/SIGUSR1 to every process of a job, not only the trainer: a
# sandbox killed by it turns in-flight tool calls into errors before the trainer's Preemption callback
# checkpoints at the next step (the resumed run then differs). Sandboxes start with these signals blocked
# (the mask survives fork and exec); their owner stops them with SIGKILL, as SLURM does after KillWait.
SHIELDED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}


@contextmanager
def shielded_spawn():
    """Processes started inside inherit blocked job-control signals (this thread's mask is restored)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SHIELDED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


SANDBOX_UID = 65534  # "nobody": owns nothing on the host
WORK_DIR = "/workspace"  # the program's cwd and $HOME inside the bubblewrap sandbox
MIN_PATH = "/usr/local/bin:/usr/bin:/bin"
# -I: ignore PYTHON* variables and user site-packages; -B: no .pyc; no_debug_ranges: no "~~^~~" lines in
# tracebacks, so the last two stderr lines are the failing source line and the exception.
PYTHON_FLAGS = ("-I", "-B", "-X", "no_debug_ranges")

# Runs first in the sandboxed interpreter: argv = limits; the model's code arrives on stdin. It is run as
# ``__main__`` from "<code>" with its source registered for tracebacks, and the prelude's own frame is cut
# from the traceback the model sees.
PRELUDE = """\
import resource, sys
_cpu, _as, _fsize, _nproc, _nofile = map(int, sys.argv[1:6])
for _name, _soft, _hard in (("CPU", _cpu, _cpu + 1), ("AS", _as, _as), ("FSIZE", _fsize, _fsize),
                            ("NPROC", _nproc, _nproc), ("NOFILE", _nofile, _nofile), ("CORE", 0, 0)):
    resource.setrlimit(getattr(resource, "RLIMIT_" + _name), (_soft, _hard))
_src = sys.stdin.read()
sys.argv = ["<code>"]
sys.stdout.reconfigure(line_buffering=True)  # what was printed before a time-out still comes back
_main = sys.modules["__main__"] = type(sys)("__main__")
try:
    exec(compile(_src, "<code>", "exec"), _main.__dict__)
except SystemExit:
    raise
except BaseException as _e:
    _main.__dict__.clear()  # free what the code held (e.g. after a MemoryError) before importing more
    import linecache, traceback  # only now: importing them costs ~10 ms of every run's start-up
    linecache.cache["<code>"] = (len(_src), None, _src.splitlines(True), "<code>")
    traceback.print_exception(_e.with_traceback(_e.__traceback__.tb_next))
    sys.exit(1)
"""


@dataclass
class ExecResult:
    """Raw outcome of one program run.

    Attributes:
        stdout: captured standard output, decoded; beyond the capture cap its middle is replaced by a
            ``...[N bytes of output dropped]...`` line.
        stderr: captured standard error, same capping.
        exit_code: the program's exit status; negative ``-N`` if killed by signal ``N`` (e.g. ``-SIGXCPU``
            at the CPU-time limit); ``None`` if it timed out or never started.
        timed_out: the wall timeout expired and the whole sandbox was killed.
        error: a sandbox/infrastructure failure (not the program's fault), else ``None``.
        duration_s: wall-clock seconds from spawn to cleanup.
        limit: which limit stopped the program: ``"cpu"`` (its CPU-seconds budget), ``"memory"`` (the
            sandbox's total memory), ``"wall"`` (the wall-clock safety net), or ``None``.
        cpu_s: CPU seconds the program's processes used (pool backend; ``None`` if not measured).
    """

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    error: str | None
    duration_s: float = 0.0
    limit: str | None = None
    cpu_s: float | None = None


@dataclass(frozen=True)
class Limits:
    """Per-run resource limits (see :class:`~spear_lit.tools.code_interpreter.CodeInterpreter`)."""

    timeout_s: float = 30.0
    cpu_s: float = 5.0
    memory_mb: int = 512
    file_size_mb: int = 8
    max_procs: int = 32
    max_open_files: int = 256
    capture_bytes: int = 256 * 1024
    tmpfs_mb: int = 64

    def prelude_args(self) -> list[str]:
        """argv for :data:`PRELUDE`: CPU s, address space B, file size B, processes, open files."""
        mb = 1 << 20
        values = (
            math.ceil(self.cpu_s),
            self.memory_mb * mb,
            self.file_size_mb * mb,
            self.max_procs,
            self.max_open_files,
        )
        return [str(v) for v in values]


# fmt: off
def bwrap_base(bwrap: str, extra_ro_binds: tuple[str, ...] = (), *, as_pid_1: bool = False) -> list[str]:
    """What every sandbox shares: all namespaces, uid 65534, a clean environment, a read-only system.
    ``as_pid_1``: the sandboxed program is the namespace's init (the pool's long-lived worker)."""
    cmd = [
        bwrap,
        "--unshare-all", "--unshare-user", "--disable-userns",  # all namespaces; no nested user namespaces
        "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
        *(["--as-pid-1"] if as_pid_1 else []),  # init: immune to signals from the sandbox, reaper of orphans
        "--die-with-parent",  # the sandbox dies with the thread that spawned it
        "--new-session",  # no TIOCSTI into a controlling terminal
        "--clearenv", "--setenv", "PATH", MIN_PATH, "--setenv", "HOME", WORK_DIR,
        "--setenv", "PYTHONDONTWRITEBYTECODE", "1", "--setenv", "LANG", "C.UTF-8",
        "--ro-bind", "/usr", "/usr",
    ]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):  # merged-/usr symlinks, or dirs
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    for path in extra_ro_binds:
        cmd += ["--ro-bind", path, path]
    return cmd


def bwrap_command(bwrap: str, python: str, limits: Limits, extra_ro_binds: tuple[str, ...] = ()) -> list[str]:
    """The bubblewrap command line that runs :data:`PRELUDE` with ``python`` in a fresh sandbox."""
    tmpfs_bytes = str(limits.tmpfs_mb << 20)
    cmd = bwrap_base(bwrap, extra_ro_binds)
    cmd += [
        "--proc", "/proc", "--dev", "/dev",
        "--size", tmpfs_bytes, "--tmpfs", "/tmp",  # RAM-backed and capped: many small files can't fill a disk
        "--size", tmpfs_bytes, "--tmpfs", WORK_DIR, "--chdir", WORK_DIR,
        "--remount-ro", "/",  # the sandbox's own root (mount points) is read-only too
        python, *PYTHON_FLAGS, "-c", PRELUDE, *limits.prelude_args(),
    ]
    return cmd
# fmt: on


def unsafe_command(python: str, limits: Limits) -> list[str]:
    """The same interpreter, prelude and limits as a plain child process: no isolation at all."""
    return [python, *PYTHON_FLAGS, "-c", PRELUDE, *limits.prelude_args()]


def run(cmd: list[str], code: str, limits: Limits, *, sandboxed: bool) -> ExecResult:
    """Spawn ``cmd``, feed ``code`` on stdin, collect capped output until exit or ``limits.timeout_s``.

    With ``sandboxed`` the child (bubblewrap) runs as uid 65534 when we are root: bwrap's ``--uid`` alone
    only renames root inside the namespace. Without it the child gets a fresh temporary cwd that is
    deleted afterwards. Never raises for the program's behaviour; spawn failures become ``error``.
    """
    start = time.monotonic()
    deadline = start + limits.timeout_s
    env = {"PATH": MIN_PATH}
    kwargs: dict = {}
    work_dir = None
    if sandboxed:
        if os.geteuid() == 0:
            kwargs = dict(user=SANDBOX_UID, group=SANDBOX_UID, extra_groups=[])
    else:
        work_dir = tempfile.mkdtemp(prefix="spear-code-")
        env.update(HOME=work_dir, TMPDIR=work_dir, PYTHONDONTWRITEBYTECODE="1", LANG="C.UTF-8")
        kwargs = dict(cwd=work_dir)
    try:
        with shielded_spawn():
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
                close_fds=True,
                **kwargs,
            )
    except OSError as e:
        if work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
        return ExecResult("", "", None, False, f"could not start {cmd[0]}: {e}", time.monotonic() - start)
    try:
        out, err, timed_out = _communicate(
            proc, code.encode("utf-8", "replace"), deadline, limits.capture_bytes
        )
        timed_out = timed_out or not _wait_unreaped(proc.pid, deadline)
    finally:
        if sandboxed:
            _kill_sandbox(proc.pid)
        # Kill the process group while its leader is an unreaped zombie or alive (so the pgid cannot have
        # been reused): the unsafe backend's children, or a bwrap that outlived its sandbox.
        _kill_group(proc.pid)
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f and not f.closed:
                f.close()
        if work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    code_ = None if timed_out else _exit_code(proc.returncode, sandboxed)
    error = None
    if sandboxed and not timed_out and code_ != 0 and err.startswith(b"bwrap:"):
        error = err.decode("utf-8", "replace").strip()  # bubblewrap failed to build the sandbox
    return ExecResult(
        out.decode("utf-8", "replace"),
        err.decode("utf-8", "replace"),
        code_,
        timed_out,
        error,
        time.monotonic() - start,
    )


class _CappedBuffer:
    """Keeps the first and last ``cap // 2`` bytes of a stream and counts what fell in between."""

    def __init__(self, cap: int):
        self.half = max(cap // 2, 1)
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        room = self.half - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail += chunk
        if len(self.tail) > 2 * self.half:  # trim rarely: amortised O(1) per byte
            self.dropped += len(self.tail) - self.half
            del self.tail[: -self.half]

    def value(self) -> bytes:
        if len(self.tail) > self.half:
            self.dropped += len(self.tail) - self.half
            del self.tail[: -self.half]
        if not self.dropped:
            return bytes(self.head + self.tail)
        return (
            bytes(self.head)
            + f"\n...[{self.dropped} bytes of output dropped]...\n".encode()
            + bytes(self.tail)
        )


def _communicate(proc: subprocess.Popen, data: bytes, deadline: float, cap: int) -> tuple[bytes, bytes, bool]:
    """Write ``data`` to stdin and read both pipes until EOF or the deadline; memory stays O(cap)."""
    bufs = {proc.stdout.fileno(): _CappedBuffer(cap), proc.stderr.fileno(): _CappedBuffer(cap)}
    stdin_fd = proc.stdin.fileno()
    os.set_blocking(stdin_fd, False)  # partial writes instead of blocking on a full pipe
    pending = memoryview(data)
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        sel.register(stdin_fd, selectors.EVENT_WRITE)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bufs[proc.stdout.fileno()].value(), bufs[proc.stderr.fileno()].value(), True
            for key, _ in sel.select(remaining):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        pending = pending[os.write(fd, pending[:65536]) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(fd, 65536)
                if chunk:
                    bufs[fd].add(chunk)
                else:
                    sel.unregister(fd)
    return bufs[proc.stdout.fileno()].value(), bufs[proc.stderr.fileno()].value(), False


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait until ``pid`` exits (leaving it unreaped) or the deadline passes; True if it exited."""
    delay = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _kill_sandbox(bwrap_pid: int) -> None:
    """SIGKILL the sandbox's init (the outer bwrap's only child) and let bwrap reap it.

    The kernel then kills every process of the sandbox's pid namespace. Killing the outer bwrap instead
    would also work (--die-with-parent) but orphan the init: a zombie for the host's PID 1 to reap, which
    in a container whose PID 1 never reaps means one leaked zombie per time-out.
    """
    try:
        with open(f"/proc/{bwrap_pid}/task/{bwrap_pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:  # already gone
        return
    for child in children:
        try:
            pidfd = os.pidfd_open(child)
        except OSError:
            continue
        try:  # the pidfd pins the process, so checking its parent after opening makes the kill race-free
            with open(f"/proc/{child}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == bwrap_pid:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass
        finally:
            os.close(pidfd)
    _wait_unreaped(bwrap_pid, time.monotonic() + 1.0)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_code(returncode: int, sandboxed: bool) -> int:
    """Normalise to subprocess's convention: bwrap reports a child killed by signal N as 128 + N."""
    if sandboxed and 128 < returncode <= 128 + 64:
        return -(returncode - 128)
    return returncode
