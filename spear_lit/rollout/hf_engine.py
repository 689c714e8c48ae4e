"""Rollout engines: turn prompt token ids into sampled continuations, behind one small interface.

The agent loop only ever calls :meth:`RolloutEngine.generate`; the data module calls
:meth:`RolloutEngine.bind` once (late: the policy exists only after ``configure_model``) and
:meth:`RolloutEngine.sync_weights` at the start of every RL iteration, so rollouts of iteration ``t``
use the weights left by the last optimizer step of ``t-1`` (SPEAR_SPEC §0).
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from spear_lit.batch import distinct_prompts, position_ids
from spear_lit.policy import full_attention_only, is_sharded
from spear_lit.policy.attention import SHARED_PREFIX, cascade_attention


class Continuation(list):
    """One generated continuation: its token ids (a ``list[int]``, so callers that only want ids see a list)
    and ``logprobs``, the log-probability of each id under the distribution the engine drew it from
    (``softmax(z/T)`` restricted to the top-p nucleus and renormalised; for greedy decoding, of ``softmax(z)``)."""

    def __init__(self, ids, logprobs):
        super().__init__(ids)
        self.logprobs = [float(x) for x in logprobs]
        if len(self.logprobs) != len(self):
            raise ValueError(f"{len(self.logprobs)} log-probs for {len(self)} tokens")


class RolloutEngine(Protocol):
    """What an agent loop needs from a generator."""

    def bind(self, model: torch.nn.Module, tokenizer) -> None:
        """Attach the policy being trained (called once, after the model is built)."""

    def sync_weights(self) -> None:
        """Make the engine sample from the policy's current parameters."""

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: list[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
    ) -> list[Continuation]:
        """Continue each prompt; a continuation ends with EOS (included) or at its own token budget, and
        carries the sampling log-prob of each of its tokens (:class:`Continuation`)."""

    def release(self) -> None:
        """Free generation memory until the next ``sync_weights`` (e.g. put vLLM to sleep)."""

    @property
    def context_len(self) -> int | None:
        """Longest prompt + continuation (tokens) the engine accepts; agents never send more."""


