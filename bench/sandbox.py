"""The code interpreter's batch latency before (one bubblewrap sandbox per call) and after (the pool).

Workload: the default experiment's tool round: a batch of 64 short ``print(expr)`` programs (the tiny
policy's arithmetic), run with ``--workers`` threads/sandboxes at once (the default config uses 4).
Rounds alternate A B A B; the table shows medians over rounds.

    python bench/sandbox.py [--batch 64] [--workers 4] [--rounds 5]

Last line: JSON with both variants' median batch seconds and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spear_lit.tools import CodeInterpreter  # noqa: E402
from spear_lit.tools.sandbox import Limits, bwrap_command, run  # noqa: E402


def programs(n: int, seed: int) -> list[str]:
    """``n`` programs like the tiny policy's tool calls: ``print(a op b)`` on multi-digit numbers."""
    rng = random.Random(seed)
    ops = ["+", "-", "*"]
    return [f"print({rng.randint(100, 99999)} {rng.choice(ops)} {rng.randint(100, 99999)})" for _ in range(n)]


def timed(fn, code: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = fn(code)
    return time.perf_counter() - t0, out


def one_shot(workers: int):
    """Today's path before the pool: a fresh bwrap sandbox and interpreter per call."""
    limits = Limits()
    cmd = bwrap_command("/usr/bin/bwrap", "/usr/bin/python3", limits)
    pool = ThreadPoolExecutor(max_workers=workers)

    def call(code: str) -> str:
        return run(cmd, code, limits, sandboxed=True).stdout.strip()

    return lambda codes: list(pool.map(lambda c: timed(call, c), codes)), pool.shutdown


def pooled(workers: int):
    tool = CodeInterpreter(num_workers=workers)
    pool = ThreadPoolExecutor(max_workers=workers)
    return (
        lambda codes: list(pool.map(lambda c: timed(lambda x: tool.execute(x).stdout.strip(), c), codes)),
        lambda: (pool.shutdown(), tool.close()),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    variants = {
        "one-shot bwrap (before)": one_shot(args.workers),
        "sandbox pool (after)": pooled(args.workers),
    }
    results: dict[str, dict[str, list[float]]] = {k: {"batch": [], "lat": []} for k in variants}
    for r in range(args.rounds):
        codes = programs(args.batch, seed=r)
        expected = [str(eval(c[6:-1])) for c in codes]  # the programs are our own arithmetic
        for name, (fn, _) in variants.items():  # A B A B ...
            t0 = time.perf_counter()
            outs = fn(codes)
            results[name]["batch"].append(time.perf_counter() - t0)
            results[name]["lat"] += [t for t, _ in outs]
            assert [o for _, o in outs] == expected, name
    for _, close in variants.values():
        close()
    cpus = os.cpu_count()
    print(
        f"batch {args.batch} x print(expr), {args.workers} threads/sandboxes, {args.rounds} rounds A B A B, "
        f"{cpus} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; medians"
    )
    print(f"{'variant':26} {'batch s':>9} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    summary = {}
    for name, res in results.items():
        batch = statistics.median(res["batch"])
        lat = sorted(res["lat"])
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        print(f"{name:26} {batch:9.3f} {args.batch / batch:9.1f} {p50 * 1e3:8.1f} {p99 * 1e3:8.1f}")
        summary[name] = {
            "batch_s": batch,
            "calls_per_s": args.batch / batch,
            "p50_ms": p50 * 1e3,
            "p99_ms": p99 * 1e3,
        }
    before, after = (summary[k]["batch_s"] for k in variants)
    print(
        json.dumps(
            {
                "workers": args.workers,
                "batch": args.batch,
                "before_batch_s": round(before, 4),
                "after_batch_s": round(after, 4),
                "speedup": round(before / after, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
