"""Benchmark: tokens through the learner and the share that is padding, fixed-row micro-batches vs
token-budget micro-batches with rows packed (``data.micro_batch_tokens``; issue 23, item 2).

    OMP_NUM_THREADS=1 python bench/padding.py        # ~15 minutes on 2 cores

Runs each workload for ``--iterations`` (the same seed, so the same first rollouts) twice, in this
process: as configured (``data.micro_batch_rows``), then with ``data.micro_batch_tokens=--budget``, and
prints the medians over iterations of ``perf/train_tokens`` (tokens through the model, padding
included, over all ranks), ``perf/padding_frac`` (the share of them that is padding), the learner's
seconds per iteration (``perf/update_s`` + ``perf/replay_update_s`` + ``perf/old_logp_s``) and its
tokens per second. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from iteration_time import run  # noqa: E402

WORKLOADS = {  # name -> experiment (tiny models, CPU)
    "default (arithmetic)": "tiny_spear",
    "exploration": "explore_spear",
    "ALFWorld": "alfworld_tiny_spear",
    "WebShop": "webshop_tiny_spear",
}


def _median(rows: list[dict], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return statistics.median(values) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--budget", type=int, default=4096, help="data.micro_batch_tokens of the packed runs")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = ap.parse_args()
    print(
        "| workload | micro-batches | train tokens / iteration | padding | learner s / iteration "
        "| learner tok/s |\n| --- | --- | --- | --- | --- | --- |"
    )
    for name in args.workloads:
        for label, extra in (
            ("fixed rows (as configured)", []),
            (f"≤ {args.budget} tokens, packed", [f"data.micro_batch_tokens={args.budget}"]),
        ):
            rows = run(WORKLOADS[name], args.iterations, extra)
            learner_s = statistics.median(
                sum(
                    float(r.get(k) or 0.0)
                    for k in ("perf/update_s", "perf/replay_update_s", "perf/old_logp_s")
                )
                for r in rows
            )
            print(
                f"| {name} | {label} | {_median(rows, 'perf/train_tokens'):.0f} "
                f"| {100 * _median(rows, 'perf/padding_frac'):.1f} % | {learner_s:.2f} "
                f"| {_median(rows, 'perf/train_tokens_per_s'):.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
