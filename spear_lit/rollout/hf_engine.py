"""Rollout engines: turn prompt token ids into sampled continuations, behind one small interface.

The agent loop only ever calls :meth:`RolloutEngine.generate`; the data module calls
:meth:`RolloutEngine.bind` once (late: the policy exists only after ``configure_model``) and
:meth:`RolloutEngine.sync_weights` at the start of every RL iteration, so rollouts of iteration ``t``
use the weights left by the last optimizer step of ``t-1`` (SPEAR_SPEC §0).
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import GenerationConfig
from transformers.cache_utils import Cache, DynamicLayer

from spear_lit.batch import distinct_prompts, position_ids
from spear_lit.policy import full_attention_only, is_sharded


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
    ) -> list[list[int]]:
        """Continue each prompt; a continuation ends with EOS (included) or at its own token budget."""

    def release(self) -> None:
        """Free generation memory until the next ``sync_weights`` (e.g. put vLLM to sleep)."""


class HFEngine:
    """Hugging Face ``generate`` with KV cache, batched over all episodes of an iteration.

    The engine samples from the very module being trained (no copy), so ``sync_weights`` has
    nothing to do and on-policy sampling holds by construction. Works on CPU and GPU, and under
    DDP and FSDP2 (``synced_gpus`` keeps sharded ranks stepping together when their lengths differ).

    Args:
        max_batch_size: rows per ``generate`` call (memory bound); longer lists are chunked.
        synced_gpus: ``None`` = on when the model is sharded across more than one process.
    """

    def __init__(self, *, max_batch_size: int = 256, synced_gpus: bool | None = None):
        self.max_batch_size = max_batch_size
        self.synced_gpus = synced_gpus
        self.model = None
        self.tokenizer = None

    def bind(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    def sync_weights(self) -> None:
        pass  # generation reads the trained parameters directly

    def release(self) -> None:
        pass  # the KV cache of generate() is freed when it returns

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
        out: list[list[int]] = []
        for s in range(0, len(prompts), self.max_batch_size):
            out += self._generate_chunk(
                prompts[s : s + self.max_batch_size],
                max_new_tokens[s : s + self.max_batch_size],
                temperature,
                top_p,
                greedy,
            )
        return out

    def generation_config(
        self, *, max_new_tokens: int, temperature: float, top_p: float, greedy: bool
    ) -> GenerationConfig:
        """The complete config of one ``generate`` call: exact softmax(z/T) sampling with top-p (see
        :func:`exact_sampling_config`). A subclass may change it (bench/vs_trl.py forbids EOS to fix the length)."""
        tok = self.tokenizer
        return exact_sampling_config(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            greedy=greedy,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )

    def _prefilled_cache(self, ids: torch.Tensor, attn: torch.Tensor, capacity: int) -> Cache | None:
        """A KV cache holding all prompt tokens but the last, computed once per distinct prompt (a group's G
        rows share one) and copied out to the rows; generate() then starts from the last prompt token.
        Every rank runs this one forward per chunk (under FSDP it is a collective). ``None`` (transformers'
        own cache) for models with sliding-window or linear-attention layers."""
        if not full_attention_only(self.model):
            return None
        first, inv = distinct_prompts(ids, attn)
        layers = self.model.config.get_text_config().num_hidden_layers
        cache = Cache(layers=[PreallocatedLayer(capacity) for _ in range(layers)])
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
            for layer in cache.layers:
                layer.rows(inv)
        return cache

    def _generate_chunk(self, prompts, budgets, temperature, top_p, greedy):
        tok, model = self.tokenizer, self.model
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every row's next token is at the same column
            ids[i, width - len(p) :] = torch.as_tensor(p)
            attn[i, width - len(p) :] = 1
        config = self.generation_config(
            max_new_tokens=max(budgets), temperature=temperature, top_p=top_p, greedy=greedy
        )
        was_training, shipped = model.training, model.generation_config
        model.eval()  # dropout off: samples come from the same distribution as the (eval) old log-probs
        # generate() fills every field we leave None from model.generation_config: hide the checkpoint's
        model.generation_config = GenerationConfig()
        try:
            ids, attn = ids.to(device), attn.to(device)
            cache = self._prefilled_cache(ids, attn, width + config.max_new_tokens)
            gen = model.generate(
                input_ids=ids,
                attention_mask=attn,
                generation_config=config,
                past_key_values=cache,
                synced_gpus=self._synced(),
            )[:, width:].cpu()
        finally:
            model.generation_config = shipped
            model.train(was_training)
        outs = []
        for row, budget in zip(gen.tolist(), budgets):
            row = row[:budget]
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            outs.append(row)
        return outs


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer that writes each step into a buffer allocated once (``capacity`` positions, doubled if
    a synced rank runs past it) and hands attention a view of the filled part. transformers' DynamicLayer
    concatenates the whole cache every step instead: quadratic copying that was 56 % of a decode step's
    forward on the tiny policy (bench/vs_trl.py workload)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = int(capacity), 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.k_buf = key_states.new_empty(b, h, self.capacity, d)
        self.v_buf = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self.capacity = max(end, 2 * self.capacity)
            k, v = self.k_buf[:, :, : self.length], self.v_buf[:, :, : self.length]
            self.lazy_initialization(key_states, value_states)
            self.k_buf[:, :, : self.length], self.v_buf[:, :, : self.length] = k, v
        self.k_buf[:, :, self.length : end] = key_states
        self.v_buf[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.k_buf[:, :, :end], self.v_buf[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` of the batch (repeats allowed: a shared prompt copied out to its rows)."""
        if self.is_initialized:
            self.k_buf, self.v_buf = self.k_buf[index], self.v_buf[index]
            self.keys, self.values = self.k_buf[:, :, : self.length], self.v_buf[:, :, : self.length]


# Every logits processor and warper of transformers' generate() set to "off", so that sampling draws from
# exactly softmax(logits / T), truncated only by the configured top-p (SPEAR_SPEC §1). A checkpoint's
# generation_config.json (Qwen2.5-Instruct ships repetition_penalty 1.05-1.1, top_k 20, top_p 0.8) and
# transformers' global defaults (top_k=50) would otherwise change the distribution the loss assumes.
NO_PROCESSORS = dict(  # applied in greedy decoding too
    repetition_penalty=1.0,
    encoder_repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    encoder_no_repeat_ngram_size=0,
    bad_words_ids=None,
    suppress_tokens=None,
    begin_suppress_tokens=None,
    sequence_bias=None,
    forced_bos_token_id=None,
    forced_eos_token_id=None,
    exponential_decay_length_penalty=None,
    min_length=0,
    min_new_tokens=None,
    guidance_scale=None,
    watermarking_config=None,
    renormalize_logits=False,
    remove_invalid_values=False,
    num_beams=1,
    num_return_sequences=1,
    use_cache=True,
)
NO_WARPERS = dict(
    top_k=0, top_h=None, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0
)  # sampling


def exact_sampling_config(
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    greedy: bool,
    eos_token_id: int,
    pad_token_id: int,
) -> GenerationConfig:
    """A complete ``GenerationConfig``: greedy, or sampling from softmax(z/T) with top-p and nothing else."""
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature={temperature}: sampling needs T > 0 (use greedy=True for argmax)")
    sampling = {} if greedy else {**NO_WARPERS, "temperature": float(temperature), "top_p": float(top_p)}
    return GenerationConfig(
        **NO_PROCESSORS,
        **sampling,
        do_sample=not greedy,
        max_new_tokens=int(max_new_tokens),
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
