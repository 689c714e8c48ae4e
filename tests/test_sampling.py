"""Exact sampling: rollout engines draw from softmax(z/T) (with top-p), whatever the checkpoint says.

The loss takes old log-probs as ``log_softmax(z / T)`` of the model with dropout off (SPEAR_SPEC §1), so
the engine must sample from exactly that distribution. A checkpoint's ``generation_config.json`` (Qwen2.5-
Instruct ships ``repetition_penalty`` 1.05-1.1, ``top_k`` 20, ``top_p`` 0.8) and transformers' own defaults
(``top_k=50``) must not leak into ``generate()``. The checkpoint built here sets all of those plus attention
dropout; we compare the empirical first-token frequencies of many samples with the model's probabilities.

The vLLM engine is checked with the same checkpoint and bound in tests/test_vllm_engine.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from spear_lit.policy import PolicySource
from spear_lit.policy.source import save_hf
from spear_lit.rollout import HFEngine

SAMPLES = 6000
DELTA = 1e-6  # probability that a correct engine fails the bound


def sampling_checkpoint(path: str | Path) -> Path:
    """A tiny Qwen2 (head_dim 32, so vLLM-CPU runs it too) whose generation config asks for everything an
    engine must ignore, with attention dropout 0.3; tied embeddings x3 make the next-token distribution
    peaked enough (entropy ~3.8 nats) that a repetition penalty visibly moves it."""
    src = PolicySource(
        None,
        tiny={
            "hidden_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_hidden_layers": 2,
            "intermediate_size": 256,
            "attention_dropout": 0.3,
        },
        init_seed=3,
    )
    model = src.model()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3.0)
    g = model.generation_config
    g.repetition_penalty, g.no_repeat_ngram_size, g.top_k, g.top_p, g.temperature = 1.1, 2, 20, 0.8, 0.7
    g.do_sample = True
    return save_hf(model, src.tokenizer(), path)


@torch.no_grad()
def probe_prompt(model, tokenizer, extend: int = 12) -> list[int]:
    """A fixed question continued by the model's own argmax for ``extend`` tokens: the prompt then holds
    the tokens the model likes next, which is what a repetition penalty or no-repeat-ngram rule acts on."""
    ids = tokenizer("What is 12 + 34?", add_special_tokens=False)["input_ids"]
    was = model.training
    model.eval()
    for _ in range(extend):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    model.train(was)
    return ids


@torch.no_grad()
def target_probs(model, prompt: list[int], temperature: float, top_p: float) -> torch.Tensor:
    """softmax(z/T) of the next token in eval mode, restricted to the smallest top set of mass >= top_p
    (the nucleus), renormalised: ``[V]``."""
    was = model.training
    model.eval()
    z = model(torch.tensor([prompt])).logits[0, -1].double() / temperature
    model.train(was)
    p = torch.softmax(z, -1)
    order = p.argsort(descending=True)
    above = p[order].cumsum(0) - p[order]  # mass of the strictly more likely tokens
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[above < top_p]] = True
    p = torch.where(keep, p, 0.0)
    return p / p.sum()


def frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


def buckets(p: torch.Tensor, min_prob: float = 1e-3) -> list[torch.Tensor]:
    """Token sets compared: each token with probability >= ``min_prob`` alone, all others together."""
    big = (p >= min_prob).nonzero().flatten()
    return [t.view(1) for t in big] + [(p < min_prob).nonzero().flatten()]


def tv(a: torch.Tensor, b: torch.Tensor, sets: list[torch.Tensor]) -> float:
    """Total variation between ``a`` and ``b`` on the partition ``sets`` (a lower bound of the full TV)."""
    return 0.5 * sum(abs(float(a[s].sum() - b[s].sum())) for s in sets)


def tv_bound(p: torch.Tensor, sets: list[torch.Tensor], n: int, delta: float = DELTA) -> float:
    """What the bucketed TV between ``n`` i.i.d. draws from ``p`` and ``p`` exceeds with probability
    < ``delta``: E[TV] <= 1/2 sum_b sqrt(p_b(1-p_b)/n) (Jensen per bucket), plus McDiarmid's deviation
    sqrt(ln(1/delta) / 2n) (one draw moves TV by at most 1/n)."""
    pb = torch.stack([p[s].sum() for s in sets])
    return 0.5 * float(torch.sqrt(pb * (1 - pb) / n).sum()) + math.sqrt(math.log(1 / delta) / (2 * n))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return sampling_checkpoint(tmp_path_factory.mktemp("sampling_ckpt"))


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_hf_engine_samples_exactly_softmax_over_temperature_with_top_p(ckpt, temperature, top_p):
    src = PolicySource(str(ckpt))
    model, tok = src.model().train(), src.tokenizer()  # as the learner holds it: train mode, dropout 0.3
    assert model.generation_config.repetition_penalty == 1.1 and model.config.attention_dropout == 0.3
    prompt = probe_prompt(model, tok)
    p = target_probs(model, prompt, temperature, top_p)
    sets = buckets(p)
    eng = HFEngine(max_batch_size=2000)
    eng.bind(model, tok)
    modes = []  # dropout's effect is below this sample size's resolution: check the mode of every forward
    hook = model.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    torch.manual_seed(0)
    out = eng.generate([prompt] * SAMPLES, max_new_tokens=[1] * SAMPLES, temperature=temperature, top_p=top_p)
    hook.remove()
    assert modes and not any(modes), "generate() ran with dropout on"
    f = frequencies([o[0] for o in out], len(p))
    bound = tv_bound(p, sets, SAMPLES)
    assert tv(f, p, sets) < bound, (tv(f, p, sets), bound)
    assert model.training and model.generation_config.repetition_penalty == 1.1  # both restored
    # Power: what the old engine sampled (the checkpoint's repetition penalty and no-repeat rule leaking
    # into generate()) is far outside the bound, so this test fails on the old behaviour.
    torch.manual_seed(0)
    with torch.no_grad():
        model.eval()
        ids = torch.tensor([prompt] * (SAMPLES // 3))
        old = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=1,
            do_sample=True,
            temperature=temperature,
            top_p=None if top_p >= 1 else top_p,
            top_k=None,
            pad_token_id=tok.pad_token_id,
        )
    f_old = frequencies(old[:, -1].tolist(), len(p))
    old_bound = tv_bound(p, sets, SAMPLES // 3)  # measured: TV 0.42 (T=1) and 0.95 (T=0.7, top-p 0.9)
    assert tv(f_old, p, sets) > 2 * old_bound, (tv(f_old, p, sets), old_bound)


def test_hf_engine_greedy_is_the_argmax_despite_the_checkpoint_config(ckpt):
    src = PolicySource(str(ckpt))
    model, tok = src.model(), src.tokenizer()
    prompt = probe_prompt(model, tok)
    eng = HFEngine()
    eng.bind(model, tok)
    out = eng.generate([prompt], max_new_tokens=[6], greedy=True)[0]
    ids = list(prompt)
    with torch.no_grad():  # argmax step by step, no penalty: the continuation the spec defines
        for _ in range(len(out)):
            ids.append(int(model.eval()(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == tok.eos_token_id:
                break
    assert out == ids[len(prompt) :]


def test_old_logprobs_are_computed_with_dropout_off(ckpt):
    from spear_lit.batch import TokenBatch
    from spear_lit.training.module import PolicyLearner

    learner = PolicyLearner(
        PolicySource(str(ckpt)), {"none": lambda *a, **k: None}, lambda p: torch.optim.SGD(p, lr=0.0)
    )
    learner.configure_model()
    assert learner.model.training  # the learner holds the policy in train mode
    tok = PolicySource(str(ckpt)).tokenizer()
    prompt = probe_prompt(learner.model, tok)
    row = {
        "prompt_ids": prompt[:-5],
        "response_ids": prompt[-5:],
        "response_mask": [1] * 5,
        "old_logp": [0.0] * 5,
    }
    batch = TokenBatch.from_rows([row, row], pad_id=tok.pad_token_id, advantages=torch.zeros(2))
    torch.manual_seed(0)
    a, b = (learner.old_logprobs([batch])[0] for _ in range(2))
    learner.model.eval()
    with torch.no_grad():
        want, _ = learner.token_stats(batch.cropped(), entropy=False)
    learner.model.train()
    assert torch.allclose(a[:, :5], want, atol=1e-6) and torch.equal(a, b)
    assert learner.model.training


def test_the_rl_learner_trains_without_dropout(ckpt):
    """The update's log-probs must come from the distribution that sampled (and gave old_logp): dropout off."""
    from spear_lit.training.module import PolicyLearner

    learner = PolicyLearner(
        PolicySource(str(ckpt)), {"none": lambda *a, **k: None}, lambda p: torch.optim.SGD(p, lr=0.0)
    )
    learner.configure_model()
    assert learner.model.training  # train mode, yet deterministic
    tok = PolicySource(str(ckpt)).tokenizer()
    ids = torch.tensor([probe_prompt(learner.model, tok)])
    a, b = (learner.model(input_ids=ids).logits for _ in range(2))
    assert torch.equal(a, b)


