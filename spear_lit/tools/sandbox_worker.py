"""The long-lived worker that runs inside one bubblewrap sandbox (stand-alone: stdlib only, never imported
by the trainer; :mod:`spear_lit.tools.pool` passes this file's source to the sandbox's ``python -c``).

It is PID 1 of the sandbox's pid namespace (``bwrap --as-pid-1``), so

* no process of the sandbox can signal it (the kernel drops signals to a namespace's init from inside),
* every orphan of a call is re-parented to it and reaped here (no zombie ever reaches the host), and
* ``kill(-1, SIGKILL)`` from it kills every other process of the sandbox: the end of each call.

Protocol on stdin/stdout, each frame a 4-byte big-endian length + payload. The worker first waits for
one ``b"go"`` frame (the host moves it into its cgroup before it forks anything), answers ``READY``, then
serves requests: payload = the program's UTF-8 source; answer = one JSON header line
(``exit``, ``limit`` in {null, "wall", "cpu", "memory"}, ``out``/``err`` byte counts, ``cpu_s``,
``clean``) followed by the captured stdout and stderr bytes.

Each call runs in a fresh ``fork`` of this pristine process: rlimits, a seccomp filter (no ptrace,
process_vm_*, SysV IPC, POSIX mqueues, keyrings, bpf, perf, io_uring, setns/unshare), its own stdio pipes,
then ``exec`` of the code as ``__main__``. The worker never runs model code itself and is not dumpable,
so a call can neither ptrace nor write the worker's memory. After the call: kill all, reap all, wipe the
writable mounts, so nothing (files, modules, globals, processes, IPC objects) reaches the next call.
"""

import ctypes
import json
import linecache
import os
import resource
import select
import signal
import stat
import struct
import sys
import time
import traceback

WRITABLE = ("/tmp", "/workspace", "/dev/shm")
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 4, 38, 22
SECCOMP_MODE_FILTER = 2
POLL_S = 0.01  # CPU/memory accounting period while a call runs
_libc = ctypes.CDLL(None, use_errno=True)

# Syscalls a call may not make, per architecture: (AUDIT_ARCH, {name: nr}).
_DENY = {
    "x86_64": (
        0xC000003E,
        {
            "ptrace": 101,
            "process_vm_readv": 310,
            "process_vm_writev": 311,
            "kcmp": 312,
            "pidfd_getfd": 438,
            "shmget": 29,
            "shmat": 30,
            "shmctl": 31,
            "semget": 64,
            "msgget": 68,
            "mq_open": 240,
            "add_key": 248,
            "request_key": 249,
            "keyctl": 250,
            "perf_event_open": 298,
            "bpf": 321,
            "userfaultfd": 323,
            "io_uring_setup": 425,
            "setns": 308,
            "unshare": 272,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            "ptrace": 117,
            "process_vm_readv": 270,
            "process_vm_writev": 271,
            "kcmp": 272,
            "pidfd_getfd": 438,
            "shmget": 194,
            "shmat": 196,
            "shmctl": 195,
            "semget": 190,
            "msgget": 186,
            "mq_open": 180,
            "add_key": 217,
            "request_key": 218,
            "keyctl": 219,
            "perf_event_open": 241,
            "bpf": 280,
            "userfaultfd": 282,
            "io_uring_setup": 425,
            "setns": 268,
            "unshare": 97,
        },
    ),
}


def seccomp_program():
    """A classic-BPF seccomp filter: foreign ABIs are killed, denied syscalls fail with EPERM.

    Returns the ``struct sock_fprog`` (kept alive by the caller) or None on an unknown architecture.
    """
    machine = os.uname().machine
    if machine not in _DENY:
        return None
    arch, deny = _DENY[machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, kill, eperm = 0x7FFF0000, 0x80000000, 0x00050000 | 1
    nrs = sorted(set(deny.values()))
    # [0] load arch, [1] arch ok? skip kill, [2] kill, [3] load nr, [4] x32 ABI? -> eperm,
    # [5..5+n) nr == deny[i]? -> eperm, [5+n] allow, [6+n] eperm
    n = len(nrs)
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    prog.append((jge, n + 1, 0, 0x40000000) if machine == "x86_64" else (jeq, 0, 0, 0))  # x32 syscalls
    for i, nr in enumerate(nrs):
        prog.append((jeq, n - i, 0, nr))
    prog += [(ret, 0, 0, allow), (ret, 0, 0, eperm)]

    class Filter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_ushort),
            ("jt", ctypes.c_ubyte),
            ("jf", ctypes.c_ubyte),
            ("k", ctypes.c_uint),
        ]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    arr = (Filter * len(prog))(*[Filter(*ins) for ins in prog])
    fprog = Prog(len(prog), arr)
    fprog._keep = arr
    return fprog


