"""Ulysses sequence parallelism (``trainer.strategy.sequence_parallel_size``; DeepSpeed-Ulysses, verl's
scheme): the ranks of a sequence-parallel group run one packed micro-batch together, each on a contiguous
slice of its tokens, and exchange attention heads around attention with two all-to-alls.

Inside a decoder layer everything but attention is per token, so each rank computes its slice alone.
Around attention (:func:`spear_lit.policy.attention.ulysses`), ``q, k, v [1, H, S/s, d]`` become
``[1, H/s, S, d]`` (each rank: all tokens, ``1/s`` of the heads; :func:`seq_to_heads`), the rows'
causal attention runs on them (one SDPA per packed row), and the output goes back to ``[1, S/s, H, d]``
(:func:`heads_to_seq`). Activation memory per rank is ``1/s`` of the micro-batch's. RoPE positions are
each token's own (the slice's packed ``position_ids``).

**What the data layer does with the group: nothing.** Every rank keeps its own rows, as without sequence
parallelism, so decisions, normalizers and rank-count invariance are untouched. The group instead takes
turns (:func:`members`): for each micro-batch index ``k`` it gathers its members' ``k``-th micro-batches
(token ids, masks: small) and runs each of them split across the group. Every rank computes every
member's loss (the same number on all of them, from all-gathered log-probs) scaled by ``1/s``; the
all-gather's backward sums the group's gradients, so each member's loss contributes exactly its gradient
once. Only the owner's metrics and old log-probs are kept. Total compute is unchanged; what a rank holds
at a time is a slice of one micro-batch. The model's attention and key/value heads must divide by ``s``.

The FSDP2 mesh still spans all ranks (parameters are sharded over everyone); the sequence-parallel
groups are consecutive ranks (``[0..s-1], [s..2s-1], ...``, so a group sits within a node).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from spear_lit.batch import TokenBatch
from spear_lit.policy import attention
from spear_lit.training import packing
from spear_lit.training.dist import world


@dataclass
class SPGroup:
    """This rank's sequence-parallel group: ``size`` consecutive ranks, this one ``rank`` among them."""

    group: dist.ProcessGroup
    size: int
    rank: int


def group_of(strategy, model: torch.nn.Module) -> SPGroup | None:
    """The group ``strategy.sequence_parallel_size`` asks for (None for 1), created on every rank (each
    ``new_group`` is a collective over the world); checks that ``model``'s heads divide by the size."""
    size = int(getattr(strategy, "sequence_parallel_size", 1) or 1)
    if size == 1:
        return None
    rank, ws = world()
    if ws % size:
        raise ValueError(
            f"trainer.strategy.sequence_parallel_size={size} must divide the number of ranks ({ws})"
        )
    cfg = model.config.get_text_config()
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if heads % size or kv % size:
        raise ValueError(
            f"trainer.strategy.sequence_parallel_size={size} must divide the model's attention heads "
            f"({heads}) and key/value heads ({kv}): each rank of a group takes 1/{size} of them"
        )
    mine = None
    for first in range(0, ws, size):
        ranks = list(range(first, first + size))
        pg = dist.new_group(ranks)
        if rank in ranks:
            mine = SPGroup(pg, size, rank - first)
    return mine


def members(b: TokenBatch, sp: SPGroup | None, device) -> Iterator[tuple[TokenBatch, bool, float]]:
    """``(micro-batch on device, is it this rank's own, loss weight)`` for each member of the group, in group
    order (the same on all of them): the group's micro-batches of one index (``b``: this rank's, on the
    host), each to be run split across the group. Without sequence parallelism: ``b`` alone, weight 1."""
    if sp is None:
        yield b.to(device), True, 1.0
        return
    gathered = [None] * sp.size
    dist.all_gather_object(gathered, b, group=sp.group)  # host tensors: no device index travels
    for j, m in enumerate(gathered):
        yield m.to(device), j == sp.rank, 1.0 / sp.size


