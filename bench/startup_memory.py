"""Benchmark: host memory per rank and per node at FSDP2 start-up, before and after the sharded load of
``spear_lit/training/sharded_load.py`` (issue 22, item 7).

    OMP_NUM_THREADS=1 python bench/startup_memory.py      # ~3 minutes on 2 cores, ~6 GiB at the peak

A random Qwen2 (hidden 768, 12 layers, vocab 32000, tied embeddings: 136M parameters) is saved in
**bf16**, as the recipes' checkpoints are, by a subprocess, and loaded in **fp32**, as ``model=hf``
does (fp32 master weights): every rank that reads it converts, so it holds private (anonymous) memory,
not only shared page cache. Each case starts ``--ranks`` fresh processes (gloo, one CPU "device" per
rank, the DP mesh FSDP2 gets from Lightning's ``ModelParallelStrategy``) that call
:func:`~spear_lit.training.sharded_load.build_policy` as ``PolicyModule.configure_model`` does:

* *before*: every rank reads the whole checkpoint, deep-copies it for the KL reference, then shards
  (``every_rank_reads=True``: the old start-up);
* *after*: global rank 0 reads; the others build on the meta device and receive their shards by
  broadcast; the reference copies local shards.

Each is run without and with a reference copy. Per rank: the high-water mark of its resident set
(``VmHWM``: it starts afresh at ``exec``, unlike ``ru_maxrss``, which a child inherits from a large
parent) before the call (imports done) and after it, its private memory after it (``RssAnon``), and the
call's seconds. Per node: the largest sum of the ranks' private memory at one moment, sampled every
20 ms by this process (which imports no torch). Nothing is asserted; the parent never holds a model.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
ARCH = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
TIMEOUT_S = 900  # one case; a hung collective must not hang the benchmark


def _status(pid: int | str = "self") -> dict[str, int]:
    """``/proc/<pid>/status`` memory fields in bytes (VmHWM, VmRSS, RssAnon, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _write_checkpoint(path: str) -> None:
    """A random Qwen2 of :data:`ARCH` in bf16 (``save_pretrained``); prints its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**ARCH), dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    print(sum(p.numel() for p in model.parameters()))


def _rank(ckpt: str, case: str, reference: bool, out: str) -> None:
    """One rank of one start-up (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from spear_lit.policy import PolicySource
    from spear_lit.training.sharded_load import build_policy

    dist.init_process_group("gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (ranks,))
    dist.barrier()
    before = _status()["VmHWM"]
    start = time.perf_counter()
    model, ref = build_policy(
        PolicySource(ckpt, dtype="float32"), mesh, reference=reference, every_rank_reads=case == "before"
    )
    seconds = time.perf_counter() - start
    now = _status()
    record = {"hwm_before": before, "hwm": now["VmHWM"], "anon": now["RssAnon"], "seconds": seconds}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()  # every rank still holds its model while the others finish
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case(ckpt: str, case: str, reference: bool, ranks: int, out: Path) -> tuple[list[dict], int]:
    """Run one start-up on ``ranks`` processes; returns each rank's record and the node's peak private
    memory (the largest sum over ranks of ``RssAnon`` seen at one sampling moment)."""
    out.mkdir(parents=True)
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(ranks),
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--rank-of", case, "--ckpt", ckpt, "--out", str(out)]
    procs = [
        subprocess.Popen(
            cmd + (["--reference"] if reference else []),
            cwd=REPO,
            env={**env, "RANK": str(r)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(ranks)
    ]
    node_peak, deadline = 0, time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs):
        total = 0
        for p in procs:
            try:
                total += _status(p.pid).get("RssAnon", 0)
            except (FileNotFoundError, ProcessLookupError):
                pass
        node_peak = max(node_peak, total)
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            sys.exit(f"{case} (reference={reference}): no result in {TIMEOUT_S} s")
        time.sleep(0.02)
    for r, p in enumerate(procs):
        if p.returncode != 0:
            sys.exit(f"{case} (reference={reference}) rank {r} failed:\n{p.stderr.read()[-3000:]}")
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    return records, node_peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--rank-of", choices=["before", "after"], help=argparse.SUPPRESS)  # internal: one rank
    p.add_argument("--write-checkpoint", help=argparse.SUPPRESS)  # internal
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.write_checkpoint:
        return _write_checkpoint(args.write_checkpoint)
    if args.rank_of:
        return _rank(args.ckpt, args.rank_of, args.reference, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp) / "ckpt")
        made = subprocess.run(
            [sys.executable, __file__, "--write-checkpoint", ckpt], cwd=REPO, capture_output=True, text=True
        )
        if made.returncode != 0:
            sys.exit(made.stderr[-3000:])
        n = int(made.stdout.split()[-1])
        size = sum(f.stat().st_size for f in Path(ckpt).glob("*.safetensors"))
        print(
            f"random Qwen2 {ARCH['hidden_size']}x{ARCH['num_hidden_layers']}, vocab {ARCH['vocab_size']}: "
            f"{n / 1e6:.0f}M parameters, {size / MIB:.0f} MiB of bf16 safetensors loaded in fp32 "
            f"({4 * n / MIB:.0f} MiB); {args.ranks} CPU ranks (gloo), FSDP2\n"
        )
        print(
            "| start-up | reference | rank | peak RSS before (MiB) | peak RSS after (MiB) "
            "| private after (MiB) | seconds |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        nodes = []
        for reference in (False, True):
            for case in ("before", "after"):
                records, node = _case(
                    ckpt, case, reference, args.ranks, Path(tmp) / f"{case}-{int(reference)}"
                )
                nodes.append((case, reference, node, sum(r["hwm"] for r in records)))
                for r, rec in enumerate(records):
                    print(
                        f"| {case} | {'yes' if reference else 'no'} | {r} | {rec['hwm_before'] / MIB:.0f} "
                        f"| {rec['hwm'] / MIB:.0f} | {rec['anon'] / MIB:.0f} | {rec['seconds']:.1f} |",
                        flush=True,
                    )
        print(
            "\n| start-up | reference | node: peak private memory, all ranks at once (MiB) | sum of ranks' peak RSS (MiB) |"
        )
        print("| --- | --- | --- | --- |")
        for case, reference, node, hwm in nodes:
            print(f"| {case} | {'yes' if reference else 'no'} | {node / MIB:.0f} | {hwm / MIB:.0f} |")


if __name__ == "__main__":
    main()