class HFEngine:
    """Step-by-step decoding of the Hugging Face model with a KV cache, batched over all episodes of an iteration.

    The engine samples from the very module being trained (no copy), so ``sync_weights`` has
    nothing to do and on-policy sampling holds by construction. Its own decode loop draws from exactly
    softmax(z/T) with top-p (:func:`sample_next`), and reports each drawn token's log-prob under that
    distribution (:class:`Continuation`): no generation config and no logits processor exists
    to leak a checkpoint's repetition penalty or top-k. Works on CPU and GPU, and under DDP and FSDP2
    (``synced_gpus``: sharded ranks keep stepping together until every rank's rows are done).

    Args:
        max_batch_size: rows decoded together (memory bound); longer lists are chunked.
        synced_gpus: ``None`` = on when the model is sharded across more than one process.
        max_model_len: longest prompt + continuation (:attr:`context_len`); ``None`` = the model config's
            ``max_position_embeddings``.
    """

    def __init__(
        self, *, max_batch_size: int = 256, synced_gpus: bool | None = None, max_model_len: int | None = None
    ):
        self.max_batch_size = max_batch_size
        self.synced_gpus = synced_gpus
        self.max_model_len = max_model_len
        self.model = None
        self.tokenizer = None

    def bind(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    def sync_weights(self) -> None:
        pass  # generation reads the trained parameters directly

    def release(self) -> None:
        pass  # the KV cache of a generate() call is freed when it returns

    @property
    def context_len(self) -> int | None:
        config = getattr(self.model, "config", None)
        return self.max_model_len or getattr(config, "max_position_embeddings", None)

    def _synced(self) -> bool:
        if self.synced_gpus is not None:
            return self.synced_gpus
        dist = torch.distributed
        return (  # FSDP2 or ZeRO-3 shards: every rank's forward needs the others' collectives
            is_sharded(self.model)
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        )

    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False):
        if self.model is None:
            raise RuntimeError("HFEngine.generate called before bind(model, tokenizer)")
        if not greedy and not temperature > 0:
            raise ValueError(f"temperature={temperature}: sampling needs T > 0 (use greedy=True for argmax)")
        out: list[list[int]] = []
        # Inference mode (no autograd bookkeeping at all: ~5 % of a tiny policy's decode step) unless the
        # parameters are sharded: FSDP2/ZeRO-3 gather them into buffers that the training forward reuses.
        with torch.inference_mode(not is_sharded(self.model)):
            starts = range(0, len(prompts), self.max_batch_size)
            for c in range(self._chunks_everywhere(len(starts))):
                if c < len(starts):
                    s = starts[c]
                    out += self._generate_chunk(
                        prompts[s : s + self.max_batch_size],
                        max_new_tokens[s : s + self.max_batch_size],
                        temperature,
                        top_p,
                        greedy,
                    )
                else:  # another sharded rank has more chunks: join its forwards, drawing nothing (budget 0)
                    self._generate_chunk(
                        prompts[:1] or [[self.tokenizer.pad_token_id] * 2], [0], 1.0, 1.0, True
                    )
        return out

    def _chunks_everywhere(self, n: int) -> int:
        """The most chunks any rank decodes: a synced rank runs that many (every forward is a collective)."""
        if not self._synced():
            return n
        most = torch.tensor([n], device=next(self.model.parameters()).device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        return int(most.item())

    def next_token_logits(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """The logits ``[B, V]`` the ``step``-th new token is drawn from (as the model gives them). A subclass may
        change them (bench/vs_trl.py forbids EOS to fix the length); training needs them as they are."""
        return logits

    def _prefilled_cache(self, ids: torch.Tensor, attn: torch.Tensor, capacity: int) -> Cache:
        """A KV cache holding all prompt tokens but the last; decoding then starts from the last prompt token.
        For full-attention models, one forward per distinct prompt (a group's G rows share one) fills
        :class:`PreallocatedLayer` buffers. With this project's attention on CPU and rows in consecutive blocks
        that share a prompt (a GRPO group), each prompt's keys/values stay there once and decode steps read
        them once per block (:meth:`PreallocatedLayer.share_prefix`: generation 7 % faster on the
        bench/vs_trl.py workload); otherwise they are copied out to the rows. Models with sliding-window or
        linear-attention layers get transformers' own cache, filled row by row. Every rank runs this one
        forward per chunk (under FSDP it is a collective)."""
        if full_attention_only(self.model):
            first, inv = distinct_prompts(ids, attn)
            layers = self.model.config.get_text_config().num_hidden_layers
            cache = Cache(layers=[PreallocatedLayer(capacity) for _ in range(layers)])
        else:
            first, inv = torch.arange(len(ids), device=ids.device), None
            cache = DynamicCache(config=self.model.config)
        if ids.shape[1] > 1:
            pos = position_ids(attn)
            self.model(
                input_ids=ids[first, :-1],
                attention_mask=attn[first, :-1],
                position_ids=pos[first, :-1],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        if inv is not None:
            groups = _block_groups(inv) if cascade_attention(self.model) else 0
            for layer in cache.layers:
                if groups:
                    layer.share_prefix(inv[::groups], groups)
                else:
                    layer.rows(inv)
        return cache

    def _generate_chunk(self, prompts, budgets, temperature, top_p, greedy):
        """Decode one chunk step by step: every row draws its next token from exactly softmax(z/T) with
        top-p (:func:`sample_next`), nothing of the checkpoint's generation config or of transformers'
        logits processors applies, and a row stops at EOS (kept) or at its own budget."""
        tok, model = self.tokenizer, self.model
        device = next(model.parameters()).device
        width, n = max(len(p) for p in prompts), len(prompts)
        ids = torch.full((n, width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every row's next token is at the same column
            ids[i, width - len(p) :] = torch.as_tensor(p)
            attn[i, width - len(p) :] = 1
        budget = torch.tensor(budgets, device=device)
        steps, synced = max(budgets), self._synced()
        was_training = model.training
        model.eval()  # dropout off: samples come from the same distribution as the (eval) old log-probs
        try:
            ids, attn = ids.to(device), attn.to(device)
            cache = self._prefilled_cache(ids, attn, width + steps)
            shared = {SHARED_PREFIX: cache} if getattr(cache.layers[0], "groups", 0) else {}
            mask = torch.cat([attn, attn.new_ones(n, steps)], 1)
            pos, last = position_ids(attn)[:, -1:], ids[:, -1:]
            out = torch.full((n, steps), tok.pad_token_id, dtype=torch.long, device=device)
            out_logp = torch.zeros((n, steps), dtype=torch.float64, device=device)
            done, t = budget <= 0, 0
            while True:
                all_done = bool(done.all())
                # a synced rank keeps stepping until every rank is done
                if _finished(all_done, synced, device):
                    break
                if width + t > mask.shape[1]:  # a synced rank past its own budget: the cache grows too
                    mask = torch.cat([mask, mask.new_ones(n, max(steps, 1))], 1)
                logits = model(
                    input_ids=last,
                    attention_mask=mask[:, : width + t],
                    position_ids=pos,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                    **shared,
                ).logits[:, -1]
                if all_done:  # a synced rank with all its rows done: the forward only, no draw
                    nxt = last[:, 0]  # (drawing would move the random stream its next call starts from)
                else:
                    nxt, out_logp[:, t] = sample_next(
                        self.next_token_logits(logits, t), temperature, top_p, greedy
                    )
                    nxt = torch.where(done, tok.pad_token_id, nxt)
                    out[:, t] = nxt
                    done |= (nxt == tok.eos_token_id) | (budget <= t + 1)
                t, last, pos = t + 1, nxt[:, None], pos + 1
        finally:
            model.train(was_training)
        outs = []
        for row, logp, b in zip(out.cpu().tolist(), out_logp.cpu().tolist(), budgets):
            row = row[:b]
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            outs.append(Continuation(row, logp[: len(row)]))
        return outs


def _finished(all_done: bool, synced: bool, device) -> bool:
    """This rank's rows are all done; when ``synced``, every rank's (one all-reduce per step, so all ranks
    run the same number of forwards)."""
    if not synced:
        return all_done
    left = torch.tensor([0.0 if all_done else 1.0], device=device)
    torch.distributed.all_reduce(left, op=torch.distributed.ReduceOp.MAX)
    return not bool(left.item())


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, greedy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits [B, V]`` and its log-prob under the distribution it was drawn from, both
    ``[B]``: the argmax (log-prob of softmax(z), as vLLM reports greedy tokens), or a draw from exactly
    softmax(z/T) restricted to the nucleus (the most likely tokens until their mass reaches ``top_p``: a token
    is kept when the mass of the strictly more likely ones is below ``top_p``) and renormalised. Drawn by
    inverting the float64 CDF with one uniform per row from torch's global generator."""
    if greedy:
        idx = logits.argmax(-1)
        return idx, torch.log_softmax(logits.double(), -1).gather(-1, idx[:, None]).squeeze(-1)
    p = torch.softmax(logits.double() / temperature, -1)
    order = None
    if top_p < 1.0:
        p, order = p.sort(-1, descending=True)
        p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0.0)
    cdf = p.cumsum(-1)
    u = torch.rand(len(cdf), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
    # the drawn token's probability over the kept mass (the nucleus renormalised; all of it without top-p)
    logp = (p.gather(-1, idx).log() - cdf[:, -1:].log()).squeeze(-1)
    return (idx if order is None else order.gather(-1, idx)).squeeze(-1), logp


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer that writes each step into a buffer allocated once (``capacity`` positions, doubled if
    a synced rank runs past it) and hands attention a view of the filled part. transformers' DynamicLayer
    concatenates the whole cache every step instead: quadratic copying that was 56 % of a decode step's
    forward on the tiny policy (bench/vs_trl.py workload)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = int(capacity), 0
        self.groups = 0  # > 0: rows share prompt prefixes in blocks of this size (share_prefix)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.k_buf = key_states.new_empty(b, h, self.capacity, d)
        self.v_buf = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.groups:  # rows are [P, G] blocks (share_prefix): [B, Hkv, s, d] -> [P, Hkv, G, s, d]
            p, h, g = self.k_buf.shape[:3]
            key_states, value_states = (
                x.view(p, g, h, x.shape[2], -1).transpose(1, 2) for x in (key_states, value_states)
            )
        end = self.length + key_states.shape[-2]
        if end > self.capacity:  # positions are dim -2 of the buffers in either layout
            self.capacity = max(end, 2 * self.capacity)
            old = self.k_buf[..., : self.length, :], self.v_buf[..., : self.length, :]
            self.k_buf, self.v_buf = (b.new_empty(*b.shape[:-2], self.capacity, b.shape[-1]) for b in old)
            self.k_buf[..., : self.length, :], self.v_buf[..., : self.length, :] = old
        self.k_buf[..., self.length : end, :] = key_states
        self.v_buf[..., self.length : end, :] = value_states
        self.length = end
        self.keys, self.values = self.k_buf[..., :end, :], self.v_buf[..., :end, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length + (self.prefix_keys.shape[2] if self.groups else 0)

    def share_prefix(self, blocks: torch.Tensor, groups: int) -> None:
        """Keep the filled positions once per block of ``groups`` consecutive rows (block ``j`` holds prompt
        ``blocks[j]``) and give every row its own buffer for what follows: decode attention then reads a
        shared prompt's keys/values once per block (:func:`spear_lit.policy.attention.cascade_decode`), and
        ``keys``/``values`` hold only the rows' own positions, ``[P, Hkv, G, s, d]``."""
        if not self.is_initialized:  # nothing was prefilled (one-token prompts): plain per-row buffers
            return
        self.prefix_keys = self.k_buf[blocks, :, : self.length].contiguous()  # [P, Hkv, Lp, d]
        self.prefix_values = self.v_buf[blocks, :, : self.length].contiguous()
        p, h, _, d = self.prefix_keys.shape
        cap = self.capacity - self.length
        self.k_buf = self.k_buf.new_empty(p, h, groups, cap, d)  # [P, Hkv, G, cap, d]: block-major rows
        self.v_buf = self.v_buf.new_empty(p, h, groups, cap, self.prefix_values.shape[-1])
        self.groups, self.capacity, self.length = groups, cap, 0

    def rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` of the batch (repeats allowed: a shared prompt copied out to its rows)."""
        if self.is_initialized:  # copies the filled positions only; the rest of the buffer stays unwritten
            bufs = []
            for buf in (self.k_buf, self.v_buf):
                new = buf.new_empty(len(index), *buf.shape[1:])
                new[:, :, : self.length] = buf[index, :, : self.length]
                bufs.append(new)
            self.k_buf, self.v_buf = bufs
            self.keys, self.values = self.k_buf[:, :, : self.length], self.v_buf[:, :, : self.length]


def _block_groups(inv: torch.Tensor) -> int:
    """``G > 1`` when rows come in consecutive blocks of ``G`` that share a prompt (``inv``: each row's distinct
    prompt), else 0."""
    n, u = len(inv), int(inv.max()) + 1 if len(inv) else 0
    if u == 0 or n % u or n == u:
        return 0
    g = n // u
    blocks = inv.view(-1, g)
    return g if bool((blocks == blocks[:, :1]).all()) else 0
