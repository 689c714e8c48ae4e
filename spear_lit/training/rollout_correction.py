"""The sampler-trainer gap: measured every iteration, corrected in the policy loss as a choice.

The rollout engine reports the log-prob of every token it drew, under the distribution it drew it from
(``TokenBatch.sampler_logp``: vLLM's processed log-probs, the HF engine's own sampling distribution); the
learner's old log-probs ``π_old`` are those of ``logits / T`` in the trainer's own forward. The two differ
(bf16 kernels, tensor parallelism, batch shapes), so on-policy PPO is slightly off-policy. With
``δ = log π_old - log π_sampler`` on the generated tokens (the loss mask):

* **measured** (``rollout/logp_mismatch_*``: every iteration, over the loss tokens of the on-policy rows of
  all ranks): ``abs``, mean ``|δ|``; ``k3``, mean ``e^δ - 1 - δ``, the k3 estimate of KL(π_sampler ‖ π_old)
  (the tokens are draws from the sampler; verl's ``k3_kl``, prime-rl's ``mismatch_kl``); ``ratio_out``, the
  share of tokens whose ratio ``π_old/π_sampler`` lies outside [0.5, 2]. ``δ`` is clamped to ±20 (as the PPO
  ratio, SPEAR_SPEC §1) so one wild token cannot make the means infinite.
* **corrected** (``PolicyTerm(correction=...)``, ``correction=tis|mis`` on the command line): a per-token
  weight, without gradient, multiplying the per-token policy loss of on-policy rows; replay rows keep SPEAR's
  own stored old log-probs and get none. The loss normalizers stay the step's global ones (SPEAR_SPEC §3.5),
  so a masked row counts in them like a response-filtered one.

  - :func:`truncated_is` (TIS; Yao et al., "Your efficient RL framework secretly brings you off-policy RL
    training", verl PR #2953, TRL PR #3867): ``w = min(π_old/π_sampler, cap)`` per token.
  - :func:`sequence_mask` (MIS; verl ``docs/algo/rollout_corr.md`` geometric rejection, prime-rl's
    ``geo_mask``): a row whose geometric-mean token ratio ``exp(mean_τ δ)`` lies outside [low, high] gets
    weight 0, every other row 1. The geometric mean, not the product: a product of 16k token ratios is
    astronomically far from 1 for any mismatch at all (TRL #4772), the mean is length-normalised.
"""

from __future__ import annotations

import math

import torch

from spear_lit.training.dist import all_reduce

LOG_2 = math.log(2.0)  # |δ| > log 2  <=>  π_old/π_sampler outside [0.5, 2]


