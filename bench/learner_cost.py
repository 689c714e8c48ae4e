"""Benchmark: the learner's cost as responses grow: seconds per 1k tokens and peak host memory of one
forward+backward over a micro-batch of rows of mixed lengths, with and without chunked log-probs (issue
23 item 1) and packed rows (item 2).

    OMP_NUM_THREADS=1 python bench/learner_cost.py        # ~10 minutes on one core

A tiny policy (hidden 128, 2 decoder layers, vocabulary 32768, so that the LM head matters as in a real
model); for each maximum response length ``L`` one micro-batch of 8 rows with a 64-token prompt and
responses of ``L/8, 2L/8, ..., L`` tokens (a group's usual spread). Three learners:

* *full-vocabulary, padded*: the ``[n, T, V]`` logits in fp32 with gradient, rows padded (before item 1);
* *chunked, padded*: :func:`~spear_lit.training.logprobs.response_token_stats` (after item 1);
* *chunked, packed*: the same on the rows concatenated without padding (``data.micro_batch_tokens``);
* *sequence parallel 2*: the packed micro-batch split over 2 gloo processes (item 3), per rank.

Each case runs in a fresh subprocess: the peak is the RSS high-water mark after the reps minus the one
before them; time is the median over ``--reps``, per 1000 of the rows' own tokens (prompt + response,
padding not counted). On CPU the two sequence-parallel processes share the machine's cores, so their time
shows the all-to-alls' cost, not a speed-up. Nothing is asserted.
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
PROMPT, ROWS, VOCAB = 64, 8, 32768
MODES = {
    "full": "full-vocabulary, padded",
    "chunked": "chunked, padded",
    "packed": "chunked, packed",
    "sp2": "chunked, packed, sequence parallel 2 (per rank)",
}


def _setup(L: int):
    """The tiny policy and the micro-batch of length ``L`` (the same on every process: fixed seeds)."""
    import torch

    from spear_lit.batch import TokenBatch

    model = tiny_policy(hidden=128, layers=2, vocab=VOCAB, max_positions=PROMPT + L + 1)
    g = torch.Generator().manual_seed(0)
    rows = []
    for k in range(1, ROWS + 1):
        t = k * L // ROWS
        rows.append(
            {
                "prompt_ids": torch.randint(0, VOCAB, (PROMPT,), generator=g).tolist(),
                "response_ids": torch.randint(0, VOCAB, (t,), generator=g).tolist(),
                "response_mask": [1] * t,
            }
        )
    return model, TokenBatch.from_rows(rows, pad_id=0)


def _case(mode: str, L: int, reps: int) -> dict:
    if mode == "sp2":
        return _sequence_parallel(L, reps)
    from spear_lit.training.logprobs import response_token_stats

    model, b = _setup(L)
    steps = {
        "full": lambda: full_vocab_stats(model, b),
        "chunked": lambda: response_token_stats(model, b, share_prompts=False),
        "packed": lambda: response_token_stats(model, b, share_prompts=False, packed=True),
    }
    peak, times = measure(model, b, steps[mode], reps)
    tokens = int(b.attention_mask.sum())
    return {"peak": peak, "s_per_1k": 1000 * median(times) / tokens, "tokens": tokens}


def _sp_rank(rank: int, port: int, L: int, reps: int, out: str) -> None:
    import datetime
    import os

    import torch.distributed as dist

    from spear_lit.training import logprobs, sequence_parallel
    from spear_lit.training.strategies import FSDP2Strategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=600))
    model, b = _setup(L)
    sp = sequence_parallel.group_of(FSDP2Strategy(sequence_parallel_size=2), model)
    step = lambda: sequence_parallel.response_token_stats(model, b, sp, chunk_size=logprobs.CHUNK_SIZE)  # noqa: E731
    peak, times = measure(model, b, step, reps)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak": peak, "s": median(times)}))
    dist.destroy_process_group()


def _sequence_parallel(L: int, reps: int) -> dict:
    """Chunked and packed, the micro-batch split over 2 gloo processes (Ulysses, sequence parallel 2): the
    larger of the two ranks' peaks, and the slower rank's seconds per 1k of the micro-batch's tokens."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as sock, tempfile.TemporaryDirectory() as out:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        mp.start_processes(_sp_rank, args=(port, L, reps, out), nprocs=2, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    tokens = int(_setup(L)[1].attention_mask.sum())
    return {
        "peak": max(r["peak"] for r in ranks),
        "s_per_1k": 1000 * max(r["s"] for r in ranks) / tokens,
        "tokens": tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--full-max-len",
        type=int,
        default=2048,
        help="skip the full-vocabulary case above this L (at 8192 its fp32 logits alone are 8.6 GB a copy)",
    )
    ap.add_argument("--case", nargs=2, metavar=("MODE", "L"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(_case(args.case[0], int(args.case[1]), args.reps)))
        return
    print(
        f"tiny policy (hidden 128, 2 layers, vocabulary {VOCAB}); {ROWS} rows, prompt {PROMPT}, responses "
        f"L/8 .. L; fp32, one thread; median of {args.reps}\n"
    )
    print(
        "| L | rows' tokens | "
        + " | ".join(f"{v}: s / 1k tok | {v}: peak MiB" for v in MODES.values())
        + " |"
    )
    print("| --- | --- |" + " --- | --- |" * len(MODES))
    for L in args.lengths:
        cells, tokens = [], 0
        for mode in MODES:
            if mode == "full" and L > args.full_max_len:
                gib = ROWS * (PROMPT + L) * VOCAB * 4 / 2**30
                cells += ["–", f"skipped ({gib:.1f} GiB a copy)"]
                continue
            cmd = [sys.executable, __file__, "--case", mode, str(L), f"--reps={args.reps}"]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{mode} L={L} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            tokens = r["tokens"]
            cells += [f"{r['s_per_1k']:.3f}", f"{r['peak'] / 2**20:.0f}"]
        print(f"| {L} | {tokens} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
