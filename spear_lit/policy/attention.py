"""``attn_implementation="sdpa"`` as the policy runs it: transformers' SDPA attention, with CPU paths
that compute the same attention faster on small-head models (the tiny policies; bench/vs_trl.py).

* **Grouped-query heads without copies.** transformers repeats every key/value head ``H / Hkv`` times
  before SDPA whenever a mask is given (CUDA kernels fall back to math otherwise); the CPU kernel takes
  ``enable_gqa`` with a mask, so no copy is made and the backward does not sum the copies back.
* **Decode steps (one query token) as two batched matmuls.** The flash kernel is built for query blocks;
  for a single query token per row, ``softmax(q kᵀ / √d + mask) v`` over ``[B·Hkv]`` groups of ``H / Hkv``
  query heads is cheaper, and it reads the KV cache in place (a preallocated buffer's view).
* **Packed rows** (:func:`varlen_causal`): given flash-attention's ``cu_seq_lens_q`` and no mask, one
  causal SDPA per row of the packed sequence, none across rows (``data.micro_batch_tokens``).
* **Sequence parallelism** (:func:`ulysses`): all-to-alls around :func:`varlen_causal`.
* **Decode steps over a shared prompt** (:func:`cascade_decode`): when the HF engine keeps a group's
  prompt once in the cache (the forward gets it as the :data:`SHARED_PREFIX` keyword), the block's
  queries meet the prompt's keys/values in one product instead of every row reading its own copy.

Everything else (other devices, dropout, sliding windows, attention sinks, position biases) goes to
transformers' own ``sdpa_attention_forward``. :data:`NAME` is registered with transformers' attention and
mask interfaces on import; :class:`spear_lit.policy.PolicySource` builds models with it for ``sdpa``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "spear_sdpa"
SEQUENCE_PARALLEL = (
    "spear_sequence_parallel"  # forward kwarg: (group, size, cu_seqlens of the whole sequence)
)
SHARED_PREFIX = "spear_shared_prefix"  # forward kwarg: a cache whose layers share prompt prefixes per block


def cascade_attention(model: torch.nn.Module) -> bool:
    """Decode steps may read shared prompt prefixes (:func:`cascade_decode`): the model runs this module's
    attention (the only one that reads :data:`SHARED_PREFIX` caches), on CPU, where it was measured."""
    attn = getattr(model.config.get_text_config(), "_attn_implementation", None)
    return attn == NAME and next(model.parameters()).device.type == "cpu"


def spear_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``query [B, H, q, d]``, ``key``/``value [B, Hkv, k, d]``, mask ``[B, 1, q, k]`` bool or additive (or
    None): returns ``[B, q, H, d]`` as transformers' attention functions do."""
    sp = kwargs.get(SEQUENCE_PARALLEL)
    if sp is not None:
        return ulysses(query, key, value, sp, d_scale(query, scaling)), None
    shared = kwargs.get(SHARED_PREFIX)
    if shared is not None and query.shape[2] == 1:
        return cascade_decode(shared.layers[module.layer_idx], query, attention_mask, scaling), None
    special = (
        dropout
        or kwargs.get("sliding_window")
        or any(kwargs.get(k) is not None for k in ("s_aux", "position_bias", "cache"))
    )
    if query.device.type != "cpu" or special or key.shape[-1] != value.shape[-1]:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    b, h, q_len, d = query.shape
    hkv, k_len = key.shape[1], key.shape[2]
    scale = d**-0.5 if scaling is None else scaling
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and attention_mask is None and b == 1 and q_len == k_len:
        return varlen_causal(query, key, value, cu, scale), None
    if q_len == 1:
        g = h // hkv  # query heads of one KV head are consecutive (repeat_kv's order)
        scores = torch.bmm(query.reshape(b * hkv, g, d), key.reshape(b * hkv, k_len, d).transpose(1, 2))
        scores = scores.view(b, hkv, g, k_len).mul_(scale)
        if attention_mask is not None:
            mask = attention_mask.reshape(attention_mask.shape[0], 1, 1, k_len)  # batch b or 1 (broadcast)
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
        out = torch.bmm(probs.view(b * hkv, g, k_len), value.reshape(b * hkv, k_len, d))
        return out.view(b, 1, h, d), None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        scale=scale,
        is_causal=bool(causal and attention_mask is None),
        enable_gqa=hkv != h,
    )
    return out.transpose(1, 2).contiguous(), None


