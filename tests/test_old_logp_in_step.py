"""The old-log-prob pass skips what is redundant: the rows of the iteration's first on-policy optimizer step.

That step starts from the weights that sampled its rows, so its own forward is the old policy: the ratio is 1
and the gradient equals the one with separately computed old log-probs (what TRL does for one step per rollout).
The rows keep those values for later PPO epochs and, with SPEAR's replay buffer, for later replays of them: a
run gives the same numbers as with the pass over every row.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from helpers import TINY_RUN, compose_cfg, micro_grads, tiny_learner

from datamodules import RolloutDataModule
from spear_lit.algos import ppo_clip_loss, seq_mean_token_sum_norm
from spear_lit.batch import MiniBatch, Normalizers, TokenBatch
from spear_lit.training import EntropyTerm, PolicyTerm
from train import train


def test_in_step_old_logp_gives_the_same_gradient_as_the_separate_pass():
    terms = {
        "policy": PolicyTerm(
            objective=lambda *a: ppo_clip_loss(*a, clip_high=0.28), aggregation=seq_mean_token_sum_norm
        ),
        "entropy": EntropyTerm(coef=0.01, aggregation=seq_mean_token_sum_norm),
    }
    learner = tiny_learner(terms)
    g = torch.Generator().manual_seed(0)
    rows = [
        {
            "prompt_ids": torch.randint(0, 256, (5,), generator=g).tolist(),
            "response_ids": torch.randint(0, 256, (9,), generator=g).tolist(),
            "response_mask": [1] * 9,
        }
        for _ in range(6)
    ]
    batch = TokenBatch.from_rows(rows, pad_id=257, advantages=torch.randn(6, generator=g))
    parts = [batch.select([0, 1, 2]), batch.select([3, 4, 5])]
    norm = Normalizers(num_rows=6, num_tokens=int(batch.response_mask.sum()), max_len=16)
    separate = [p.cropped() for p in parts]
    for p, old in zip(separate, learner.old_logprobs(separate)):
        p.old_logp = old
    expected = micro_grads(
        learner, MiniBatch(micro_batches=separate, kind="on_policy", norm=norm, iteration=1)
    )
    assert all(float(p.old_logp.abs().sum()) == 0 for p in parts)  # nothing filled: the step must supply them
    in_step = micro_grads(
        learner,
        MiniBatch(micro_batches=parts, kind="on_policy", norm=norm, iteration=1, old_logp_in_step=True),
    )
    assert expected.abs().sum() > 0
    torch.testing.assert_close(in_step, expected, rtol=1e-5, atol=1e-7)


def _rows(run_dir) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_one_step_iteration_without_replay_skips_the_pass_and_still_reports_entropy(tmp_path):
    # 4 x 4 rollouts, one mini-batch of 16 rows, GRPO (no replay): the pass is skipped
    _, objs = train(compose_cfg(tmp_path / "one", [*TINY_RUN, "loss=grpo", "data.mini_batch_rows=16"]))
    steps = objs["trainer"].global_step
    one = _rows(tmp_path / "one")
    assert steps == 3 and len(one) == 3
    for r in one:
        assert float(r["perf/old_logp_s"]) < 0.05  # no forward pass (an all_gather of a count only)
        assert math.isfinite(float(r["policy/entropy"])) and float(r["policy/entropy"]) > 0
        assert math.isclose(float(r["policy/entropy"]), float(r["policy/entropy_update"]), rel_tol=1e-6)
    # two mini-batches per iteration: later steps need the old policy from before the first, so the pass runs
    _, objs = train(compose_cfg(tmp_path / "two", [*TINY_RUN, "loss=grpo", "data.mini_batch_rows=8"]))
    two = _rows(tmp_path / "two")
    assert objs["trainer"].global_step == 6
    assert all(float(r["perf/old_logp_s"]) > 0 for r in two)


@pytest.mark.parametrize(
    "split",
    [
        ["data.mini_batch_rows=16"],
        ["data.mini_batch_rows=8"],
        ["data.mini_batch_rows=8", "data.ppo_epochs=2"],
    ],
    ids=["one_step", "two_steps", "two_steps_two_epochs"],
)
def test_spear_gives_the_same_run_as_with_the_pass_over_every_row(tmp_path, monkeypatch, split):
    # 4 x 4 rollouts, SPEAR with a 2-row buffer: replay fires from iteration 2 on rows whose old log-probs the
    # first on-policy step of an earlier iteration supplied (all of them with one step per iteration; the first
    # step's with two, the pass the rest; with two PPO epochs the second epoch reads them from the first). A
    # run whose pass covers every row must give the same metrics (losses, ratios, clipping, entropies,
    # decisions).
    run = [*TINY_RUN, *split]
    _, objs = train(compose_cfg(tmp_path / "in_step", run))
    in_step = _rows(tmp_path / "in_step")
    assert any(float(r["buffer/replayed"] or 0) > 0 for r in in_step)
    if split == ["data.mini_batch_rows=16"]:
        assert all(float(r["perf/old_logp_s"]) < 0.05 for r in in_step)  # no pass ran
    monkeypatch.setattr(RolloutDataModule, "first_step_old_logp", False)
    _, ref = train(compose_cfg(tmp_path / "pass", run))
    with_pass = _rows(tmp_path / "pass")
    assert objs["trainer"].global_step == ref["trainer"].global_step
    assert len(with_pass) == len(in_step) == 3
    for a, b in zip(in_step, with_pass):
        assert a.keys() == b.keys()
        for k in a:
            if k.startswith("perf/") or a[k] == b[k]:
                continue
            assert math.isclose(float(a[k]), float(b[k]), rel_tol=1e-5, abs_tol=1e-7), (k, a[k], b[k])