def log_ratio(old_logp: torch.Tensor, sampler_logp: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """``δ = old_logp - sampler_logp [n, T]``, without gradient, clamped to ±20, 0 off the ``mask``."""
    if sampler_logp is None:
        raise ValueError(
            "loss.terms.policy.correction needs the rollout engine's sampling log-probs of the on-policy rows "
            "(TokenBatch.sampler_logp); these rows carry none: use an engine that reports them (rollout=hf, "
            "rollout=vllm, rollout=vllm_cpu) or drop the correction (correction=none)"
        )
    d = (old_logp.detach() - sampler_logp.detach().to(old_logp.device)).clamp(-20.0, 20.0)
    return torch.where(mask > 0, d, torch.zeros_like(d))


def mismatch_sums(
    old_logp: torch.Tensor, sampler_logp: torch.Tensor | None, mask: torch.Tensor
) -> torch.Tensor:
    """``[Σ|δ|, Σ(e^δ - 1 - δ), #(|δ| > log 2), #tokens]`` (float64 ``[4]``) over the tokens of ``mask`` of
    rows ``[n, T]``; all 0 when the rows carry no ``sampler_logp``. Sums, so ranks and micro-batches add."""
    if sampler_logp is None:
        return torch.zeros(4, dtype=torch.float64)
    m = mask.detach().cpu() > 0
    d = log_ratio(old_logp.detach().cpu().double(), sampler_logp.cpu().double(), m)[m]
    # expm1: e^δ - 1 - δ without cancellation for the tiny δ of a matched sampler (~δ²/2)
    k3 = torch.expm1(d) - d
    return torch.stack([d.abs().sum(), k3.sum(), (d.abs() > LOG_2).sum().double(), d.new_tensor(len(d))])


def mismatch_metrics(sums) -> dict[str, float]:
    """``rollout/logp_mismatch_{abs,k3,ratio_out}`` from (global) :func:`mismatch_sums`; none without tokens."""
    abs_sum, k3_sum, out, tokens = (float(x) for x in sums)
    if tokens == 0:
        return {}
    return {
        "rollout/logp_mismatch_abs": abs_sum / tokens,
        "rollout/logp_mismatch_k3": k3_sum / tokens,
        "rollout/logp_mismatch_ratio_out": out / tokens,
    }


def step_mismatch(mb) -> dict[str, float]:
    """The iteration's ``rollout/logp_mismatch_*``, completed by its first on-policy step (a
    :class:`~spear_lit.batch.MiniBatch` with ``old_logp_in_step``) once its forward has written its rows' old
    log-probs: their sums over all ranks plus those of the rows the separate pass covered
    (``mb.pass_mismatch``, already global). A collective: every rank calls it after that step."""
    local = sum(
        (mismatch_sums(m.old_logp, m.sampler_logp, m.response_mask) for m in mb.micro_batches),
        torch.zeros(4, dtype=torch.float64),
    )
    return mismatch_metrics(all_reduce(local, "sum") + torch.tensor(mb.pass_mismatch, dtype=torch.float64))


def truncated_is(
    old_logp: torch.Tensor, sampler_logp: torch.Tensor | None, mask: torch.Tensor, *, cap: float = 2.0
) -> tuple[torch.Tensor, dict]:
    """Token-level truncated importance sampling: ``w = min(π_old/π_sampler, cap)`` per token ``[n, T]`` (1 off
    the mask), no gradient. Metrics: ``tis_weight_mean`` and ``tis_truncated_frac`` (tokens at the cap), over
    the mask. ``cap`` 2 as in the TIS blog, verl and TRL's first version."""
    if not cap >= 1.0:
        raise ValueError(
            f"loss.terms.policy.correction.cap={cap}: must be >= 1 (a matched token's weight is 1)"
        )
    d = log_ratio(old_logp, sampler_logp, mask)
    w = torch.exp(d.clamp(max=math.log(cap)))
    return w, {"tis_weight_mean": _mean(w, mask), "tis_truncated_frac": _mean(d > math.log(cap), mask)}


def sequence_mask(
    old_logp: torch.Tensor,
    sampler_logp: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    low: float = 0.99,
    high: float = 1.01,
) -> tuple[torch.Tensor, dict]:
    """Sequence-level masked importance sampling: weight 0 for every token of a row whose geometric-mean
    ratio ``exp(Σ_τ m·δ / Σ_τ m)`` lies outside ``[low, high]``, 1 for the other rows ``[n, T]``. Metric:
    ``mis_masked_frac``, the share of the mask's tokens in masked rows. Default band 0.99-1.01: verl's
    DAPO Qwen2.5-32B rollout-correction recipe (``recipe/dapo/run_dapo_qwen2.5_32b_rollout_corr.sh``)."""
    if not 0.0 < low <= 1.0 <= high:
        raise ValueError(
            f"loss.terms.policy.correction: low={low}, high={high}: need 0 < low <= 1 <= high "
            "(a row that matches the sampler exactly has ratio 1)"
        )
    d = log_ratio(old_logp, sampler_logp, mask)
    mean = d.sum(-1) / (mask > 0).sum(-1).clamp(min=1)  # [n]: log of the geometric-mean ratio
    keep = (mean >= math.log(low)) & (mean <= math.log(high))
    w = keep[:, None].to(d.dtype).expand_as(d)
    return w, {"mis_masked_frac": _mean(~keep[:, None].expand_as(d), mask)}


def _mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the tokens of ``mask`` (0 for an empty mask)."""
    m = mask > 0
    return x.double()[m].sum() / max(int(m.sum()), 1)
