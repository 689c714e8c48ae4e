"""Loss terms: small callables keyed by name in ``loss.terms`` (Hydra can add, swap or drop one).

Each term maps a :class:`TermInput` (one micro-batch's per-token quantities plus the mini-batch's
global normalizers) to ``(scalar loss, metrics)``. The per-token objectives and aggregations are the
pure functions of :mod:`spear_lit.algos`, bound with their hyper-parameters by Hydra (``_partial_``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from spear_lit.batch import Normalizers


@dataclass
class TermInput:
    """Per-token tensors of one micro-batch, all ``[n, T]`` except ``advantages [n]``."""

    logp: torch.Tensor
    old_logp: torch.Tensor
    entropy: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    norm: Normalizers
    replay: bool
    generator: torch.Generator | None = None
    ref_logp: torch.Tensor | None = None
    sampler_logp: torch.Tensor | None = None  # the rollout engine's, when the rows carry them

    def aggregate(self, fn: Callable, per_token: torch.Tensor) -> torch.Tensor:
        """Aggregate ``per_token [n, T]`` with the global normalizers."""
        return fn(
            per_token,
            self.mask,
            num_rows=self.norm.num_rows,
            num_tokens=self.norm.num_tokens,
            max_len=self.norm.max_len,
        )


class PolicyTerm:
    """The policy-gradient term: a per-token objective (vanilla PPO, Clip-Cov, KL-Cov) aggregated.

    Args:
        objective: ``f(logp, old_logp, advantages, mask, **kw) -> (loss [n,T], metrics)`` for on-policy
            steps, e.g. ``spear_lit.algos.clip_cov_loss`` with its hyper-parameters bound.
        aggregation: one of the four ``spear_lit.algos`` aggregations.
        replay_objective: the objective of replay steps (SPEAR_SPEC §5.6: Clip-Cov with its own
            triple); ``None`` uses ``objective``.
        correction: the sampler-trainer gap correction of on-policy steps,
            ``f(old_logp, sampler_logp, mask) -> (weights [n,T], metrics)``, the weights (no gradient)
            multiplying the per-token loss: :mod:`spear_lit.training.rollout_correction` (``correction=tis``
            or ``mis``). ``None`` (default): no correction. Replay steps never get one.
    """

    def __init__(
        self,
        objective: Callable,
        aggregation: Callable,
        replay_objective: Callable | None = None,
        correction: Callable | None = None,
    ):
        self.objective, self.aggregation = objective, aggregation
        self.replay_objective = replay_objective or objective
        self.correction = correction
        if correction is not None:  # its settings are checked now, on no rows, not at the first step
            correction(torch.zeros(0, 1), torch.zeros(0, 1), torch.zeros(0, 1))

    def __call__(self, x: TermInput) -> tuple[torch.Tensor, dict]:
        fn = self.replay_objective if x.replay else self.objective
        kw = {"generator": x.generator} if _accepts(fn, "generator") else {}
        token_adv = x.advantages[:, None] * x.mask
        per_token, metrics = fn(x.logp, x.old_logp, token_adv, x.mask, **kw)
        if self.correction is not None and not x.replay:
            weights, more = self.correction(x.old_logp, x.sampler_logp, x.mask)
            per_token, metrics = per_token * weights.detach(), {**metrics, **more}
        return x.aggregate(self.aggregation, per_token), metrics


class EntropyTerm:
    """Entropy bonus ``-β_H · agg(H)`` (SPEAR_SPEC §3.4); ``coef`` 0.001 for ALFWorld/WebShop."""

    needs_entropy_grad = True  # the learner gives the entropy a gradient only for terms that declare this

    def __init__(self, coef: float, aggregation: Callable):
        self.coef, self.aggregation = coef, aggregation

    def __call__(self, x: TermInput) -> tuple[torch.Tensor, dict]:
        agg = x.aggregate(self.aggregation, x.entropy)
        return -self.coef * agg, {"entropy_agg": agg.detach()}


class KLTerm:
    """KL to the frozen initial policy, the ``k3``/low-variance estimator clamped to [-10, 10]
    (SPEAR_SPEC §3.4). Only plain-GRPO variants use it; it makes the learner keep a reference copy."""

    needs_reference = True

    def __init__(self, coef: float, aggregation: Callable):
        self.coef, self.aggregation = coef, aggregation

    def __call__(self, x: TermInput) -> tuple[torch.Tensor, dict]:
        if x.replay:  # SPEAR_SPEC §5.6: no KL on replay
            return x.logp.sum() * 0.0, {}
        d = x.ref_logp - x.logp
        kl = (d.exp() - d - 1).clamp(-10, 10)
        agg = x.aggregate(self.aggregation, kl)
        return self.coef * agg, {"kl": agg.detach()}


def _accepts(fn: Callable, name: str) -> bool:
    target = getattr(fn, "func", fn)
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
