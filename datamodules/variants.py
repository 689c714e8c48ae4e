"""The data side's interchangeable pieces, each selected by ``_target_`` with one call shape per kind:
advantage estimators (``data.advantage``, ``conf/advantage/``), tool-call bonuses (``data.toolcall_bonus``)
and response filters (``data.filters.<name>``, ``conf/filter/``). The algorithms themselves are in
:mod:`spear_lit.algos`; these adapt them to the data module's rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spear_lit.algos import (
    gigpo_advantages,
    grpo_advantages,
    has_repeated_ngrams,
    is_overlong,
    is_unreadable,
    toolcall_bonus,
    toolcall_bonus_qwen3,
)
from spear_lit.batch import Sample


# ------------------------------------------------------------------ advantage estimators
def grpo(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    step_returns: torch.Tensor,
    anchor_ids: torch.Tensor,
    *,
    norm_by_std: bool,
) -> torch.Tensor:
    """GRPO (SPEAR_SPEC §2.1): ``R - μ_group`` (``/ (σ + 1e-6)`` with ``norm_by_std``); ``[N]``."""
    return grpo_advantages(rewards, group_ids, norm_by_std=norm_by_std)


def gigpo(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    step_returns: torch.Tensor,
    anchor_ids: torch.Tensor,
    *,
    step_weight: float = 1.0,
    norm_by_std: bool = True,
) -> torch.Tensor:
    """GiGPO (SPEAR_SPEC §2.2): episode term over the group's rows + ``w ·`` step term over rows with equal
    anchor observation; ``[N]``."""
    return gigpo_advantages(
        rewards, step_returns, group_ids, anchor_ids, step_weight=step_weight, norm_by_std=norm_by_std
    )


# ------------------------------------------------------------------ tool-call bonuses (SPEAR_SPEC §7)
def standard_bonus(
    num_calls: torch.Tensor, correct: torch.Tensor, weight: float, *, per_call: float = 0.1, cap: float = 1.0
) -> torch.Tensor:
    """``min(per_call·n, cap)·λ`` for every trajectory, right or wrong (Qwen2.5 AIME)."""
    return toolcall_bonus(num_calls, weight, per_call=per_call, cap=cap)


def qwen3_bonus(
    num_calls: torch.Tensor, correct: torch.Tensor, weight: float, *, per_call: float = 0.1, cap: float = 1.0
) -> torch.Tensor:
    """Correct answers get ``λ·[n > 0]``, wrong ones the standard bonus (the Qwen3 variant)."""
    return toolcall_bonus_qwen3(num_calls, correct, weight, per_call=per_call, cap=cap)


# ------------------------------------------------------------------ response filters (SPEAR_SPEC §8)
# One call shape: ``(samples, max_response_len) -> bool[N]``, True = the row is filtered out (its loss mask
# is zeroed; it still counts in group statistics). Configured as ``data.filters.<name>``; the data module
# logs each one's count as ``filter/<name>``.
def overlong(samples: Sequence[Sample], max_response_len: int) -> torch.Tensor:
    """Filter 1: response length (policy + tool tokens) ``>= L``."""
    return is_overlong(
        torch.tensor([len(s.response_ids) for s in samples], dtype=torch.long), max_response_len
    )


def incomplete(samples: Sequence[Sample], max_response_len: int) -> torch.Tensor:
    """Filter 2: no usable final answer or action (``Sample.incomplete``, set by the agent)."""
    return torch.tensor([s.incomplete for s in samples], dtype=torch.bool)


def repetitive(
    samples: Sequence[Sample], max_response_len: int, *, n: int = 20, threshold: int = 10
) -> torch.Tensor:
    """Filter 3: some ``n``-gram of response token ids occurs at least ``threshold`` times."""
    return torch.tensor(
        [has_repeated_ngrams(s.response_ids, n=n, threshold=threshold) for s in samples], dtype=torch.bool
    )


def unreadable(samples: Sequence[Sample], max_response_len: int) -> torch.Tensor:
    """Filter 4: the decoded response holds U+FFFD or a typical mojibake of it."""
    return torch.tensor([is_unreadable(s.text) for s in samples], dtype=torch.bool)