def d_scale(query: torch.Tensor, scaling: float | None) -> float:
    return query.shape[-1] ** -0.5 if scaling is None else scaling


def ulysses(query, key, value, sp, scale: float) -> torch.Tensor:
    """Sequence-parallel attention (:mod:`spear_lit.training.sequence_parallel`): this rank holds ``1/s`` of a
    packed sequence's tokens (``query [1, H, S/s, d]``); an all-to-all gives it all tokens of ``1/s`` of the
    heads, the packed rows attend causally within themselves (:func:`varlen_causal`, ``cu_seqlens`` of the
    whole sequence), and a second all-to-all returns this rank's tokens with every head: ``[1, S/s, H, d]``."""
    from spear_lit.training.sequence_parallel import heads_to_seq, seq_to_heads

    group, s, cu_seqlens = sp
    q, k, v = (seq_to_heads(t, s, group) for t in (query, key, value))
    out = varlen_causal(q, k, v, cu_seqlens, scale)  # [1, S, H/s, d]
    return heads_to_seq(out.transpose(1, 2), s, group).transpose(1, 2).contiguous()


def varlen_causal(query, key, value, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """Packed rows (:mod:`spear_lit.training.packing`): ``query [1, H, S, d]``, ``key``/``value
    [1, Hkv, S, d]`` hold several rows back to back, row ``i`` at ``cu_seqlens[i]:cu_seqlens[i+1]``; each row
    attends causally to itself only, by one SDPA per row (no ``[S, S]`` mask). Returns ``[1, S, H, d]``."""
    bounds = cu_seqlens.tolist()
    gqa = key.shape[1] != query.shape[1]
    outs = [
        F.scaled_dot_product_attention(
            query[:, :, a:z], key[:, :, a:z], value[:, :, a:z], scale=scale, is_causal=True, enable_gqa=gqa
        )
        for a, z in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, 2).transpose(1, 2).contiguous()


def cascade_decode(layer, query: torch.Tensor, attention_mask, scaling: float | None) -> torch.Tensor:
    """One decode step's attention over a cache whose rows come in blocks of ``G`` that share a prompt
    (:meth:`spear_lit.rollout.hf_engine.PreallocatedLayer.share_prefix`): each block's queries meet its
    prompt's keys/values in one product (read once per block, not once per row), each row's own suffix
    in a per-row product, under one softmax. ``query [B, H, 1, d]`` with rows block-major; returns
    ``[B, 1, H, d]``."""
    pk, pv = layer.prefix_keys, layer.prefix_values  # [P, Hkv, Lp, d]
    sk, sv = layer.keys, layer.values  # [P, Hkv, G, Ls, d]
    p, hkv, lp, d = pk.shape
    grp, ls = sk.shape[2], sk.shape[3]
    b, h = query.shape[:2]
    g = h // hkv
    scale = d**-0.5 if scaling is None else scaling
    # queries block-major per KV head: [P, G, Hkv, g, d] -> [P*Hkv, G*g, d]
    q = query.view(p, grp, hkv, g, d).transpose(1, 2).reshape(p * hkv, grp * g, d)
    s1 = torch.bmm(q, pk.view(p * hkv, lp, d).transpose(1, 2))  # [P*Hkv, G*g, Lp]
    s2 = torch.bmm(q.view(p * hkv * grp, g, d), sk.reshape(p * hkv * grp, ls, d).transpose(1, 2))
    scores = torch.cat([s1, s2.view(p * hkv, grp * g, ls)], -1).mul_(scale)  # [P*Hkv, G*g, L]
    if attention_mask is not None:
        n = lp + ls
        mask = attention_mask.reshape(-1, n)
        mask = mask.view(p, 1, grp, 1, n) if mask.shape[0] == b else mask.view(1, 1, 1, 1, n)
        s5 = scores.view(p, hkv, grp, g, n)
        s5 = s5.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s5 + mask
        scores = s5.view(p * hkv, grp * g, n)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(pv.dtype)
    out = torch.bmm(probs[..., :lp], pv.view(p * hkv, lp, pv.shape[-1]))  # [P*Hkv, G*g, d]
    out = torch.baddbmm(
        out.view(p * hkv * grp, g, -1),
        probs[..., lp:].reshape(p * hkv * grp, g, ls),
        sv.reshape(p * hkv * grp, ls, sv.shape[-1]),
    )
    return out.view(p, hkv, grp, g, -1).transpose(1, 2).reshape(b, 1, h, -1)


AttentionInterface.register(NAME, spear_sdpa_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
