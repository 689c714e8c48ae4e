"""Ulysses sequence parallelism (trainer.strategy.sequence_parallel_size, spear_lit/training/sequence_parallel.py)
on 2 and 4 CPU ranks (gloo): the same per-token log-probs, entropy and gradients as one process on the
same rows, and the same training run (rows, decisions, metrics, parameters) as without it."""

from __future__ import annotations

import datetime
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_packing import LENGTHS, _rows
from test_rank_invariance import _assert_same, _run

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4}


def _stats_and_grad(model, b, sp=None):
    from spear_lit.training import logprobs, sequence_parallel

    model.zero_grad()
    if sp is None:
        logp, ent = logprobs.response_token_stats(model, b, temperature=0.7, packed=True, entropy_grad=True)
    else:
        logp, ent = sequence_parallel.response_token_stats(
            model, b, sp, temperature=0.7, entropy_grad=True, chunk_size=7
        )
    scale = 1.0 if sp is None else 1.0 / sp.size  # every rank of the group computes the same loss
    loss = (logp * b.response_mask).sum() + 0.1 * (ent * b.response_mask).sum()
    (loss * scale).backward()
    return logp.detach(), ent.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def _rank(rank: int, world: int, size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist = torch.distributed  # a mismatched collective fails within two minutes instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    from spear_lit.policy import PolicySource
    from spear_lit.training import sequence_parallel
    from spear_lit.training.strategies import FSDP2Strategy

    model = PolicySource(tiny=TINY, init_seed=1).model().double().train()
    sp = sequence_parallel.group_of(FSDP2Strategy(sequence_parallel_size=size), model)
    b = _rows(LENGTHS, seed=7 + rank // size).cropped()  # one micro-batch per group, as members() gives
    want = _stats_and_grad(model, b)
    logp, ent, grad = _stats_and_grad(model, b, sp)
    dist.all_reduce(grad, group=sp.group)  # each rank holds its slices' share of the gradient
    torch.save({"want": want, "got": (logp, ent, grad)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world, size", [(2, 2), (4, 2), (4, 4)])
def test_split_sequence_gives_the_same_logprobs_entropy_and_gradients(tmp_path, world, size):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _rank, args=(world, size, port, str(tmp_path)), nprocs=world, start_method="spawn", join=True
    )
    for r in range(world):
        rec = torch.load(tmp_path / f"rank{r}.pt")
        for got, want in zip(rec["got"], rec["want"]):
            # float64; only the order of sums differs (head split, gradient sum over the group)
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-10), (r, float((got - want).abs().max()))
        assert rec["want"][2].abs().sum() > 0


SP = ["trainer=fsdp", "trainer.accelerator=cpu", "data.micro_batch_tokens=40"]


@pytest.mark.parametrize("world", [2, 4])
def test_a_sequence_parallel_run_equals_the_run_without_it(tmp_path, world):
    """tests/test_rank_invariance.py's deterministic scenario on FSDP2 ranks with sequence parallelism 2
    (the data layer untouched: every rank keeps its rows; a group runs its members' micro-batches in
    turn) gives the 1-rank run's rows, decisions, metrics and parameters."""
    reference = _run(1, tmp_path / "ws1", ["data.micro_batch_tokens=40"])
    log = ["+callbacks.sp._target_=rank_agent.SequenceParallelLog", f"+callbacks.sp.out_dir={tmp_path}/log"]
    run = _run(world, tmp_path / f"sp{world}", [*SP, "trainer.strategy.sequence_parallel_size=2", *log])
    _assert_same(world, run, reference)
    groups = [json.loads((tmp_path / "log" / f"sp{k}.json").read_text()) for k in range(world)]
    # consecutive ranks in groups of 2, each rank in its own group at its place in it
    assert groups == [{"ranks": [k - k % 2, k - k % 2 + 1], "rank": k % 2} for k in range(world)], groups
