"""Benchmark: host memory and time of one learner forward+backward on one long row, before and after the
chunked log-probs of ``spear_lit/training/logprobs.py`` (issue 23, item 1).

    OMP_NUM_THREADS=1 python bench/long_rows.py            # ~9 minutes on one core

A tiny policy (hidden 64, one decoder layer) so the logits dominate; one row of a 16-token prompt and
``T`` response tokens; vocabulary ``V``. *before*: the full-vocabulary computation ``token_stats`` did
(``[T, V]`` logits of the response positions, cast to fp32, ``logprobs_from_logits`` and
``entropy_from_logits`` with gradient); *after*: ``response_token_stats`` (the LM head on 1024 positions
at a time, checkpointed; entropy without gradient, as SPEAR's terms need it). Both then back-propagate a
token-mean of ``logp``, as the policy term does. Each case runs in a fresh subprocess: its peak is the
RSS high-water mark (``ru_maxrss``) after the reps minus the one after building the model and the row;
seconds per token is the median over ``--reps`` reps (one for cases above ``--rep-cells``). A *before* case whose estimated peak (fp32
``[T, V]`` copies as measured on the smaller cases of the same run) exceeds ``--max-gib`` is skipped.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _learner_case import full_vocab_stats, measure, median, tiny_policy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = 16
GIB = 2**30


def _case(mode: str, T: int, V: int, reps: int, chunk_size: int) -> dict:
    """One case in this process: ``{"peak": bytes, "s_per_token": s}``."""
    import torch

    from spear_lit.batch import TokenBatch
    from spear_lit.training.logprobs import response_token_stats

    model = tiny_policy(hidden=64, layers=1, vocab=V, max_positions=PROMPT + T + 1)
    g = torch.Generator().manual_seed(0)
    row = {
        "prompt_ids": torch.randint(0, V, (PROMPT,), generator=g).tolist(),
        "response_ids": torch.randint(0, V, (T,), generator=g).tolist(),
        "response_mask": [1] * T,
    }
    b = TokenBatch.from_rows([row], pad_id=0)
    temperature = 0.7
    if mode == "before":
        step = lambda: full_vocab_stats(model, b, temperature)  # noqa: E731
    else:
        step = lambda: response_token_stats(model, b, temperature=temperature, chunk_size=chunk_size)  # noqa: E731
    peak, times = measure(model, b, step, reps)
    return {"peak": peak, "s_per_token": median(times) / T}


def _run(mode: str, T: int, V: int, reps: int, chunk_size: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--case",
        mode,
        str(T),
        str(V),
        f"--reps={reps}",
        f"--chunk-size={chunk_size}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{mode} T={T} V={V} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32768, 152064])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rep-cells", type=int, default=2**28, help="cases with more T·V cells run one rep")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--max-gib", type=float, default=12.0, help="skip before-cases estimated above this")
    ap.add_argument("--case", nargs=3, metavar=("MODE", "T", "V"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        mode, T, V = args.case[0], int(args.case[1]), int(args.case[2])
        sys.path.insert(0, str(REPO))
        print(json.dumps(_case(mode, T, V, args.reps, args.chunk_size)))
        return

    cases = sorted(((T, V) for T in args.lengths for V in args.vocabs), key=lambda c: c[0] * c[1])
    copies = None  # peak of the before-path in fp32 [T, V] copies, from the largest case run so far
    rows = []
    for T, V in cases:
        copy_bytes, reps = 4 * T * V, args.reps if T * V <= args.rep_cells else 1
        after = _run("after", T, V, reps, args.chunk_size)
        if copies is not None and copies * copy_bytes > args.max_gib * GIB:
            before = {"skipped": copies * copy_bytes / GIB}
        else:
            before = _run("before", T, V, reps, args.chunk_size)
            copies = before["peak"] / copy_bytes
        rows.append((T, V, copy_bytes, reps, before, after))
        print(f"  done T={T} V={V}", file=sys.stderr, flush=True)

    print(f"one row of {PROMPT} prompt + T response tokens; hidden 64, 1 layer; chunk {args.chunk_size}")
    print("peak = RSS high-water of forward+backward above the model; s/tok = median over the reps")
    head = f"| {'T':>6} | {'V':>7} | {'fp32 [T,V]':>10} | {'before peak':>27} | {'after peak':>10} |"
    head += f" {'before s/tok':>12} | {'after s/tok':>11} | reps |"
    print(head)
    print("|" + "|".join("-" * (len(c) + 0) for c in head.split("|")[1:-1]) + "|")
    for T, V, copy_bytes, reps, before, after in rows:
        if "skipped" in before:
            b_peak, b_time = f"skipped (would need ~{before['skipped']:.0f} GiB)", "-"
        else:
            b_peak, b_time = f"{before['peak'] / GIB:.2f} GiB", f"{before['s_per_token'] * 1e6:.1f} µs"
        print(
            f"| {T:>6} | {V:>7} | {copy_bytes / GIB:>6.2f} GiB | {b_peak:>27} | {after['peak'] / GIB:>6.2f} GiB |"
            f" {b_time:>12} | {after['s_per_token'] * 1e6:>8.1f} µs | {reps:>4} |"
        )


if __name__ == "__main__":
    main()
