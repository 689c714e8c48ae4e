"""Benchmark: iteration time and throughput of SPEAR vs its baselines on the tiny task, side by side.

    python bench/iteration_time.py --iterations 12 --experiments tiny_spear tiny_drbot tiny_grpo

Runs each experiment in this process, one after another (same machine, same load), and prints a table
of medians over iterations (the first iteration is dropped as warm-up). Nothing here is asserted.
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
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args()
    results = {e: run(e, args.iterations, args.overrides) for e in args.experiments}
    base = args.experiments[-1]
    base_s = statistics.median(r["perf/iteration_s"] for r in results[base][1:])
    head = f"| experiment | {' | '.join(h for _, h in COLUMNS)} | s/iter vs {base} |"
    print(head)
    print("|" + "---|" * (len(COLUMNS) + 2))
    for e, rows in results.items():
        rows = rows[1:] or rows
        cells = []
        for key, _ in COLUMNS:
            vals = [r[key] for r in rows if key in r]
            cells.append(f"{statistics.median(vals):.3g}" if key != "buffer/replayed" else f"{sum(vals):.0f}")
        ratio = statistics.median(r["perf/iteration_s"] for r in rows) / base_s
        print(f"| {e} | {' | '.join(cells)} | {ratio:.2f}x |")
    print(f"\nmedians over iterations 2..{args.iterations}; 'replayed rows' is the total.")


if __name__ == "__main__":
    main()