def test_preallocated_kv_cache_decodes_exactly_like_transformers_default(ckpt):
    """Greedy continuations of left-padded prompts of different lengths are identical with the engine's
    preallocated cache and with transformers' concatenating DynamicCache, also when a layer outgrows its
    first buffer (capacity 3: reallocated while decoding), and through the engine, which prefills each
    distinct prompt once and copies its cache out to the rows that share it."""
    from transformers import GenerationConfig
    from transformers.cache_utils import Cache, DynamicCache

    from spear_lit.rollout.hf_engine import PreallocatedLayer

    src = PolicySource(str(ckpt))
    model, tok = src.model().eval(), src.tokenizer()
    prompts = [tok(q, add_special_tokens=False)["input_ids"] for q in ("What is 12 + 34?", "Hi", "2*3=")]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    eng = HFEngine()
    eng.bind(model, tok)
    config = GenerationConfig(  # plain greedy: nothing of the checkpoint's generation config
        do_sample=False, max_new_tokens=20, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    outs = []
    model.generation_config = GenerationConfig()
    for cache in (
        DynamicCache(),
        Cache(layers=[PreallocatedLayer(width + 20) for _ in range(2)]),
        Cache(layers=[PreallocatedLayer(3) for _ in range(2)]),
    ):
        with torch.no_grad():
            outs.append(
                model.generate(
                    input_ids=ids, attention_mask=mask, generation_config=config, past_key_values=cache
                ).tolist()
            )
    assert outs[0] == outs[1] == outs[2]
    assert min(len(o) for o in outs[0]) > width + 5  # it did decode, past the small buffer
    # the engine: shared prompts prefilled once per distinct prompt, then decoded on the copied cache
    got = eng.generate([*prompts, *prompts[::-1]], max_new_tokens=[20] * 6, greedy=True)
    want = []
    for row in outs[0]:
        row = row[width:]
        want.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    assert got == [*want, *want[::-1]]
    # rows in blocks that share a prompt: each prompt's cache kept once, read once per block (cascade decode)
    got = eng.generate([p for p in prompts for _ in range(3)], max_new_tokens=[20] * 9, greedy=True)
    assert got == [w for w in want for _ in range(3)]
