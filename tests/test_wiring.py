"""The wiring's correctness (issue: on-policy, micro-batch invariance, replay order, resume), in-process."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_RUN, OnPolicySpy, compose_cfg, micro_grads, tiny_learner
from hydra.utils import instantiate

from spear_lit.algos import ppo_clip_loss, seq_mean_token_sum_norm, token_mean
from spear_lit.batch import MiniBatch, Normalizers, TokenBatch
from spear_lit.training import EntropyTerm, PolicyTerm
from train import train


def test_rollouts_use_the_weights_after_the_previous_iteration(tmp_path):
    cfg = compose_cfg(tmp_path, [*TINY_RUN, "+callbacks.spy._target_=helpers.OnPolicySpy"])
    _, objs = train(cfg)
    spy = next(c for c in objs["trainer"].callbacks if isinstance(c, OnPolicySpy))
    assert {t for t, _ in spy.at_generation} == {1, 2, 3}
    for t, digest in spy.at_generation:
        assert digest == spy.after_iteration[t - 1], f"iteration {t} sampled from stale or future weights"
    assert len(set(spy.after_iteration.values())) == 4  # every iteration really changed the policy


def _random_batch(n: int, seed: int = 0) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p, t = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
        rows.append(
            {
                "prompt_ids": torch.randint(0, 256, (p,), generator=g).tolist(),
                "response_ids": torch.randint(0, 256, (t,), generator=g).tolist(),
                "response_mask": (torch.rand(t, generator=g) > 0.3).int().tolist(),
                "old_logp": (-5.5 + 0.3 * torch.randn(t, generator=g)).tolist(),
            }
        )
    return TokenBatch.from_rows(rows, pad_id=257, advantages=torch.randn(n, generator=g))


def _grads(learner, micro: list[TokenBatch], norm: Normalizers) -> torch.Tensor:
    return micro_grads(learner, MiniBatch(micro_batches=micro, kind="on_policy", norm=norm, iteration=1))


def test_gradient_is_the_same_for_one_or_several_micro_batches():
    for agg in (seq_mean_token_sum_norm, token_mean):
        terms = {
            "policy": PolicyTerm(objective=lambda *a: ppo_clip_loss(*a, clip_high=0.28), aggregation=agg),
            "entropy": EntropyTerm(coef=0.01, aggregation=agg),
        }
        learner = tiny_learner(terms)
        batch = _random_batch(8)
        norm = Normalizers(num_rows=8, num_tokens=int(batch.response_mask.sum()), max_len=16)
        whole = _grads(learner, [batch], norm)
        for k in (2, 4, 8):
            size = 8 // k
            parts = [batch.select(list(range(i * size, (i + 1) * size))) for i in range(k)]
            split = _grads(learner, parts, norm)
            assert torch.allclose(whole, split, atol=1e-6, rtol=1e-4), (agg.__name__, k)
        assert whole.abs().sum() > 0


def test_replay_steps_follow_on_policy_with_stored_logp_replay_triple_and_coefficient(tmp_path):
    seen = []

    def objective(tag):
        def fn(logp, old_logp, adv, mask, **kw):
            seen.append((tag, old_logp.clone()))
            return ppo_clip_loss(logp, old_logp, adv, mask)

        return fn

    term = PolicyTerm(objective=objective("on"), aggregation=token_mean, replay_objective=objective("replay"))
    learner = tiny_learner({"policy": term})
    batch = _random_batch(4, seed=1)
    norm = Normalizers(num_rows=4, num_tokens=int(batch.response_mask.sum()), max_len=16)
    grads = {}
    for coef in (1.0, 0.25):
        learner.sil_coef = coef
        learner.model.zero_grad()
        mb = MiniBatch(micro_batches=[batch], kind="replay", norm=norm, iteration=3)
        loss, _ = learner._micro_loss(batch.cropped(), mb, 0)
        (loss * learner.sil_coef).backward()  # what training_step does for replay mini-batches
        grads[coef] = torch.cat([p.grad.flatten() for p in learner.model.parameters()])
    assert [tag for tag, _ in seen] == ["replay", "replay"]
    assert torch.equal(seen[0][1], batch.cropped().old_logp)  # the stored old log-probs, not recomputed
    assert torch.allclose(grads[0.25], 0.25 * grads[1.0], atol=1e-7)

    # Through a real SPEAR run: replay fires, and in each iteration replay steps come after on-policy ones.
    cfg = compose_cfg(
        tmp_path,
        [
            *TINY_RUN,
            "iterations=4",
            "+callbacks.log._target_=helpers.StepLog",
            f"+callbacks.log.out_dir={tmp_path}/steps",
        ],
    )
    _, objs = train(cfg)
    # rows enter the buffer with the old log-probs computed before the iteration's first update
    replay = objs["data"].replay
    assert replay.rows and len(replay.rows) == len(replay)  # one rank: every stored row's payload is here
    for item in replay.rows.values():
        m = item["response_mask"].bool()
        assert m.any() and (item["old_logp"][m] <= 0).all() and (item["old_logp"][m] < 0).any()
    import json

    log = json.loads((tmp_path / "steps" / "rank0.json").read_text())
    kinds = {int(t): [s.split(":")[0] for s in v] for t, v in log["steps"].items()}
    assert any("replay" in k for k in kinds.values()), kinds
    for k in kinds.values():
        assert k == sorted(k, key=lambda x: x == "replay"), k


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    base = [*TINY_RUN, "iterations=4", "callbacks.checkpoint.every_n_iterations=2"]
    _, full = train(compose_cfg(tmp_path / "full", base))
    ckpt = tmp_path / "full" / "checkpoints" / "iter_00002.ckpt"
    _, resumed = train(compose_cfg(tmp_path / "resumed", [*base, f"ckpt_path={ckpt}"]))

    a, b = full["learner"], resumed["learner"]
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
    sa, sb = a.optimizers().optimizer.state_dict(), b.optimizers().optimizer.state_dict()
    for k in sa["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(sa["state"][k][name]), torch.as_tensor(sb["state"][k][name]))
    da, db = full["data"], resumed["data"]
    assert da.iteration == db.iteration == 4
    assert repr(da.replay.state_dict()) == repr(db.replay.state_dict())
    assert da.baseline.state_dict() == db.baseline.state_dict()
    assert da.tool_reward_weight == db.tool_reward_weight and a.sil_coef == b.sil_coef
    assert full["trainer"].global_step == resumed["trainer"].global_step


def test_checkpoints_follow_their_cadence_and_only_the_newest_numbered_ones_are_kept(tmp_path, monkeypatch):
    import callbacks.checkpoint as cb
    from spear_lit.training.checkpoints import read_checkpoint

    saved, real = [], cb.save_checkpoint  # the real save, recorded: (iteration in the file, file name)

    def recording(trainer, path):
        real(trainer, path)
        saved.append((read_checkpoint(path)["spear_lit"]["iteration"], path.name))

    monkeypatch.setattr(cb, "save_checkpoint", recording)
    cadence = ["every_n_iterations=2", "last_every_n_iterations=3", "keep_last_n=1"]
    train(compose_cfg(tmp_path, [*TINY_RUN, "iterations=5", *(f"callbacks.checkpoint.{c}" for c in cadence)]))
    assert saved == [(2, "iter_00002.ckpt"), (3, "last.ckpt"), (4, "iter_00004.ckpt"), (5, "last.ckpt")]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_00004.ckpt", "last.ckpt"]

    with pytest.raises(Exception, match="keep_last_n must be >= 0 and last_every_n_iterations >= 1"):
        train(compose_cfg(tmp_path / "bad", [*TINY_RUN, "callbacks.checkpoint.last_every_n_iterations=0"]))


def test_non_finite_loss_skips_the_step_and_is_counted():
    learner = tiny_learner({"policy": PolicyTerm(objective=ppo_clip_loss, aggregation=token_mean)})
    learner.optimizer_factory = lambda p: torch.optim.AdamW(p, lr=1e-2)
    batch = _random_batch(4, seed=2)
    batch.old_logp[:] = float("nan")
    before = [p.detach().clone() for p in learner.model.parameters()]
    norm = Normalizers(num_rows=4, num_tokens=int(batch.response_mask.sum()), max_len=16)
    trainer = instantiate(
        {
            "_target_": "lightning.pytorch.Trainer",
            "accelerator": "cpu",
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "max_epochs": 1,
        }
    )
    mb = MiniBatch(micro_batches=[batch], kind="on_policy", norm=norm, iteration=1)
    mb.iteration_record = None

    import lightning as L

    class One(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader([mb], batch_size=None, collate_fn=lambda x: x)

    trainer.fit(learner, datamodule=One())
    assert learner.skipped_steps == 1
    for p, q in zip(before, learner.model.parameters()):
        assert torch.equal(p, q)


def test_kl_term_keeps_a_frozen_reference_and_is_zero_at_the_start():
    from spear_lit.training import KLTerm

    learner = tiny_learner(
        {
            "policy": PolicyTerm(objective=ppo_clip_loss, aggregation=token_mean),
            "kl": KLTerm(coef=0.1, aggregation=token_mean),
        }
    )
    assert learner.ref_model is not None
    assert all(not p.requires_grad for p in learner.ref_model.parameters())
    batch = _random_batch(4, seed=3)
    norm = Normalizers(num_rows=4, num_tokens=int(batch.response_mask.sum()), max_len=16)
    mb = MiniBatch(micro_batches=[batch], kind="on_policy", norm=norm, iteration=1)
    _, metrics = learner._micro_loss(batch.cropped(), mb, 0)
    assert metrics["loss/kl"] == 0.0  # k3(ref = logp) = e^0 - 0 - 1 = 0
    with torch.no_grad():
        next(learner.model.parameters()).add_(0.05)
    _, metrics = learner._micro_loss(batch.cropped(), mb, 0)
    assert metrics["loss/kl"] > 0  # k3 >= 0 once the policy moves
