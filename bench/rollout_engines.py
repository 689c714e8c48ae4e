"""Benchmark: the default experiment's RL iteration with rollout=hf vs rollout=vllm_cpu, alternated A B A B.

    OMP_NUM_THREADS=1 python bench/rollout_engines.py --rounds 2 --iterations 6

Every run is a fresh ``train.py`` subprocess (an in-process vLLM engine changes its process for good:
thread binding, a process group), so the engines never share a process; runs alternate HF, vLLM, HF,
vLLM, ... so a change in machine load hits both. Per run: median over iterations 2..N (the first carries
the warm-up) of ``perf/iteration_s`` and ``perf/rollout_tokens_per_s`` (policy tokens generated per second
of rollout, tool rounds included) from ``metrics.csv``, and the wall time of the whole process (imports,
engine start, export). The table shows the medians over runs. Validation is off. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = {
    "hf": ["rollout=hf"],
    "vllm_cpu": ["rollout=vllm_cpu"],
    "vllm_cpu_compiled": ["rollout=vllm_cpu", "rollout.enforce_eager=false"],
}
COLUMNS = [
    ("perf/iteration_s", "s/iteration"),
    ("perf/rollout_s", "rollout s"),
    ("perf/rollout_tokens_per_s", "rollout tok/s"),
    ("rollout/success_rate", "success"),
]


def run(engine: str, iterations: int, extra: list[str]) -> dict:
    """One ``train.py`` process with ``engine``; medians over its iterations 2..N and its wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            sys.executable,
            str(REPO / "train.py"),
            *ENGINES[engine],
            f"iterations={iterations}",
            f"run_dir={tmp}",
            f"hydra.run.dir={tmp}/hydra",
            "~callbacks.validation",
            "export_hf=false",
            "trainer.logger=null",
            *extra,
        ]
        start = time.perf_counter()
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"{engine} failed:\n{proc.stderr[-3000:]}")
        rows = list(csv.DictReader(open(Path(tmp) / "metrics.csv")))[1:]
    out = {key: statistics.median(float(r[key]) for r in rows if r.get(key)) for key, _ in COLUMNS}
    out["wall_s"] = wall
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds (each engine runs this many times)")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm_cpu"], choices=list(ENGINES))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args()
    results: dict[str, list[dict]] = {e: [] for e in args.engines}
    for r in range(args.rounds):
        for e in args.engines:
            results[e].append(run(e, args.iterations, args.overrides))
            print(
                f"round {r + 1} {e}: {json.dumps({k: round(v, 3) for k, v in results[e][-1].items()})}",
                flush=True,
            )
    base = args.engines[0]
    base_s = statistics.median(x["perf/iteration_s"] for x in results[base])
    print(
        f"\nOMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs, "
        f"{args.rounds} runs per engine alternated, {args.iterations} iterations per run (medians)\n"
    )
    print(f"| engine | {' | '.join(h for _, h in COLUMNS)} | process wall s | s/iteration vs {base} |")
    print("|" + "---|" * (len(COLUMNS) + 3))
    for e, runs in results.items():
        meds = [statistics.median(x[k] for x in runs) for k, _ in COLUMNS]
        cells = [f"{m:.0f}" if m >= 1000 else f"{m:.3g}" for m in meds]
        wall = statistics.median(x["wall_s"] for x in runs)
        ratio = statistics.median(x["perf/iteration_s"] for x in runs) / base_s
        print(f"| {e} | {' | '.join(cells)} | {wall:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
