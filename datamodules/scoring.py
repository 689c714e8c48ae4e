"""Scoring one rank's rollouts of an iteration (SPEAR_SPEC §0 steps 3-4): rewards, filter flags, row ids
and the training rows, as small functions of the samples; :func:`score_rows` composes them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from spear_lit.batch import Sample

Filter = Callable[[Sequence[Sample], int], torch.Tensor]  # (samples, max_response_len) -> bool[N]


@dataclass
class ScoredRows:
    """One rank's scored rows; every tensor is ``[N]``, one entry per sample, in sample order.

    Attributes:
        rewards: the row's reward, task score + tool bonus (a step row includes its own invalid-action penalty).
        traj_rewards: the reward of the row's trajectory, episode score + bonus (one value per episode,
            SPEAR_SPEC §5.1, §8.5): what group statistics use.
        bonus: the tool-call bonus (SPEAR_SPEC §7); zeros without one.
        correct: ``bool``, the trajectory solved the task. calls: tool calls counted by the bonus.
        lengths: response tokens (policy + tool).
        group_ids: the iteration's global group ``uid`` (``t·B + group``).
        anchor_ids: GiGPO's step groups: equal ids ⇔ same group and same anchor text; a row without an anchor
            gets its own negative id.
        step_returns: GiGPO's discounted step returns. episode_keys: the trajectory each row belongs to.
        flags: filter name → ``bool[N]``, True where that filter drops the row.
        dicts: the rows for :meth:`TokenBatch.from_rows`; a filtered row's loss mask is all zero.
    """

    rewards: torch.Tensor
    traj_rewards: torch.Tensor
    bonus: torch.Tensor
    correct: torch.Tensor
    calls: torch.Tensor
    lengths: torch.Tensor
    group_ids: torch.Tensor
    anchor_ids: torch.Tensor
    step_returns: torch.Tensor
    episode_keys: torch.Tensor
    flags: dict[str, torch.Tensor]
    dicts: list[dict]


def rewards(
    samples: Sequence[Sample], toolcall_bonus: Callable | None, weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rewards, traj_rewards, bonus)``, each ``[N]``: task score (row and trajectory) + the tool-call
    bonus ``toolcall_bonus(num_calls, correct, weight)`` (``None``: no bonus)."""
    score = torch.tensor([s.score for s in samples], dtype=torch.float)
    traj_score = torch.tensor(
        [s.score if s.episode_score is None else s.episode_score for s in samples], dtype=torch.float
    )
    correct = torch.tensor([s.success for s in samples])
    calls = torch.tensor([s.num_tool_calls for s in samples])
    bonus = toolcall_bonus(calls, correct, weight) if toolcall_bonus else torch.zeros_like(score)
    return score + bonus, traj_score + bonus, bonus


def filter_flags(
    samples: Sequence[Sample], filters: Mapping[str, Filter], max_response_len: int
) -> dict[str, torch.Tensor]:
    """Each filter's ``bool[N]`` (True = drop the row), in the filters' order."""
    flags = {}
    for name, f in filters.items():
        flag = f(samples, max_response_len)
        if not (
            isinstance(flag, torch.Tensor) and flag.dtype == torch.bool and flag.shape == (len(samples),)
        ):
            raise ValueError(
                f"data.filters.{name} returned {flag!r} for {len(samples)} rows: a filter returns "
                f"a bool tensor [N] (True = drop the row)"
            )
        flags[name] = flag
    return flags


def group_ids(samples: Sequence[Sample], t: int, prompts_per_iteration: int) -> torch.Tensor:
    """``[N]`` global group ``uid`` of each row: unique over the run's iterations and all ranks."""
    return torch.tensor([t * prompts_per_iteration + s.group for s in samples], dtype=torch.long)


def anchor_ids(samples: Sequence[Sample]) -> torch.Tensor:
    """``[N]`` GiGPO anchor ids: one per distinct ``(group, anchor text)``, numbered from 0 in order of first
    appearance; a row without an anchor gets ``-1 - i`` (a step group of its own)."""
    ids: dict[tuple[int, str], int] = {}
    return torch.tensor(
        [
            ids.setdefault((s.group, s.anchor), len(ids)) if s.anchor is not None else -1 - i
            for i, s in enumerate(samples)
        ],
        dtype=torch.long,
    )


