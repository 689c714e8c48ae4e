"""The HF engine on a policy sharded with FSDP2 over two CPU processes (gloo): every decode step is a
collective, so ranks that decode different numbers of chunks (uneven active episodes, a small
``rollout.max_batch_size``) must still run the same forwards, and each rank's tokens must be those the
unsharded policy gives for its own prompts."""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.multiprocessing as mp

from spear_lit.policy import PolicySource
from spear_lit.rollout import HFEngine

PROBLEMS = ["Add 3 and 4.", "Add 12 and 30.", "Add 7 and 8.", "Add 100 and 5.", "Add 1 and 1."]
BUDGETS = [12, 5, 12, 9, 12]
CHUNK = 2  # rank 0: 5 prompts = 3 chunks; rank 1: 1 prompt = 1 chunk
SHARE = {0: slice(0, 5), 1: slice(1, 2)}


def _prompts(tok) -> list[list[int]]:
    return [tok(p)["input_ids"] for p in PROBLEMS]


def _generate(model, tok, share: slice) -> list[list[int]]:
    engine = HFEngine(max_batch_size=CHUNK)
    engine.bind(model, tok)
    outs = engine.generate(_prompts(tok)[share], max_new_tokens=BUDGETS[share], greedy=True)
    return [list(o) for o in outs]  # the token ids (torch.load refuses the Continuation class)


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist = torch.distributed  # a mismatched collective fails within a minute instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    src = PolicySource("builtin:tiny-math-sft")
    model, tok = src.model(), src.tokenizer()
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.layers:  # as PolicyLearner.configure_model shards it
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    torch.save(_generate(model, tok, SHARE[rank]), f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_sharded_ranks_with_different_chunk_counts_decode_together_and_exactly(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_rank, args=(port, str(tmp_path)), nprocs=2, start_method="spawn", join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("sharded generation did not finish in 300 s")

    src = PolicySource("builtin:tiny-math-sft")
    model, tok = src.model(), src.tokenizer()
    for rank, share in SHARE.items():
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got == _generate(model, tok, share), rank
        assert len(got) == share.stop - share.start and all(got)
