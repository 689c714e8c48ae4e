"""What bench/long_rows.py and bench/learner_cost.py share: a tiny policy whose LM head matters, the
full-vocabulary computation the learner did before chunked log-probs, and one measured forward+backward."""

from __future__ import annotations

import resource
import statistics
import time


def tiny_policy(hidden: int, layers: int, vocab: int, max_positions: int):
    """A random Qwen2 (4 heads, 2 key/value heads, MLP 2 x hidden) in training mode, one thread."""
    import torch

    from spear_lit.policy import PolicySource

    torch.set_num_threads(1)
    tiny = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
    )
    return PolicySource(tiny=tiny).model().train()


def full_vocab_stats(model, b, temperature: float = 1.0):
    """Before chunking: ``[n, T, V]`` logits of the response positions in fp32, log-probs and entropy with
    gradient over all of them."""
    from spear_lit.algos import entropy_from_logits, logprobs_from_logits
    from spear_lit.batch import position_ids

    logits = model(
        input_ids=b.input_ids,
        attention_mask=b.attention_mask,
        position_ids=position_ids(b.attention_mask),
        use_cache=False,
        logits_to_keep=b.response_width + 1,
    ).logits[:, :-1]
    logits = logits.float() / temperature
    return logprobs_from_logits(logits, b.input_ids[:, b.prompt_width :]), entropy_from_logits(logits)


def measure(model, b, step, reps: int) -> tuple[int, list[float]]:
    """``(peak bytes, seconds per rep)`` of ``reps`` forward+backward passes of ``step() -> (logp, ent)``
    with a token-mean policy loss, as the policy term does; the peak is the RSS high-water mark after the
    reps minus the one before them."""
    mask = b.response_mask
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        logp, ent = step()
        loss = -(logp * mask).sum() / mask.sum()
        float((ent.detach() * mask).sum())  # the entropy metric; the tensor dies before the backward
        del logp, ent
        loss.backward()
        times.append(time.perf_counter() - start)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, times


median = statistics.median
