"""Golden numbers: a seeded 3-iteration run of the default experiment (tiny_spear: the shipped tiny policy,
SPEAR, the sandboxed Python tool, 1 process, one torch thread) must reproduce the per-iteration metrics stored
in ``tests/golden/tiny_spear.json``.

A deliberate change of the numbers (algorithm, sampling, data, metric definitions) updates them with::

    SPEAR_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

and the diff of the JSON file goes into the commit that changed them, for review.

Compared: every metrics.csv column except ``perf/*`` (wall-clock timings) - which columns exist, and their
values. Counts and decisions (optimizer steps, buffer size, replays, filters, tool calls) must be equal;
other floats agree to rel 5e-4: the run is bit-for-bit repeatable on one machine, but fp32 sums (GEMM,
reductions) round differently on another CPU's kernels, and small quantities amplify it: on an AMD EPYC the file
written on another machine differed by up to 8.5e-5 relative (entropies of near-deterministic token
distributions, KL estimates near 0, a replay step's grad norm). Anything that changes a sampled token, a
reward or a decision moves these numbers by far more.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN, compose_cfg

from train import train

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_spear.json"
OVERRIDES = [*TINY_RUN, "+experiment=tiny_spear", "seed=0", "export_hf=false"]  # 3 iterations, 4 x 4 rollouts
EXACT = {
    "iteration",
    "optimizer_steps",
    "buffer/size",
    "buffer/replayed",
    "filter/groups_dropped",
    "filter/overlong",
    "filter/incomplete",
    "filter/repetitive",
    "filter/unreadable",
    "tool/calls",
}
# the HF engine's log-probs vs the trainer's on the same fp32 weights differ by fp32 rounding alone (~3e-7 per
# token): another CPU's kernels round them differently, so these compare to an absolute bound instead
ROUNDING = {"rollout/logp_mismatch_abs": 1e-6, "rollout/logp_mismatch_k3": 1e-12}


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    """metrics.csv rows without timings and empty cells."""
    with open(run_dir / "metrics.csv") as f:
        return [
            {k: float(v) for k, v in r.items() if v != "" and not k.startswith("perf/")}
            for r in csv.DictReader(f)
        ]


def _differences(got: list[dict], want: list[dict]) -> list[str]:
    if len(got) != len(want):
        return [f"{len(got)} iterations, golden {len(want)}"]
    out = []
    for g, w in zip(got, want):
        it = int(w["iteration"])
        if set(g) != set(w):
            out.append(f"iteration {it}: columns {sorted(set(g) ^ set(w))} added/missing")
        for k in sorted(set(g) & set(w)):
            a, b = g[k], w[k]
            same = (math.isnan(a) and math.isnan(b)) or (
                a == b if k in EXACT else a == pytest.approx(b, rel=5e-4, abs=ROUNDING.get(k, 1e-9))
            )
            if not same:
                out.append(f"iteration {it}: {k} = {a!r}, golden {b!r}")
    return out


@pytest.mark.sandbox
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (make sandbox)")
def test_tiny_spear_reproduces_its_golden_metrics(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order for every reduction
    try:
        train(compose_cfg(tmp_path, OVERRIDES))
    finally:
        torch.set_num_threads(threads)
    got = _metrics(tmp_path)
    assert len(got) == 3 and any(r.get("buffer/replayed", 0) > 0 for r in got)  # the run exercises replay
    if os.environ.get("SPEAR_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"overrides": OVERRIDES, "rows": got}, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"golden numbers written to {GOLDEN}: review and commit the diff")
    assert GOLDEN.exists(), (
        "no golden file: SPEAR_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py"
    )
    stored = json.loads(GOLDEN.read_text())
    assert stored["overrides"] == OVERRIDES, (
        "the run's overrides changed: regenerate (see the module docstring)"
    )
    diffs = _differences(got, stored["rows"])
    assert not diffs, (
        "metrics differ from tests/golden/tiny_spear.json (if intended, regenerate: "
        "SPEAR_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py):\n  " + "\n  ".join(diffs)
    )
