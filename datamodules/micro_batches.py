"""A rank's rows of one optimizer step split into micro-batches (memory only: the step's normalizers are
global, SPEAR_SPEC §3.5, so any split gives the same gradient), as many on every rank: a forward/backward
is a collective under FSDP2 and DeepSpeed, and a rank with fewer would leave the others waiting."""

from __future__ import annotations

import math

from spear_lit.batch import TokenBatch
from spear_lit.training.dist import all_reduce


def split(batch: TokenBatch, rows: int, tokens: int | None, pad_id: int) -> list[TokenBatch]:
    """Consecutive rows, ``rows`` per micro-batch, or (``tokens`` not None) up to ``tokens`` prompt +
    response tokens each (:func:`token_chunks`); the count is the largest over ranks, at least one, and a
    rank's surplus micro-batches are one fully masked row each (:func:`dummy`)."""
    parts = token_chunks(batch, tokens) if tokens is not None else row_chunks(batch, rows, at_least=1)
    return [p if len(p) else dummy(pad_id) for p in parts]


def row_chunks(batch: TokenBatch, size: int, *, at_least: int) -> list[TokenBatch]:
    """Consecutive chunks of ``size`` rows, as many on every rank as the rank that needs the most
    (at least ``at_least``): the surplus chunks are empty."""
    count = int(all_reduce([max(at_least, math.ceil(len(batch) / size))], "max")[0])
    return [batch.select(list(range(i * size, min(len(batch), (i + 1) * size)))) for i in range(count)]


def token_chunks(batch: TokenBatch, budget: int) -> list[TokenBatch]:
    """Consecutive chunks of at most ``budget`` tokens each (prompt + response; a row over the budget is a
    chunk of its own), as many on every rank as the rank that needs the most: the surplus chunks are empty."""
    bounds, used = [0], 0
    for i, n in enumerate(batch.attention_mask.sum(1).tolist()):
        if used and used + n > budget:
            bounds.append(i)
            used = 0
        used += n
    bounds.append(len(batch))
    own = [list(range(a, z)) for a, z in zip(bounds[:-1], bounds[1:]) if z > a] or [[]]
    count = int(all_reduce([len(own)], "max")[0])
    return [batch.select(own[i] if i < len(own) else []) for i in range(count)]


def dummy(pad_id: int) -> TokenBatch:
    """A one-row, fully masked micro-batch: keeps forward/backward counts equal across ranks."""
    b = TokenBatch.from_rows(
        [{"prompt_ids": [pad_id], "response_ids": [pad_id], "response_mask": [0], "sampler_logp": [0.0]}],
        pad_id,
    )
    b.dummy = True
    return b
