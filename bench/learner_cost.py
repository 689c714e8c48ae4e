"""Benchmark: the learner's cost as responses grow: seconds per 1k tokens and peak host memory of one
forward+backward over a micro-batch of rows of mixed lengths, with and without chunked log-probs (issue
23 item 1) and packed rows (item 2).

    OMP_NUM_THREADS=1 python bench/learner_cost.py        # ~10 minutes on one core

A tiny policy (hidden 128, 2 decoder layers, vocabulary 32768, so that the LM head matters as in a real
model); for each maximum response length ``L`` one micro-batch of 8 rows with a 64-token prompt and
responses of ``L/8, 2L/8, ..., L`` tokens (a group's usual spread). Three learners:

* *full-vocabulary, padded*: the ``[n, T, V]`` logits in fp32 with gradient, rows padded (before item 1);
* *chunked, padded*: :func:`~spear_lit.training.logprobs.response_token_stats` (after item 1);
* *chunked, packed*: the same on the rows concatenated without padding (``data.micro_batch_tokens``).

Each case runs in a fresh subprocess: the peak is the RSS high-water mark after the reps minus the one
before them; time is the median over ``--reps``, per 1000 of the rows' own tokens (prompt + response,
padding not counted). Sequence parallelism (item 3) is not implemented yet: no column. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT, ROWS, VOCAB = 64, 8, 32768
MODES = {"full": "full-vocabulary, padded", "chunked": "chunked, padded", "packed": "chunked, packed"}


def _case(mode: str, L: int, reps: int) -> dict:
    import torch

    from spear_lit.algos import entropy_from_logits, logprobs_from_logits
    from spear_lit.batch import TokenBatch, position_ids
    from spear_lit.policy import PolicySource
    from spear_lit.training.logprobs import response_token_stats

    torch.set_num_threads(1)
    tiny = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=PROMPT + L + 1,
    )
    model = PolicySource(tiny=tiny).model().train()
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
    b = TokenBatch.from_rows(rows, pad_id=0)
    mask, P = b.response_mask, b.prompt_width

    def full():
        logits = model(
            input_ids=b.input_ids,
            attention_mask=b.attention_mask,
            position_ids=position_ids(b.attention_mask),
            use_cache=False,
            logits_to_keep=b.response_width + 1,
        ).logits[:, :-1]
        logits = logits.float()
        return logprobs_from_logits(logits, b.input_ids[:, P:]), entropy_from_logits(logits)

    def chunked(packed: bool):
        return response_token_stats(model, b, share_prompts=False, packed=packed)

    step = {"full": full, "chunked": lambda: chunked(False), "packed": lambda: chunked(True)}[mode]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        logp, ent = step()
        loss = -(logp * mask).sum() / mask.sum()
        float((ent.detach() * mask).sum())
        del logp, ent
        loss.backward()
        times.append(time.perf_counter() - start)
    tokens = int(b.attention_mask.sum())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak": peak, "s_per_1k": 1000 * statistics.median(times) / tokens, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--reps", type=int, default=3)
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