def _prctl(option, arg):
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_frame(fd):
    head = read_exact(fd, 4)
    return None if head is None else read_exact(fd, struct.unpack(">I", head)[0])


def write_frame(fd, payload):
    data = memoryview(struct.pack(">I", len(payload)) + payload)
    while data:
        data = data[os.write(fd, data) :]


class Capped:
    """First and last ``cap // 2`` bytes of a stream and a count of what fell in between."""

    def __init__(self, cap):
        self.half, self.head, self.tail, self.dropped = max(cap // 2, 1), bytearray(), bytearray(), 0

    def add(self, chunk):
        room = self.half - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail += chunk
        if len(self.tail) > 2 * self.half:
            self.dropped += len(self.tail) - self.half
            del self.tail[: -self.half]

    def value(self):
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


def run_code(src):
    """The call's process (after fork): confine itself, run ``src`` as ``__main__``; never returns."""
    import io

    sys.argv = ["<code>"]
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", line_buffering=True)
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )
    main = sys.modules["__main__"] = type(sys)("__main__")
    status = 0
    try:
        exec(compile(src, "<code>", "exec"), main.__dict__)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException as e:
        main.__dict__.clear()  # free what the code held (e.g. after a MemoryError) before formatting
        linecache.cache["<code>"] = (len(src), None, src.splitlines(True), "<code>")
        traceback.print_exception(e.with_traceback(e.__traceback__.tb_next))  # cut this frame
        status = 1
    try:  # what a normal interpreter exit does: join threads, run atexit, flush
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        status = status or 120
    os._exit(status & 0xFF)


def start_call(src, limits, fprog):
    """Fork the call's process with its stdout/stderr pipes; returns (pid, out_fd, err_fd)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(out_w)
        os.close(err_w)
        return pid, out_r, err_r
    try:
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, 1 << 16)
        os.chdir("/workspace")
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _prctl(PR_SET_DUMPABLE, 1)  # inherited "not dumpable" would make its own /proc entries odd
        with open("/proc/self/oom_score_adj", "w") as f:  # the OOM killer takes the call, not the worker
            f.write("1000")
        mb = 1 << 20
        cpu_rl = int(limits["cpu_s"]) + 2  # per-process backstop; the per-call budget is polled
        for name, value in (
            ("CPU", cpu_rl),
            ("AS", limits["memory_mb"] * mb),
            ("FSIZE", limits["file_size_mb"] * mb),
            ("NPROC", limits["max_procs"]),
            ("NOFILE", limits["max_open_files"]),
            ("CORE", 0),
        ):
            hard = value + 1 if name == "CPU" else value
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, hard))
        if fprog is not None:
            _prctl(PR_SET_NO_NEW_PRIVS, 1)
            if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "seccomp")
    except BaseException as e:
        os.write(2, f"sandbox worker: could not confine the call: {e!r}\n".encode())
        os._exit(121)
    run_code(src)


def other_pids():
    me = os.getpid()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me]


def proc_usage(pids):
    """(CPU seconds incl. reaped descendants, resident bytes) of the live ``pids``."""
    ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    cpu = rss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            cpu += sum(int(x) for x in fields[11:15]) / ticks  # utime stime cutime cstime
            rss += int(fields[21]) * page
        except (OSError, ValueError, IndexError):
            pass
    return cpu, rss


def tmpfs_bytes():
    used = 0
    for path in WRITABLE:
        try:
            st = os.statvfs(path)
            used += (st.f_blocks - st.f_bfree) * st.f_frsize
        except OSError:
            pass
    return used


def reaped_cpu():
    t = os.times()
    return t.children_user + t.children_system


def kill_all():
    """SIGKILL every other process of the sandbox and reap them all; True if none is left."""
    for _ in range(100):
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reap()
        if not other_pids():
            return True
        time.sleep(0.001)
    return False


def reap(main_pid=None):
    """Reap every exited child (orphans included); the main call process's wait status if reaped."""
    status = None
    while True:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == 0:
            return status
        if pid == main_pid:
            status = st