def response_token_stats(
    model: torch.nn.Module,
    b: TokenBatch,
    sp: SPGroup,
    *,
    temperature: float = 1.0,
    entropy: bool = True,
    entropy_grad: bool = False,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`spear_lit.training.logprobs.response_token_stats` of ``b`` (the same micro-batch on every rank
    of ``sp``), its packed rows split along the sequence across the group. Every rank returns the whole
    ``logp [n, T]`` (and entropy), with a gradient that reaches every rank's slice."""
    from spear_lit.training import logprobs  # logprobs imports packing: not at the top

    p = packing.pack(b)
    s = sp.size
    pad = (-p.tokens) % s  # padded to a multiple of s, as a row of its own (attends to itself only)
    ids = F.pad(p.input_ids, (0, pad), value=0)
    positions = torch.cat([p.position_ids, torch.arange(pad, device=ids.device).unsqueeze(0)], 1)
    cu = torch.cat([p.cu_seqlens, p.cu_seqlens.new_tensor([ids.shape[1]])]) if pad else p.cu_seqlens
    per = ids.shape[1] // s
    lo, hi = sp.rank * per, (sp.rank + 1) * per
    labels = torch.cat([ids[0, 1:], ids.new_zeros(1)])  # position i predicts token i + 1
    with logprobs.head_inputs(model) as seen:
        model(
            input_ids=ids[:, lo:hi],
            position_ids=positions[:, lo:hi],
            attention_mask={"full_attention": None},
            use_cache=False,
            logits_to_keep=0,
            **{attention.SEQUENCE_PARALLEL: (sp.group, s, cu)},
        )
    logp, ent = logprobs.head_stats(
        model,
        seen[0][0],
        labels[lo:hi],
        temperature=temperature,
        chunk_size=chunk_size,
        entropy=entropy,
        entropy_grad=entropy_grad,
    )
    valid = b.attention_mask[:, b.prompt_width :].bool()

    def rows(t):  # this rank's slice -> all the group's, then the response positions, in the [n, T] layout
        return logprobs.to_rows(valid, _gather(t, sp)[p.predictors])

    return rows(logp), None if ent is None else rows(ent)


def _gather(t: torch.Tensor, sp: SPGroup) -> torch.Tensor:
    """The group's slices, concatenated in rank order; differentiable where ``t`` needs a gradient (the
    backward sums the group's gradients and hands each rank its slice's)."""
    if t.requires_grad:
        return funcol.wait_tensor(funcol.all_gather_single_autograd(t.contiguous(), 0, sp.group))
    return funcol.wait_tensor(funcol.all_gather_single(t.contiguous(), 0, sp.group))


def seq_to_heads(t: torch.Tensor, s: int, group) -> torch.Tensor:
    """``[1, h, S/s, d]`` (this rank's tokens, all heads) -> ``[1, h/s, S, d]`` (all tokens, this rank's heads)."""
    _, h, c, d = t.shape
    x = t[0].reshape(s, h // s, c, d).contiguous()  # head chunk i goes to rank i
    y = funcol.wait_tensor(funcol.all_to_all_single_autograd(x, None, None, group))  # y[i]: rank i's tokens
    return y.permute(1, 0, 2, 3).reshape(1, h // s, s * c, d)


def heads_to_seq(t: torch.Tensor, s: int, group) -> torch.Tensor:
    """``[1, h/s, S, d]`` -> ``[1, h, S/s, d]``: the inverse of :func:`seq_to_heads`."""
    _, hs, S, d = t.shape
    x = t[0].reshape(hs, s, S // s, d).permute(1, 0, 2, 3).contiguous()  # token chunk i goes to rank i
    y = funcol.wait_tensor(funcol.all_to_all_single_autograd(x, None, None, group))  # y[i]: head chunk i
    return y.reshape(1, hs * s, S // s, d)
