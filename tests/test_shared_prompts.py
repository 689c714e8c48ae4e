"""Rows with one prompt share one forward of it (``learner.share_prompts``): same logits, same gradients."""

from __future__ import annotations

import torch
from helpers import micro_grads, tiny_learner

from spear_lit.algos import ppo_clip_loss, seq_mean_token_sum_norm
from spear_lit.batch import MiniBatch, Normalizers, TokenBatch
from spear_lit.policy import PolicySource
from spear_lit.rollout import HFEngine
from spear_lit.training import EntropyTerm, PolicyLearner, PolicyTerm


def _grouped_batch(groups: int = 3, size: int = 4, seed: int = 0) -> TokenBatch:
    """``groups`` prompts of different lengths (so left padding differs), ``size`` responses of different
    lengths each, in shuffled row order."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for k in range(groups):
        prompt = torch.randint(0, 256, (3 + 2 * k,), generator=g).tolist()
        for _ in range(size):
            t = int(torch.randint(1, 10, (1,), generator=g))
            rows.append(
                {
                    "prompt_ids": prompt,
                    "response_ids": torch.randint(0, 256, (t,), generator=g).tolist(),
                    "response_mask": (torch.rand(t, generator=g) > 0.2).int().tolist(),
                    "old_logp": (-5.5 + 0.3 * torch.randn(t, generator=g)).tolist(),
                }
            )
    order = torch.randperm(len(rows), generator=g).tolist()
    rows = [rows[i] for i in order]
    return TokenBatch.from_rows(rows, pad_id=257, advantages=torch.randn(len(rows), generator=g))


def _forwards(learner, fn):
    """``fn()`` and the batch sizes of the model forwards it ran."""
    sizes = []
    hook = learner.model.register_forward_pre_hook(
        lambda m, args, kw: sizes.append(len(kw["input_ids"])), with_kwargs=True
    )
    try:
        return fn(), sizes
    finally:
        hook.remove()


def _terms() -> dict:
    return {
        "policy": PolicyTerm(
            objective=lambda *a: ppo_clip_loss(*a, clip_high=0.28), aggregation=seq_mean_token_sum_norm
        ),
        "entropy": EntropyTerm(coef=0.01, aggregation=seq_mean_token_sum_norm),
    }


def test_shared_prompt_forward_gives_the_same_logits_with_one_prompt_pass_per_group():
    learner = tiny_learner(_terms())
    batch = _grouped_batch().cropped()
    with torch.no_grad():
        shared, sizes = _forwards(learner, lambda: learner.response_logits(batch))
        assert sizes == [3, 12]  # the 3 distinct prompts once, then the 12 rows' responses on their cache
        learner.share_prompts = False
        plain, sizes = _forwards(learner, lambda: learner.response_logits(batch))
        assert sizes == [12]
    assert shared.shape == plain.shape == (12, batch.response_width, learner.model.config.vocab_size)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)


def test_shared_prompt_forward_gives_the_same_gradient():
    learner = tiny_learner(_terms())
    batch = _grouped_batch(seed=1)
    norm = Normalizers(num_rows=len(batch), num_tokens=int(batch.response_mask.sum()), max_len=16)
    parts = [batch.select(list(range(0, 7))), batch.select(list(range(7, 12)))]
    mb = MiniBatch(micro_batches=parts, kind="on_policy", norm=norm, iteration=1)
    shared = micro_grads(learner, mb)
    learner.share_prompts = False
    plain = micro_grads(learner, mb)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-7)


def test_distinct_prompts_take_the_single_forward():
    learner = tiny_learner(_terms())
    batch = _grouped_batch(groups=4, size=1).cropped()
    with torch.no_grad():
        _, sizes = _forwards(learner, lambda: learner.response_logits(batch))
    assert sizes == [4]


def test_models_with_other_than_full_attention_layers_take_the_single_forward():
    """Sliding-window (or linear-attention) layers keep other caches: no shared prompt pass for them."""
    learner = PolicyLearner(
        PolicySource(
            tiny={
                "hidden_size": 32,
                "intermediate_size": 64,
                "use_sliding_window": True,
                "sliding_window": 4,
                "max_window_layers": 1,
            }
        ),
        _terms(),
        lambda p: torch.optim.SGD(p, lr=0.0),
    )
    learner.configure_model()
    assert "sliding_attention" in learner.model.config.layer_types
    batch = _grouped_batch().cropped()
    with torch.no_grad():
        _, sizes = _forwards(learner, lambda: learner.response_logits(batch))
    assert sizes == [12]
    engine = HFEngine()  # and the engine decodes with transformers' own cache for it
    engine.bind(learner.model, learner.policy_source.tokenizer())
    out = engine.generate([[5, 6, 7]] * 2 + [[8, 9]], max_new_tokens=[6] * 3, greedy=True)
    assert out[0] == out[1] and all(len(o) >= 1 for o in out)
