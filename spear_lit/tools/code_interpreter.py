"""The ``code_interpreter`` tool: runs model-written Python in a sandbox, never in the trainer process.

Calls of a rollout batch run concurrently on a thread pool; with the default ``bwrap`` backend each
thread hands its call to one of ``num_workers`` long-lived sandboxes (:mod:`spear_lit.tools.pool`), which
runs it in a fresh child and cleans up everything after it. Each outcome becomes a tool message per
SPEAR_SPEC §9: stdout stripped; on error the last two stderr lines plus a short notice; empty stdout → a
notice to print the answer; a limit or failure → a notice; never longer than ``max_output_chars``.

Limits decide by CPU time, so the same seed gives the same run on a loaded machine: ``cpu_s`` is the
call's CPU-seconds budget (all its processes together); ``timeout_s`` is a wall-clock safety net for
programs that wait instead of compute (``sleep``, blocking reads) and should stay well above ``cpu_s``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

from spear_lit.tools.pool import SandboxPool
from spear_lit.tools.sandbox import ExecResult, Limits, run, unsafe_command

__all__ = ["CodeInterpreter", "ExecResult", "truncate_middle"]

log = logging.getLogger(__name__)

BACKENDS = ("bwrap", "unsafe")
NO_OUTPUT_NOTICE = "No output. Use print() to show the result."
MIN_TIMEOUT_S = 0.1


class CodeInterpreter:
    """A batched Python tool backed by a bubblewrap sandbox (or, if explicitly chosen, none).

    Args:
        backend: ``"bwrap"`` (isolated: namespaces, no network, read-only system, private /tmp and work
            dir, uid 65534) or ``"unsafe"`` (plain child process with the same rlimits and no isolation;
            only for machines where bubblewrap cannot run, and it logs a warning).
        timeout_s: wall-clock safety net per program, in seconds: it only stops programs that wait rather
            than compute, so keep it well above ``cpu_s`` (a wall limit decides differently under load).
        cpu_s: the program's CPU-time budget in seconds, all its processes together (``bwrap``: polled
            every 10 ms, plus RLIMIT_CPU per process; ``unsafe``: RLIMIT_CPU per process only).
        memory_mb: memory limit in MiB: per process (RLIMIT_AS: larger allocations raise MemoryError) and,
            with ``bwrap``, for the whole sandbox including its tmpfs files (a cgroup where the trainer
            may create one, else polled).
        file_size_mb: largest file a process may write (RLIMIT_FSIZE), in MiB.
        max_procs: processes and threads the sandbox may hold at once (RLIMIT_NPROC, counted per sandbox).
        max_output_chars: the observation's length limit; longer text loses its middle.
        num_workers: programs run at once by :meth:`execute_batch`.
        python: interpreter inside the sandbox. It must be usable by uid 65534 (root's pyenv/venv is not:
            its home is 0700), hence Debian's ``/usr/bin/python3``.
        bwrap: path of the bubblewrap binary.
        tmpfs_mb: size of each of the sandbox's private ``/tmp`` and work dir, in MiB (RAM-backed).
        capture_kb: at most this much of each of stdout/stderr is kept (head and tail halves), in KiB.
        extra_ro_binds: host paths made visible read-only at the same place, e.g. a world-readable venv
            with sympy for ``python``. Never bind the project or a home directory.
        cgroup: with ``bwrap``, cap each sandbox's total memory with a cgroup where possible.
    """

    name = "code_interpreter"

    def __init__(
        self,
        backend: str = "bwrap",
        *,
        timeout_s: float = 30.0,
        cpu_s: float = 5.0,
        memory_mb: int = 512,
        file_size_mb: int = 8,
        max_procs: int = 32,
        max_output_chars: int = 1024,
        num_workers: int = 4,
        python: str = "/usr/bin/python3",
        bwrap: str = "/usr/bin/bwrap",
        tmpfs_mb: int = 64,
        capture_kb: int = 256,
        extra_ro_binds: tuple[str, ...] | list[str] = (),
        cgroup: bool = True,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown code_interpreter backend {backend!r}; allowed: {', '.join(BACKENDS)}")
        if max_output_chars < 64:
            raise ValueError(f"max_output_chars must be >= 64, got {max_output_chars}")
        if min(timeout_s, cpu_s, memory_mb, file_size_mb, max_procs, num_workers, tmpfs_mb, capture_kb) <= 0:
            raise ValueError("timeouts, limits, sizes and num_workers must be positive")
        if timeout_s < MIN_TIMEOUT_S:
            raise ValueError(
                f"code_interpreter timeout_s={timeout_s:g} (tool.timeout_s) is too short for any program: starting "
                f"one takes milliseconds, more on a loaded machine; it must be >= {MIN_TIMEOUT_S:g} s. The "
                f"per-call limit is cpu_s (tool.cpu_s, CPU seconds, now {cpu_s:g}); timeout_s is only a "
                "wall-clock safety net (default 30)."
            )
        if timeout_s < cpu_s:
            log.warning(
                "code_interpreter timeout_s=%g < cpu_s=%g: the wall clock, not CPU time, decides when a "
                "program is stopped, so results depend on machine load",
                timeout_s,
                cpu_s,
            )
        self.backend, self.max_output_chars = backend, max_output_chars
        self.limits = Limits(
            timeout_s=timeout_s,
            cpu_s=cpu_s,
            memory_mb=memory_mb,
            file_size_mb=file_size_mb,
            max_procs=max_procs,
            capture_bytes=capture_kb * 1024,
            tmpfs_mb=tmpfs_mb,
        )
        self._sandboxes: SandboxPool | None = None
        self._pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="code-interpreter")
        self._stats_lock = threading.Lock()
        self._calls = self._errors = 0
        if backend == "bwrap":
            if not (os.path.isfile(bwrap) and os.access(bwrap, os.X_OK)):
                self.close()
                raise RuntimeError(
                    f"bubblewrap not found at {bwrap}: the code interpreter needs it to run model-written code "
                    "safely. Install it with `apt-get install -y bubblewrap` (or `make setup`), or explicitly "
                    "run without isolation with `tool.backend=unsafe`."
                )
            self._sandboxes = SandboxPool(
                bwrap, python, self.limits, num_workers, tuple(extra_ro_binds), cgroup
            )
            self._self_check()
        else:
            log.warning(
                "code_interpreter backend 'unsafe': model-written code runs WITHOUT a sandbox (same "
                "user, full filesystem and network access; only rlimits and a timeout apply). Use "
                "backend 'bwrap' for anything but trusted debugging."
            )
            self._cmd = unsafe_command(python, self.limits)

    def _self_check(self) -> None:
        """Fail at construction, not silently on every call, if bwrap cannot build a sandbox here."""
        res = self.execute("print('ok')")
        self.pop_stats()
        if res.error is None and res.limit == "wall":
            self.close()
            raise RuntimeError(
                f"code_interpreter timeout_s={self.limits.timeout_s:g} (tool.timeout_s) is too short: the sandbox "
                "started, but even print('ok') did not finish within it. timeout_s is a wall-clock safety net; "
                "the per-call limit is cpu_s (CPU seconds). Use e.g. timeout_s=30."
            )
        if res.error or res.stdout.strip() != "ok":
            self.close()
            raise RuntimeError(
                "bubblewrap is installed but could not run a sandboxed program "
                f"(exit {res.exit_code}, timed out: {res.timed_out}): {res.error or res.stderr.strip()!r}. "
                "Check that the sandbox python exists and that unprivileged user namespaces are allowed "
                "(Ubuntu 24.04+: sysctl kernel.apparmor_restrict_unprivileged_userns=0)."
            )

    def execute(self, code: str) -> ExecResult:
        """Run one program in a fresh sandboxed child and return its raw, capped outcome. Never raises."""
        try:
            if self._sandboxes is not None:
                res = self._sandboxes.run(code)
            else:
                res = run(self._cmd, code, self.limits, sandboxed=False)
        except Exception as e:  # the trainer must survive any tool failure
            log.exception("code_interpreter failed")
            res = ExecResult("", "", None, False, f"{type(e).__name__}: {e}")
        with self._stats_lock:
            self._calls += 1
            self._errors += res.error is not None
        return res

    def pop_stats(self) -> dict[str, int]:
        """Calls run and infrastructure errors since the last ``pop_stats`` (then both restart at 0).

        Returns ``{"calls": int, "errors": int}``. An error is a failure of the sandbox itself (could not
        start, worker died or hung, could not confine the call), never the model's code raising, timing
        out or hitting a limit: those are ordinary observations.
        """
        with self._stats_lock:
            stats = {"calls": self._calls, "errors": self._errors}
            self._calls = self._errors = 0
        return stats

    def execute_batch(self, codes: list[str]) -> list[ExecResult]:
        """Run programs concurrently (``num_workers`` at a time); results in input order."""
        return list(self._pool.map(self.execute, codes))

    def format_observation(self, result: ExecResult) -> str:
        """The tool message for one outcome (SPEAR_SPEC §9); notices are never truncated away."""
        if result.error is not None:
            return f"Error: the code could not be run: {self._clip(result.error, 200)}"
        stdout = result.stdout.strip()
        if result.timed_out:
            notice = f"Error: execution timed out after {self.limits.timeout_s:g} s and was stopped."
            return self._with_notice(stdout, notice)
        if result.limit == "memory":
            notice = (
                f"Error: the code exceeded the memory limit ({self.limits.memory_mb} MiB) and was killed."
            )
            return self._with_notice(stdout, notice)
        if result.exit_code != 0:
            stderr_tail = "\n".join(result.stderr.strip().splitlines()[-2:])
            return self._with_notice("\n".join(s for s in (stdout, stderr_tail) if s), self._failure(result))
        return truncate_middle(stdout, self.max_output_chars) if stdout else NO_OUTPUT_NOTICE

    def __call__(self, codes: list[str]) -> list[str]:
        """Run a batch of programs and return one observation text per program."""
        return [self.format_observation(r) for r in self.execute_batch(codes)]

    def close(self) -> None:
        """Wait for running programs, stop the worker threads and the sandboxes."""
        self._pool.shutdown(wait=True)
        if self._sandboxes is not None:
            self._sandboxes.close()

    def __enter__(self) -> CodeInterpreter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _failure(self, result: ExecResult) -> str:
        code = result.exit_code
        if code is not None and code < 0:
            sig = -code
            if sig == signal.SIGXCPU:
                return (
                    f"Error: the code exceeded the CPU-time limit ({self.limits.cpu_s:g} s) and was killed."
                )
            if sig == signal.SIGXFSZ:
                return f"Error: the code exceeded the file-size limit ({self.limits.file_size_mb} MiB) and was killed."
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            return f"Error: the code was killed by {name}."
        return f"Error: the code failed (exit status {code})."

    def _with_notice(self, body: str, notice: str) -> str:
        """``body`` cut to leave room for the notice: the whole observation fits ``max_output_chars``."""
        room = self.max_output_chars - len(notice) - 1
        return f"{truncate_middle(body, room)}\n{notice}" if body and room > 0 else notice

    @staticmethod
    def _clip(text: str, limit: int) -> str:
        return truncate_middle(text.strip(), limit)


def truncate_middle(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else its head and tail around a marker, total <= limit."""
    if len(text) <= limit:
        return text
    keep = max(limit - 48, 0)  # 48 chars hold the marker for any realistic count
    head = keep // 2
    tail = keep - head
    marker = f"\n...[{len(text) - keep} characters truncated]...\n"
    return text[:head] + marker + (text[-tail:] if tail else "")
