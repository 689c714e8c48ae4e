"""Per-token log-probs and entropy of the response tokens, without full-vocabulary tensors.

A 16k-token row with a 152k vocabulary has 9.3 GiB of fp32 logits, and a log-softmax with gradient keeps
several such copies for its backward. Here the policy's forward stops before the LM head
(:func:`response_hidden`: final hidden states ``[n, T, H]``), and :func:`token_logprobs` runs the head on
``chunk_size`` positions at a time (all rows' valid positions flattened), each chunk's logits cast to
fp32 and divided by the temperature, then reduced to ``logp`` (and entropy) by the same
:func:`spear_lit.algos.logprobs_from_logits` / :func:`~spear_lit.algos.entropy_from_logits` as before.
With gradient, every chunk is a ``torch.utils.checkpoint``: the forward keeps only the chunk's hidden
states, the backward recomputes its logits. Peak memory is a few ``[chunk_size, V]`` tensors, whatever
the row length. Entropy is computed without gradient unless asked (``entropy_grad``): no SPEAR term but
the optional entropy bonus differentiates it.

FSDP2: the head's weight belongs to the root's parameter group (``fully_shard(model)``; tied to the
embedding for Qwen2). FSDP2 does not reshard the root after its forward (its default for the root,
which :meth:`PolicyModule.configure_model` keeps), so the head called after the forward, and again in
the backward's recomputation, finds its parameters unsharded; their gradients accumulate like any other
and are reduce-scattered by FSDP's end-of-backward callback. ZeRO-3 gathers the head at each call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from spear_lit.algos import entropy_from_logits, logprobs_from_logits
from spear_lit.batch import TokenBatch, distinct_prompts, position_ids
from spear_lit.policy import full_attention_only, is_sharded
from spear_lit.training import packing

CHUNK_SIZE = 1024  # positions per chunk: 1024 × 152k fp32 logits = 0.6 GiB


def response_token_stats(
    model: torch.nn.Module,
    b: TokenBatch,
    *,
    temperature: float = 1.0,
    share_prompts: bool = True,
    entropy: bool = True,
    entropy_grad: bool = False,
    chunk_size: int = CHUNK_SIZE,
    packed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``logp [n, T]`` of the response tokens of ``b`` under ``model`` and their entropy ``[n, T]`` (or None),
    both of ``logits / temperature``; 0 at padding positions (right of each response), which cost nothing.
    fp32 for half-precision models, the model's dtype otherwise. See :func:`token_logprobs`. With
    ``packed``, the forward runs on the rows concatenated without padding (:mod:`.packing`; prompts are
    then not shared)."""
    P = b.prompt_width
    valid = b.attention_mask[:, P:].bool()  # [n, T]
    if packed:
        hidden = packing.packed_hidden(model, b)  # [R, H]: the valid positions only
    else:
        # [n, T, H] -> [R, H], by an integer index from the host mask (also what fake tensors can run: plan.py)
        hidden = response_hidden(model, b, share_prompts).flatten(0, 1)[valid.flatten().nonzero().squeeze(1)]
    logp, ent = head_stats(
        model,
        hidden,
        b.input_ids[:, P:][valid],
        temperature=temperature,
        chunk_size=chunk_size,
        entropy=entropy,
        entropy_grad=entropy_grad,
    )
    return to_rows(valid, logp), None if ent is None else to_rows(valid, ent)