def row_dicts(
    samples: Sequence[Sample], keep: torch.Tensor, group_ids: torch.Tensor, rewards: torch.Tensor
) -> list[dict]:
    """The training rows; a row with ``keep`` False keeps its tokens but gets an all-zero loss mask. A row
    carries the engine's sampling log-probs (``sampler_logp``) when it reported them."""
    return [
        {
            "prompt_ids": s.prompt_ids,
            "response_ids": s.response_ids,
            "response_mask": [m * int(k) for m in s.response_mask],
            "group_id": int(g),
            "reward": float(r),
            "num_tool_calls": s.num_tool_calls,
            **({} if s.sampler_logp is None else {"sampler_logp": s.sampler_logp}),
        }
        for s, k, g, r in zip(samples, keep.tolist(), group_ids, rewards)
    ]


def first_rows_of_episodes(episode_keys: list[int]) -> list[int]:
    """Index of the first row of each trajectory (rows of one episode share its key)."""
    seen: set[int] = set()
    return [i for i, e in enumerate(episode_keys) if not (e in seen or seen.add(e))]


def group_stats(traj_rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-group mean and (unbiased, 0 for singletons) std of trajectory rewards ``[E]`` (one per episode,
    SPEAR_SPEC §5.1), in order of first appearance."""
    means, stds = [], []
    for g in dict.fromkeys(group_ids.tolist()):
        r = traj_rewards[group_ids == g]
        means.append(float(r.mean()))
        stds.append(float(r.std()) if len(r) > 1 else 0.0)
    return means, stds


def score_rows(
    samples: Sequence[Sample],
    t: int,
    *,
    prompts_per_iteration: int,
    max_response_len: int,
    filters: Mapping[str, Filter],
    toolcall_bonus: Callable | None = None,
    tool_reward_weight: float = 0.0,
) -> ScoredRows:
    """Score iteration ``t``'s samples of this rank: rewards, filter flags, ids and rows."""
    reward, traj_reward, bonus = rewards(samples, toolcall_bonus, tool_reward_weight)
    flags = filter_flags(samples, filters, max_response_len)
    keep = torch.ones(len(samples), dtype=torch.bool)
    for flag in flags.values():
        keep &= ~flag
    gids = group_ids(samples, t, prompts_per_iteration)
    return ScoredRows(
        rewards=reward,
        traj_rewards=traj_reward,
        bonus=bonus,
        correct=torch.tensor([s.success for s in samples]),
        calls=torch.tensor([s.num_tool_calls for s in samples]),
        lengths=torch.tensor([len(s.response_ids) for s in samples]),
        group_ids=gids,
        anchor_ids=anchor_ids(samples),
        step_returns=torch.tensor([s.step_return for s in samples], dtype=torch.float),
        episode_keys=torch.tensor([s.episode for s in samples], dtype=torch.long),
        flags=flags,
        dicts=row_dicts(samples, keep, gids, reward),
    )


def check_filters(filters: Mapping[str, object], max_response_len: int) -> dict[str, Filter]:
    """The filters as given, each tried on no rows: a ``ValueError`` naming ``data.filters.<name>`` for an
    entry that is not a filter (e.g. the old switch form ``overlong: true``) or has another call shape."""
    for name, f in filters.items():
        how = (
            f"a filter is a node {{_target_: ..., _partial_: true}} called as (samples, max_response_len) -> "
            f"bool[N] (conf/filter/; e.g. +filter@data.filters.overlong=overlong, ~data.filters.{name})"
        )
        if not callable(f):
            raise ValueError(f"data.filters.{name}={f!r}: {how}")
        try:
            filter_flags([], {name: f}, max_response_len)
        except TypeError as e:
            raise ValueError(f"data.filters.{name}: {e}; {how}") from e
    return dict(filters)
