"""Rows without padding: a micro-batch's rows concatenated into one sequence for the learner's forward
(``data.micro_batch_tokens``; SPEAR_SPEC §3.5's normalizers are per step, so the gradient is the padded one).

A padded micro-batch of rows with very different lengths runs the model on ``n × (P + T)`` positions, most
of them padding when one long episode sits among short ones. Packed (:func:`pack`), it runs on the rows'
own tokens only, ``Σ (p_i + r_i)``: one ``[1, S]`` sequence, positions restarting at 0 in every row, and
attention confined to each row (causal within it, nothing across rows):

* **CPU, this project's SDPA** (``attn_implementation=sdpa``): the model gets ``cu_seq_lens_q/_k`` (the
  rows' boundaries, as flash-attention's varlen kernels take them) and no mask; the attention
  (:func:`spear_lit.policy.attention.spear_sdpa_forward`) runs one causal SDPA per row. Memory and compute
  are those of the rows alone: no ``[S, S]`` mask.
* **flash_attention_2/3** (GPU): transformers reads the restarting ``position_ids`` and calls the varlen
  kernel with the rows' boundaries.
* **anything else** (eager; SDPA on a GPU without flash-attn): transformers builds a block-diagonal causal
  mask from the restarting ``position_ids`` (``[S, S]``: correct, but quadratic in the micro-batch).

Only models whose layers all use full attention are packed (a sliding window would need per-row windows;
:func:`spear_lit.policy.full_attention_only`). The learner's statistics come back in the padded layout
``[n, T]``, so the loss terms and everything after them are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spear_lit.batch import TokenBatch
from spear_lit.policy import attention, full_attention_only


@dataclass
class Packed:
    """One micro-batch's rows as a single sequence.

    Attributes:
        input_ids, position_ids: ``[1, S]``; positions restart at 0 at each row.
        cu_seqlens: ``[n + 1]`` int32 row boundaries (``0, len_0, len_0 + len_1, ...``).
        max_len: the longest row.
        predictors: ``[R]`` the positions whose hidden states predict the response tokens, in the order of
            ``attention_mask[:, P:]``'s valid entries (row by row).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    predictors: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]


def pack(b: TokenBatch) -> Packed:
    """The rows of ``b`` (left-padded prompts, right-padded responses) concatenated without padding. Every row
    must have at least one prompt token (the position that predicts its first response token)."""
    P = b.prompt_width
    mask = b.attention_mask.bool()
    lengths = mask.sum(1)
    prompt_lens = mask[:, :P].sum(1)
    resp_lens = lengths - prompt_lens
    if len(b) and bool((prompt_lens == 0).any()):
        raise ValueError("pack: a row with an empty prompt has no position predicting its first token")
    ends = lengths.cumsum(0)
    starts = ends - lengths
    cu = torch.cat([ends.new_zeros(1), ends]).to(torch.int32)
    seg = torch.repeat_interleave(torch.arange(len(b), device=mask.device), lengths)
    positions = torch.arange(int(cu[-1]), device=mask.device) - starts[seg]
    # response token j of row i sits at starts_i + p_i + j; the position before it predicts it
    first = starts + prompt_lens - 1
    row = torch.repeat_interleave(torch.arange(len(b), device=mask.device), resp_lens)
    offset = torch.arange(len(row), device=mask.device) - (resp_lens.cumsum(0) - resp_lens)[row]
    return Packed(
        input_ids=b.input_ids[mask].unsqueeze(0),
        position_ids=positions.unsqueeze(0),
        cu_seqlens=cu,
        max_len=int(lengths.max()) if len(b) else 0,
        predictors=first[row] + offset,
    )


def packable(model: torch.nn.Module) -> bool:
    """Whether ``model`` can be run on packed rows (every layer full attention)."""
    return full_attention_only(model)


def packed_hidden(model: torch.nn.Module, b: TokenBatch) -> torch.Tensor:
    """Final hidden states ``[R, H]`` of the positions that predict ``b``'s response tokens (``R``: the valid
    response tokens, in ``attention_mask[:, P:]`` order), from one forward of the packed rows. The LM head
    runs on none of them (:func:`spear_lit.training.logprobs.head_inputs`)."""
    from spear_lit.training.logprobs import head_inputs  # logprobs imports this module

    if not packable(model):
        raise ValueError(
            "data.micro_batch_tokens packs rows into one sequence, which needs a model whose layers all use "
            "full attention (this one has sliding-window or other layers): set data.micro_batch_tokens=null"
        )
    p = pack(b)
    kwargs = {}
    if _varlen_on_cpu(model, p):
        # rows' boundaries for this project's CPU attention; no mask at all (one causal SDPA per row)
        kwargs = dict(
            attention_mask={"full_attention": None},
            cu_seq_lens_q=p.cu_seqlens,
            cu_seq_lens_k=p.cu_seqlens,
            max_length_q=p.max_len,
            max_length_k=p.max_len,
        )
    with head_inputs(model) as seen:
        model(
            input_ids=p.input_ids,
            position_ids=p.position_ids,
            use_cache=False,
            logits_to_keep=0,  # the hook sees every position (and the head computes nothing)
            **kwargs,
        )
    return seen[0][0, p.predictors]


def _varlen_on_cpu(model: torch.nn.Module, p: Packed) -> bool:
    attn = getattr(model.config.get_text_config(), "_attn_implementation", None)
    return attn == attention.NAME and p.input_ids.device.type == "cpu"
