"""``keep_freed_memory`` (called by train() at start-up): a training step's multi-MiB activations, freed and
allocated again every micro-batch, are reused instead of being handed back to the OS and page-faulted in
again. Counted as minor page faults per step, in a fresh process each (glibc's settings are process-wide)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import subprocess_env

STEP = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from spear_lit.training.host_memory import keep_freed_memory
    assert keep_freed_memory()
def step():  # eight 8 MiB activations alive at once, then freed
    xs = [torch.ones(2 << 20) for _ in range(8)]
    return sum(float(x[0]) for x in xs)
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_step(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", STEP, mode], env=subprocess_env(), capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_freed_activations_are_reused_not_faulted_in_again():
    default, kept = _faults_per_step("default"), _faults_per_step("keep")
    assert default > 500  # measured ~1600 of the 16384 pages: glibc trims the freed heap top every step
    assert kept < 50  # measured 0