def wipe(path):
    """Empty ``path`` (a tmpfs of this sandbox); True on success."""
    ok = True
    try:
        entries = os.listdir(path)
    except OSError:
        return False
    for name in entries:
        p = os.path.join(path, name)
        try:
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(p, 0o700)
                ok &= wipe(p)
                os.rmdir(p)
            else:
                os.unlink(p)
        except OSError:
            ok = False
    return ok


def serve_call(src, limits, fprog):
    """Run one call to completion or limit; returns (header dict, stdout bytes, stderr bytes)."""
    t0 = time.monotonic()
    cpu0 = reaped_cpu()
    pid, out_r, err_r = start_call(src, limits, fprog)
    bufs = {out_r: Capped(limits["capture_bytes"]), err_r: Capped(limits["capture_bytes"])}
    pidfd = os.pidfd_open(pid)
    open_fds = [out_r, err_r]
    status, limit, cpu_used = None, None, 0.0
    mem_cap = limits["memory_mb"] << 20
    next_poll = t0 + POLL_S
    while status is None:
        now = time.monotonic()
        if now >= t0 + limits["timeout_s"]:
            limit = "wall"
            break
        wait = max(0.0, min(next_poll, t0 + limits["timeout_s"]) - now)
        ready, _, _ = select.select(open_fds + [pidfd], [], [], wait)
        for fd in ready:
            if fd == pidfd:
                continue
            chunk = os.read(fd, 65536)
            if chunk:
                bufs[fd].add(chunk)
            else:
                open_fds.remove(fd)
        status = reap(pid)
        if status is None and time.monotonic() >= next_poll:
            next_poll = time.monotonic() + POLL_S
            cpu_live, rss = proc_usage(other_pids())
            cpu_used = cpu_live + reaped_cpu() - cpu0
            if cpu_used > limits["cpu_s"]:
                limit = "cpu"
                break
            if not limits["cgroup"] and rss + tmpfs_bytes() > mem_cap:  # best effort without a cgroup
                limit = "memory"
                break
    os.close(pidfd)
    clean = kill_all()
    if status is None:
        status = reap(pid)
    for fd in open_fds:  # every writer is dead now: read what is left up to EOF
        while chunk := os.read(fd, 65536):
            bufs[fd].add(chunk)
    os.close(out_r)
    os.close(err_r)
    cpu_used = max(cpu_used, reaped_cpu() - cpu0)
    for path in WRITABLE:
        clean &= wipe(path)
    exit_code = None
    if status is not None:
        exit_code = os.waitstatus_to_exitcode(status)
        if exit_code == -signal.SIGXCPU and limit is None:
            limit = "cpu"  # the per-process RLIMIT_CPU backstop fired first
        if exit_code == 121:
            clean = False
    header = {"exit": exit_code, "limit": limit, "cpu_s": round(cpu_used, 3), "clean": clean}
    return header, bufs[out_r].value(), bufs[err_r].value()


def main():
    limits = json.loads(sys.argv[1])
    _prctl(PR_SET_DUMPABLE, 0)  # no same-uid process may ptrace us or open /proc/1/mem
    fprog = seccomp_program() if limits["seccomp"] else None
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # the host went away: die
    if read_frame(0) != b"go":
        return
    write_frame(1, json.dumps({"ready": True, "seccomp": fprog is not None}).encode())
    while (src := read_frame(0)) is not None:
        header, out, err = serve_call(src.decode("utf-8", "replace"), limits, fprog)
        header.update(out=len(out), err=len(err))
        write_frame(1, json.dumps(header).encode() + b"\n" + out + err)


if __name__ == "__main__":
    main()
