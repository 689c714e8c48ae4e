"""Benchmark: iteration time and throughput of SPEAR vs its baselines on the tiny task, side by side.

    python bench/iteration_time.py --iterations 12 --rounds 2 --experiments tiny_spear tiny_grpo tiny_drbot

Runs each experiment in this process, one after another, ``--rounds`` times in alternation (A B C, A B C:
the same machine load for all, and no experiment always goes first: the first run in a process was
measured up to 1.6x slower in its rollouts over all its iterations), and prints a table of medians over
the iterations of all rounds (each run's first iteration is dropped as warm-up). Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train import train  # noqa: E402

COLUMNS = [
    ("perf/iteration_s", "s/iter"),
    ("perf/rollout_tokens_per_s", "rollout tok/s"),
    ("perf/train_tokens_per_s", "train tok/s"),
    ("perf/rollout_s", "rollout s"),
    ("rollout/success_rate", "success"),
    ("buffer/replayed", "replayed rows"),
]


def run(experiment: str, iterations: int, extra: list[str]) -> list[dict]:
    """Train ``experiment`` for ``iterations`` and return its per-iteration rows."""
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"+experiment={experiment}",
                f"iterations={iterations}",
                f"run_dir={tmp}",
                "~callbacks.validation",
                "export_hf=false",
                "trainer.logger=null",
                *extra,
            ],
        )
        _, objs = train(cfg)
        report = next(c for c in objs["trainer"].callbacks if type(c).__name__ == "IterationReport")
        return report.rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--experiments", nargs="+", default=["tiny_spear", "tiny_drbot"])
    ap.add_argument(
        "--rounds", type=int, default=2, help="the experiments run in alternation this many times"
    )
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args()
    results: dict[str, list[dict]] = {e: [] for e in args.experiments}
    for _ in range(args.rounds):
        for e in args.experiments:
            rows = run(e, args.iterations, args.overrides)
            results[e] += rows[1:] or rows
    base = args.experiments[-1]
    base_s = statistics.median(r["perf/iteration_s"] for r in results[base])
    head = f"| experiment | {' | '.join(h for _, h in COLUMNS)} | s/iter vs {base} |"
    print(head)
    print("|" + "---|" * (len(COLUMNS) + 2))
    for e, rows in results.items():
        cells = []
        for key, _ in COLUMNS:
            vals = [r[key] for r in rows if key in r]
            per_run_total = key == "buffer/replayed"
            cells.append(
                f"{sum(vals) / args.rounds:.0f}" if per_run_total else f"{statistics.median(vals):.3g}"
            )
        ratio = statistics.median(r["perf/iteration_s"] for r in rows) / base_s
        print(f"| {e} | {' | '.join(cells)} | {ratio:.2f}x |")
    print(
        f"\nmedians over iterations 2..{args.iterations} of {args.rounds} alternated round(s); "
        "'replayed rows' is the total per run."
    )


if __name__ == "__main__":
    main()