def head_stats(
    model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, **kw
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`token_logprobs` with ``model``'s LM head and its final logit soft-capping, if any: ``hidden [N, H]``,
    ``labels [N]`` → ``logp [N]``, entropy ``[N]`` or None. ``kw``: :func:`token_logprobs`'s."""
    head = model.get_output_embeddings()
    if type(getattr(head, "weight", None)).__name__ == "DTensor":
        raise RuntimeError(
            "the LM head is sharded after the policy's forward: keep the FSDP2 root's parameters unsharded "
            "after forward (fully_shard(model) with reshard_after_forward left at its default)"
        )
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return token_logprobs(head, hidden, labels, softcap=softcap, **kw)


def to_rows(valid: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values [R]`` (one per ``True`` of ``valid [n, T]``, row by row) in the ``[n, T]`` layout, 0 elsewhere."""
    return values.new_zeros(valid.shape).masked_scatter(valid, values)


def token_logprobs(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int = CHUNK_SIZE,
    entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log_softmax(z)[label]`` and (with ``entropy``) ``H(softmax(z))`` of ``z = head(hidden) / temperature``,
    ``chunk_size`` positions at a time: ``hidden [N, H]``, ``labels [N]`` → ``logp [N]``, entropy ``[N]`` or None.

    ``head`` is called as a module (so ZeRO-3's hooks gather it). Under grad mode each chunk is
    checkpointed: nothing ``[N, V]``-sized is kept for the backward, which recomputes the chunk's logits.
    The entropy has no gradient unless ``entropy_grad``. ``softcap``: the model's final logit soft-capping
    (Gemma-style ``c·tanh(z/c)`` before the temperature), if it has one."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be at least 1")
    grad = torch.is_grad_enabled()
    args = (head, temperature, softcap, entropy, entropy_grad and grad)
    outs = []  # (no positions: torch.split gives one empty chunk, still connected to the graph)
    for h, y in zip(torch.split(hidden, chunk_size), torch.split(labels, chunk_size)):
        if grad:
            # Non-reentrant checkpoint stops recomputing once the saved tensors are back: the no-grad
            # entropy, computed after them, is not recomputed in the backward.
            outs.append(checkpoint(_chunk, h, y, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            outs.append(_chunk(h, y, *args))
    logp = torch.cat([o[0] for o in outs])
    return logp, torch.cat([o[1] for o in outs]) if entropy else None


def _chunk(h, y, head, temperature, softcap, entropy, entropy_grad):
    """One chunk: ``h [c, H]``, ``y [c]`` → ``(logp [c], entropy [c] or None)``."""
    z = head(h)  # [c, V]: the only vocabulary-wide tensors, one chunk at a time
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    z = z / temperature
    logp = logprobs_from_logits(z, y)
    if not entropy:
        return logp, None
    with torch.set_grad_enabled(entropy_grad):
        return logp, entropy_from_logits(z)


def response_hidden(model: torch.nn.Module, b: TokenBatch, share_prompts: bool = True) -> torch.Tensor:
    """Final hidden states ``[n, T, H]`` (after the last norm: what the LM head reads) of positions
    ``P-1 .. P+T-2``, the ones that predict the ``T`` response tokens. The LM head runs on none of them.

    With ``share_prompts``, rows whose prompts are identical (a GRPO group: G samples of one prompt) share
    one forward of that prompt: its keys/values are computed once per distinct prompt, indexed out to the
    rows, and the responses run on top of them. Same hidden states and gradients (the prompt's states get
    the sum of its rows' gradients through the index); the prompt's compute is paid once per group
    instead of once per row. Off under gradient checkpointing (no KV cache there), for models with other
    than full-attention layers, and for sharded models (FSDP2, ZeRO-3): there every forward is a
    collective, and ranks would disagree on how many to run."""
    P, T = b.prompt_width, b.input_ids.shape[1] - b.prompt_width
    if (
        share_prompts
        and T > 0
        and P > 0
        and not getattr(model, "is_gradient_checkpointing", False)
        and full_attention_only(model)
        and not is_sharded(model)
    ):
        first, inv = distinct_prompts(b.input_ids[:, :P], b.attention_mask[:, :P])
        if len(first) < len(b):
            return _shared_prompt_hidden(model, b, first, inv)
    with head_inputs(model) as seen:
        model(
            input_ids=b.input_ids,
            attention_mask=b.attention_mask,
            position_ids=position_ids(b.attention_mask),
            use_cache=False,
            logits_to_keep=T + 1,  # the head would see the last T+1 positions; the last predicts nothing
        )
    return seen[0][:, :-1]


def _shared_prompt_hidden(model, b: TokenBatch, first: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    P = b.prompt_width
    ids, mask = b.input_ids, b.attention_mask
    pos = position_ids(mask)
    with head_inputs(model) as seen:
        cache = model(
            input_ids=ids[first, :P],
            attention_mask=mask[first, :P],
            position_ids=pos[first, :P],
            use_cache=True,
            logits_to_keep=1,
        ).past_key_values
        for layer in cache.layers:  # each row gets its prompt's keys/values (a differentiable gather)
            layer.keys, layer.values = layer.keys[inv], layer.values[inv]
        if ids.shape[1] - P > 1:  # the last response token predicts nothing we need
            model(
                input_ids=ids[:, P:-1],
                attention_mask=mask[:, :-1],
                position_ids=pos[:, P:-1],
                past_key_values=cache,
                use_cache=True,
            )
    return torch.cat([seen[0][inv], *seen[1:]], 1)


@contextlib.contextmanager
def head_inputs(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside, each call of ``model``'s LM head appends its input ``[n, k, H]`` to the yielded list and
    computes nothing (the head gets an empty slice): the model's own forward, FSDP's and ZeRO's hooks
    included, runs as usual up to the head."""
    seen: list[torch.Tensor] = []

    def hook(module, args):
        seen.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
