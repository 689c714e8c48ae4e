"""Benchmark: where an RL iteration's time goes, per engine, and SPEAR's overhead over Dr.BoT, side by side.

    OMP_NUM_THREADS=1 python bench/iteration_phases.py --rounds 2 --iterations 8 \
        --experiments tiny_spear tiny_drbot --engines hf vllm_cpu

Every run is a fresh ``train.py`` subprocess (an in-process vLLM engine changes its process for good); the
experiment × engine runs alternate within each round (A B C D, A B C D, ...) so a change in machine load
hits all of them. Per run: the median over iterations 2..N (the first carries the warm-up) of
``perf/iteration_s`` and of each phase of ``metrics.csv``'s breakdown (``callbacks/report.py`` PHASES:
generation, tool, scoring/filters, old log-probs, on-policy update, replay update, validation, other).
The tables show medians over runs. Validation is off. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from callbacks.report import PHASES  # noqa: E402


def run(experiment: str, engine: str, iterations: int, extra: list[str]) -> dict[str, float]:
    """One ``train.py`` process; medians over its iterations 2..N."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            sys.executable,
            str(REPO / "train.py"),
            f"+experiment={experiment}",
            f"rollout={engine}",
            f"iterations={iterations}",
            f"run_dir={tmp}",
            f"hydra.run.dir={tmp}/hydra",
            "~callbacks.validation",
            "export_hf=false",
            "trainer.logger=null",
            *extra,
        ]
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{experiment} / {engine} failed:\n{proc.stderr[-3000:]}")
        rows = list(csv.DictReader(open(Path(tmp) / "metrics.csv")))[1:]
    keys = ["perf/iteration_s", *PHASES, "buffer/replayed"]
    return {k: statistics.median(float(r[k] or 0) for r in rows) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--experiments", nargs="+", default=["tiny_spear", "tiny_drbot"])
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm_cpu"])
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args()
    cases = [(e, g) for g in args.engines for e in args.experiments]
    results: dict[tuple[str, str], list[dict]] = {c: [] for c in cases}
    for r in range(args.rounds):
        for c in cases:
            results[c].append(run(*c, args.iterations, args.overrides))
            print(f"round {r + 1} {c}: {results[c][-1]['perf/iteration_s']:.2f} s/iteration", flush=True)
    med = {c: {k: statistics.median(x[k] for x in runs) for k in runs[0]} for c, runs in results.items()}
    print(
        f"\nOMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs, "
        f"{args.rounds} runs per case alternated, {args.iterations} iterations per run (medians of "
        "iterations 2..N, then of runs; seconds)\n"
    )
    names = [p.removeprefix("perf/").removesuffix("_s") for p in PHASES]
    print(
        f"| experiment | engine | s/iteration | {' | '.join(names)} | s/iteration vs {args.experiments[-1]} |"
    )
    print("|" + "---|" * (len(PHASES) + 4))
    for (e, g), m in med.items():
        ratio = m["perf/iteration_s"] / med[(args.experiments[-1], g)]["perf/iteration_s"]
        cells = " | ".join(f"{m[p]:.2f}" for p in PHASES)
        print(f"| {e} | {g} | {m['perf/iteration_s']:.2f} | {cells} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
