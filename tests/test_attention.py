"""The policy's ``sdpa`` attention (spear_lit.policy.attention) is the same attention as transformers' eager
one: logits of left-padded prompts, every decode step on a preallocated KV cache, and gradients, for grouped
(4 query heads on 2 KV heads) and plain multi-head attention."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import Cache

from spear_lit.policy import PolicySource
from spear_lit.rollout.hf_engine import PreallocatedLayer


def _pair(kv_heads: int):
    tiny = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": 2,
    }
    fast = PolicySource(None, tiny=tiny, init_seed=1).model()
    eager = PolicySource(None, tiny=tiny, init_seed=1, attn_implementation="eager").model()
    assert fast.config._attn_implementation == "spear_sdpa"
    assert eager.config._attn_implementation == "eager"
    return fast, eager


def _padded(n: int = 5, width: int = 20):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (n, width), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 7, 0, 2, 13][:n]):
        mask[row, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_prefill_logits_and_gradients_equal_eager(kv_heads):
    fast, eager = _pair(kv_heads)
    ids, mask = _padded()
    for m in (fast, eager):
        out = m(input_ids=ids, attention_mask=mask).logits
        out[mask.bool()].logsumexp(-1).sum().backward()
        m.out = out.detach()
    valid = mask.bool()
    assert (fast.out - eager.out)[valid].abs().max() < 1e-5
    for (name, a), b in zip(fast.named_parameters(), eager.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    # no padding at all: the causal path (no mask) too
    a, b = fast(input_ids=ids).logits, eager(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("kv_heads", [2, 4])
@torch.no_grad()
def test_decode_steps_on_a_preallocated_cache_equal_eager(kv_heads):
    """One token per step (the batched-matmul path), left-padded rows, the cache read as a view of its buffer."""
    fast, eager = _pair(kv_heads)
    fast.eval(), eager.eval()
    ids, mask = _padded()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [Cache(layers=[PreallocatedLayer(40) for _ in range(2)]) for _ in range(2)]
    logits = [
        m(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=c, use_cache=True).logits[
            :, -1
        ]
        for m, c in zip((fast, eager), caches)
    ]
    nxt = logits[1].argmax(-1, keepdim=True)
    for _ in range(8):
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = pos[:, -1:] + 1
        logits = [
            m(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=c, use_cache=True).logits[
                :, -1
            ]
            for m, c in zip((fast, eager), caches)
        ]
        assert (logits[0] - logits[1]).abs().max() < 1e-5
        nxt = logits[1].argmax(-1, keepdim=True)
    assert caches[0].layers[0].keys.shape[2] == ids.shape[1] + 8


@pytest.mark.parametrize("kind", ["bool", "bool_broadcast", "additive", "none"])
def test_decode_path_masks_like_sdpa(kind):
    """The one-query-token path on its own: boolean, additive and batch-broadcast masks, against torch's SDPA."""
    import torch.nn.functional as F

    from spear_lit.policy.attention import spear_sdpa_forward

    g = torch.Generator().manual_seed(0)
    b, h, hkv, k_len, d = 3, 6, 2, 9, 16
    q, k, v = (torch.randn(*s, generator=g) for s in ((b, h, 1, d), (b, hkv, k_len, d), (b, hkv, k_len, d)))
    keep = torch.ones(b, 1, 1, k_len, dtype=torch.bool)
    keep[1, ..., :4] = False
    mask = {
        "bool": keep,
        "bool_broadcast": keep[1:2],
        "additive": torch.zeros(b, 1, 1, k_len).masked_fill(~keep, float("-inf")),
        "none": None,
    }[kind]
    got, _ = spear_sdpa_forward(torch.nn.Module(), q, k, v, mask, scaling=0.3)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    assert got.shape == (b, 1, h, d)
    assert torch.allclose(got, want.transpose(1, 2), atol=1e-6)


@pytest.mark.parametrize("kv_heads", [2, 4])
@torch.no_grad()
def test_decode_with_shared_prompt_prefixes_equals_eager(kv_heads):
    """Rows in blocks of G that share a left-padded prompt: the cache keeps each prompt once
    (``PreallocatedLayer.share_prefix``) and the cascade path reads it once per block. Every decode step's
    logits equal eager attention on per-row copies, also past the suffix buffer's first capacity."""
    from spear_lit.policy.attention import SHARED_PREFIX
    from spear_lit.rollout.hf_engine import _block_groups

    fast, eager = _pair(kv_heads)
    fast.eval(), eager.eval()
    ids, mask = _padded(n=3)
    G = 4
    inv = torch.arange(3).repeat_interleave(G)
    assert _block_groups(inv) == G and _block_groups(torch.arange(3).repeat(G)) == 0
    assert _block_groups(torch.arange(12)) == 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    shared = Cache(layers=[PreallocatedLayer(ids.shape[1] + 3) for _ in range(2)])  # suffix capacity 3
    fast(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=shared, use_cache=True)
    for layer in shared.layers:
        layer.share_prefix(inv[::G], G)
    ids, mask, pos = ids[inv], mask[inv], pos[inv]
    rows = Cache(layers=[PreallocatedLayer(40) for _ in range(2)])
    eager(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=rows, use_cache=True)
    nxt = torch.randint(3, 250, (len(ids), 1), generator=torch.Generator().manual_seed(1))
    for step in range(8):
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = pos[:, -1:] + 1
        a = fast(
            input_ids=nxt,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=shared,
            use_cache=True,
            **{SHARED_PREFIX: shared},
        ).logits[:, -1]
        b = eager(
            input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=rows, use_cache=True
        ).logits[:, -1]
        assert (a - b).abs().max() < 1e-5, step
        nxt = b.argmax(-1, keepdim=True)
    layer = shared.layers[0]
    assert layer.prefix_keys.shape[0] == 3 and layer.get_seq_length() == rows.layers[0].get_seq_length()
    assert layer.capacity >= 8 > 3  # the suffix buffer grew while decoding
    empty = PreallocatedLayer(4)  # nothing prefilled (one-token prompts): stays a plain per-row buffer
    empty.share_prefix(torch.zeros(1, dtype=torch.long), 2)
    assert empty.groups == 0 and empty.get_seq_length() == 0
