"""The code interpreter without bubblewrap: observation format (SPEAR_SPEC §9), config errors, the
opt-in unsafe backend."""

import os
import sys
import time

import pytest

from spear_lit.tools import CodeInterpreter, ExecResult
from spear_lit.tools.code_interpreter import NO_OUTPUT_NOTICE, truncate_middle
from spear_lit.tools.sandbox import _CappedBuffer


@pytest.fixture(scope="module")
def unsafe():
    with CodeInterpreter("unsafe", python=sys.executable, timeout_s=1.0, max_output_chars=100) as ci:
        yield ci


def _res(stdout="", stderr="", exit_code=0, timed_out=False, error=None):
    return ExecResult(stdout, stderr, exit_code, timed_out, error)


def test_truncate_middle_keeps_head_and_tail_within_limit():
    text = "".join(f"{i:04d}" for i in range(1000))  # 4000 chars: "0000000100020003...0999"
    out = truncate_middle(text, 200)
    assert len(out) <= 200
    assert out.startswith("0000000100020003") and out.endswith("099709980999")
    # keep = 200 - 48 = 152 chars, so 4000 - 152 = 3848 are cut
    assert "...[3848 characters truncated]..." in out
    assert truncate_middle("short", 200) == "short"


def test_capped_buffer_keeps_head_and_tail_and_counts_the_gap():
    buf = _CappedBuffer(8)  # keeps 4 head + 4 tail bytes
    for chunk in (b"abc", b"defgh", b"ijklmnop", b"qrstuvwxyz"):
        buf.add(chunk)
    # 26 letters: head "abcd", tail "wxyz", 18 dropped
    assert buf.value() == b"abcd\n...[18 bytes of output dropped]...\nwxyz"


def test_observation_rules(unsafe):
    fmt = unsafe.format_observation
    assert fmt(_res(stdout="  42\n\n")) == "42"  # stdout stripped
    assert fmt(_res(stdout="\n")) == NO_OUTPUT_NOTICE  # empty stdout -> print notice
    tb = 'Traceback (most recent call last):\n  File "<code>", line 2, in <module>\n    1/0\nZeroDivisionError: division by zero\n'
    assert fmt(_res(stdout="partial\n", stderr=tb, exit_code=1)) == (
        "partial\n    1/0\nZeroDivisionError: division by zero\nError: the code failed (exit status 1)."
    )
    assert (
        fmt(_res(timed_out=True, exit_code=None)) == "Error: execution timed out after 1 s and was stopped."
    )
    assert fmt(_res(exit_code=-24)) == "Error: the code exceeded the CPU-time limit (5 s) and was killed."
    assert fmt(_res(exit_code=-9)) == "Error: the code was killed by SIGKILL."
    assert fmt(_res(exit_code=None, error="bwrap: boom")) == "Error: the code could not be run: bwrap: boom"
    # Long output is cut in the middle; the notice after it survives.
    long = fmt(_res(stdout="a" * 500 + "b" * 500, stderr="E\n", exit_code=2))
    body, notice = long.rsplit("\n", 1)
    assert len(body) <= 100 and body.startswith("aaa") and body.endswith("bbb\nE")
    assert notice == "Error: the code failed (exit status 2)."


def test_unknown_backend_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: bwrap, unsafe"):
        CodeInterpreter("docker")


def test_missing_bwrap_says_how_to_install_or_opt_out(tmp_path):
    with pytest.raises(RuntimeError) as info:
        CodeInterpreter("bwrap", bwrap=str(tmp_path / "no-such-bwrap"))
    msg = str(info.value)
    assert "apt-get install -y bubblewrap" in msg and "make setup" in msg and "tool.backend=unsafe" in msg


def test_unsafe_backend_runs_code_in_a_temporary_dir(unsafe, monkeypatch):
    monkeypatch.setenv("SPEAR_TEST_SECRET", "hunter2")
    r = unsafe.execute("import os; print(os.getcwd()); print(os.environ.get('SPEAR_TEST_SECRET'))")
    cwd, secret = r.stdout.split()
    assert r.exit_code == 0 and secret == "None"  # no environment leaks
    assert os.path.basename(cwd).startswith("spear-code-") and not os.path.exists(cwd)  # cleaned up
    assert unsafe(["print(6 * 7)", "raise KeyError('k')"]) == [
        "42",
        "    raise KeyError('k')\nKeyError: 'k'\nError: the code failed (exit status 1).",
    ]


def test_unsafe_backend_still_has_the_wall_timeout(unsafe):
    t0 = time.monotonic()
    r = unsafe.execute(
        "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'while True: pass'])\nwhile True: pass"
    )
    assert r.timed_out and r.exit_code is None
    # the program and its child loop forever; 30 s is 30x the 1 s time-out, so load alone cannot cross it
    assert time.monotonic() - t0 < 30
