"""``keep_freed_memory`` (called by train() at start-up): a training step's multi-MiB activations, once freed,
stay mapped to the process for the next micro-batch instead of being handed back to the OS (and page-faulted
in again). Measured as the resident set before and after freeing eight 8 MiB tensors, in a fresh process
each (glibc's settings are process-wide)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import subprocess_env

STEP = """
import os, sys, torch
if sys.argv[1] == "keep":
    from spear_lit.training.host_memory import keep_freed_memory
    assert keep_freed_memory()
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
xs = [torch.ones(2 << 20) for _ in range(8)]  # eight 8 MiB activations alive at once, touched
peak = rss_mib()
del xs
print(peak - rss_mib())  # MiB handed back to the OS when they were freed
"""


def _returned_mib(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", STEP, mode], env=subprocess_env(), capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_freed_activations_stay_mapped_for_reuse():
    assert _returned_mib("default") > 48  # measured 64: glibc unmaps blocks above its mmap threshold on free
    assert _returned_mib("keep") < 16  # measured 0: kept on the heap for the next micro-batch
