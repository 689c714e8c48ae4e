"""Token-budget micro-batches, rows packed without padding (data.micro_batch_tokens,
spear_lit/training/packing.py): the same log-probs, entropy and gradients as padded rows; every rank runs
as many micro-batches as the others; the same run on 1 and 2 ranks as the fixed-row split."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from helpers import micro_grads, tiny_learner
from test_rank_invariance import _assert_same, _run

from datamodules.micro_batches import token_chunks
from spear_lit.algos import ppo_clip_loss, seq_mean_token_sum_norm, token_mean
from spear_lit.batch import MiniBatch, Normalizers, TokenBatch
from spear_lit.training import EntropyTerm, KLTerm, PolicyTerm, packing


def _rows(lengths: list[tuple[int, int]], seed: int = 0) -> TokenBatch:
    """Rows with the given (prompt, response) lengths, random tokens, masks, old log-probs, advantages."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for p, t in lengths:
        rows.append(
            {
                "prompt_ids": torch.randint(0, 256, (p,), generator=g).tolist(),
                "response_ids": torch.randint(0, 256, (t,), generator=g).tolist(),
                "response_mask": (torch.rand(t, generator=g) > 0.3).int().tolist(),
                "old_logp": (-5.5 + 0.3 * torch.randn(t, generator=g)).tolist(),
            }
        )
    return TokenBatch.from_rows(rows, pad_id=257, advantages=torch.randn(len(rows), generator=g))


def test_pack_by_hand():
    # row 0: prompt [a b] response [c d e]; row 1: prompt [f] response [g] (left/right padded in the batch)
    b = TokenBatch.from_rows(
        [
            {"prompt_ids": [1, 2], "response_ids": [3, 4, 5], "response_mask": [1, 0, 1]},
            {"prompt_ids": [6], "response_ids": [7], "response_mask": [1]},
        ],
        pad_id=0,
    )
    p = packing.pack(b)
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert p.cu_seqlens.tolist() == [0, 5, 7] and p.max_len == 5 and p.tokens == 7
    # tokens 3, 4, 5 are predicted by positions 1, 2, 3; token 7 by position 5 (token 6)
    assert p.predictors.tolist() == [1, 2, 3, 5]
    with pytest.raises(ValueError, match="empty prompt"):
        packing.pack(TokenBatch.from_rows([{"prompt_ids": [], "response_ids": [3], "response_mask": [1]}], 0))


LENGTHS = [(3, 1), (9, 120), (4, 7), (12, 2), (5, 60), (2, 33)]  # very different lengths


# packed with sdpa: one causal SDPA per row; with eager: transformers' block-diagonal mask
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logprobs_entropy_and_gradients_equal_padded_in_float64(attn):
    terms = {
        "policy": PolicyTerm(objective=ppo_clip_loss, aggregation=token_mean),
        "kl": KLTerm(coef=0.1, aggregation=token_mean),  # the learner keeps a reference copy
    }
    learner = tiny_learner(terms, temperature=0.7)
    sdpa = learner.model.config._attn_implementation
    for m in (learner.model, learner.ref_model):
        m.double()
    b = _rows(LENGTHS).cropped()
    out = {}
    for packed in (False, True):  # the reference: padded rows, the project's SDPA
        learner.pack_rows = packed
        for m in (learner.model, learner.ref_model):
            m.config._attn_implementation = attn if packed and attn == "eager" else sdpa
        learner.model.zero_grad()
        logp, ent = learner.token_stats(b, entropy_grad=True)
        ref, _ = learner.token_stats(b, model=learner.ref_model, entropy=False)
        ((logp * b.response_mask).sum() + 0.1 * (ent * b.response_mask).sum()).backward()
        grad = torch.cat([p.grad.flatten() for p in learner.model.parameters()])
        out[packed] = (logp.detach(), ent.detach(), ref.detach(), grad)
    padding = ~b.attention_mask[:, b.prompt_width :].bool()
    # float64: only summation order differs (per-row attention vs masked batch attention); transformers'
    # eager attention takes its softmax in float32 whatever the model's dtype
    tol = 1e-10 if attn == "sdpa" else 1e-6
    for got, want in zip(out[True], out[False]):
        assert torch.allclose(got, want, rtol=tol, atol=tol), float((got - want).abs().max())
    assert (out[True][0][padding] == 0).all()  # padding positions stay 0, as in the padded layout
    assert out[True][3].abs().sum() > 0


def test_token_budget_micro_batches_give_the_fixed_row_gradient():
    """The normalizers are the step's (SPEAR_SPEC §3.5): any token budget gives one micro-batch's gradient."""
    for agg in (seq_mean_token_sum_norm, token_mean):
        terms = {
            "policy": PolicyTerm(objective=lambda *a: ppo_clip_loss(*a, clip_high=0.28), aggregation=agg),
            "entropy": EntropyTerm(coef=0.01, aggregation=agg),
        }
        learner = tiny_learner(terms)
        batch = _rows(LENGTHS, seed=1)
        norm = Normalizers(num_rows=len(batch), num_tokens=int(batch.response_mask.sum()), max_len=128)
        whole = micro_grads(
            learner, MiniBatch(micro_batches=[batch], kind="on_policy", norm=norm, iteration=1)
        )
        learner.pack_rows = True
        for budget in (1, 64, 150, 10_000):  # 1: a row each; 10k: all rows in one packed sequence
            parts = token_chunks(batch, budget)
            assert sum(len(p) for p in parts) == len(batch)
            assert all(int(p.attention_mask.sum()) <= budget or len(p) == 1 for p in parts)
            mb = MiniBatch(micro_batches=parts, kind="on_policy", norm=norm, iteration=1)
            split = micro_grads(learner, mb)
            assert torch.allclose(whole, split, atol=1e-6, rtol=1e-4), (agg.__name__, budget)
        assert whole.abs().sum() > 0


def _chunks_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist = torch.distributed  # a mismatched collective fails within a minute instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    # rank 0: six long rows (six chunks of 64 tokens); rank 1: two short rows (one chunk)
    lengths = [(4, 50)] * 6 if rank == 0 else [(2, 3), (3, 2)]
    parts = token_chunks(_rows(lengths, seed=rank), 64)
    torch.save([len(p) for p in parts], f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_every_rank_runs_as_many_micro_batches_as_the_rank_that_needs_the_most(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_chunks_rank, args=(port, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{k}.pt") for k in (0, 1))
    assert r0 == [1] * 6 and r1 == [2, 0, 0, 0, 0, 0]  # rank 1's surplus chunks are empty (dummies later)


def test_a_token_budget_run_on_1_and_2_ranks_equals_the_fixed_row_run(tmp_path):
    """Real train.py runs (DDP, gloo; tests/test_rank_invariance.py's deterministic scenario: rows of 10-26
    tokens, replay): a budget of 40 tokens (1-3 rows per micro-batch, a different count on each rank) on 1
    and 2 ranks gives the rows, decisions, metrics and parameters of 3 rows per micro-batch on 1 rank."""
    reference = _run(1, tmp_path / "rows3")
    for w in (1, 2):
        run = _run(w, tmp_path / f"tokens{w}", ["data.micro_batch_tokens=40"])
        _assert_same(w, run, reference)
        assert all(float(r["perf/padding_frac"]) == 0.0 for r in run[0])  # packed: no padding
    assert all(float(r["perf/padding_frac"]) > 0.1 for r in reference[0])  # 3 padded rows of 10-26 tokens
