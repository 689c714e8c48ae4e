"""What an agent loop hands the data module: training rows (:class:`Sample`) of one RL iteration.

Two loops implement :class:`Agent`: the ReTool-style tool loop (one row per multi-turn episode, math)
and the step-wise environment loop (one row per environment step, ALFWorld/WebShop, verl-agent style).
Everything after the rollout (rewards, filters, advantages, batching, replay) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Sample:
    """One training row.

    Attributes:
        prompt_ids, response_ids, response_mask: tokens as generated (mask 1) or observed (mask 0).
        group: index of the row's group (prompt or initial state) among the iteration's groups over all
            ranks (``rank·B/world + local index``); the data module turns it into a global ``uid``.
        episode: index of the trajectory the row belongs to (several rows per episode for step-wise agents).
        score: task reward of the row's trajectory (math ±1; ALFWorld ``10·won``; WebShop scaled score),
            minus the invalid-action penalty for a row whose action was invalid (SPEAR_SPEC §3.4).
        episode_score: the trajectory's reward without any row's penalty (group statistics take one value
            per trajectory, SPEAR_SPEC §5.1, §8.5); ``None`` = ``score`` (one row per episode).
        success: the trajectory solved the task (reported accuracy; never includes bonuses).
        num_tool_calls: what the tool-call bonus counts (assistant turns with a parsed call; for agents,
            environment steps taken), SPEAR_SPEC §7.
        incomplete: no usable final answer/action (SPEAR_SPEC §8 filter 2).
        text: decoded response (unreadable filter, scoring).
        step_return: GiGPO's discounted return from this step (environment rewards only, minus the
            invalid penalty of this step), SPEAR_SPEC §2.2; 0 for episode-level agents.
        anchor: GiGPO's anchor observation (the state text before the action); ``None`` = no step group.
        turns: assistant turns (math) or steps (agents) of the trajectory, for metrics.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    group: int
    episode: int
    score: float
    success: bool
    num_tool_calls: int = 0
    incomplete: bool = False
    text: str = ""
    step_return: float = 0.0
    anchor: str | None = None
    turns: int = 1
    episode_score: float | None = None
    info: dict = field(default_factory=dict)


def shard_range(num_groups: int, shard: tuple[int, int]) -> tuple[int, int]:
    """Groups ``[lo, hi)`` of rank ``shard[0]`` of ``shard[1]`` (``num_groups`` must split evenly)."""
    rank, world = shard
    if num_groups % world:
        raise ValueError(f"{num_groups} groups cannot be split evenly over {world} ranks")
    per = num_groups // world
    return rank * per, (rank + 1) * per


class Agent(Protocol):
    """Rolls out groups of ``n`` trajectories from the same prompt/initial state."""

    name: str  # used in ``val/<name>/accuracy``

    def collect(self, engine, tokenizer, *, t: int, seed: int, num_groups: int, group_size: int,
                max_response_len: int, temperature: float, top_p: float, greedy: bool = False,
                sync=None, shard: tuple[int, int] = (0, 1)) -> list[Sample]:
        """Roll out this rank's share of the iteration's ``num_groups × group_size`` training trajectories.

        ``seed`` identifies this (run, iteration): the same seed draws the same ``num_groups`` prompts/initial
        states on every rank; ``shard = (rank, world)`` keeps groups ``[rank·G/world, (rank+1)·G/world)``
        (drawn once, sharded: no prompt repeats across ranks because of sharding). ``sync(has_work) -> bool``
        (multi-process) keeps ranks calling ``generate`` together (see ``run_tool_episodes``)."""

    def evaluate(self, engine, tokenizer, *, shard: tuple[int, int], limit: int | None, max_response_len: int,
                 temperature: float, top_p: float, greedy: bool, sync=None, samples: int = 1) -> tuple[int, int]:
        """Held-out episodes → ``(successes, episodes)`` on this rank.

        Every item of ``items[:limit]`` is rolled out ``samples`` times (``k`` of avg@k; AIME: 32) and the
        ``len(items)·k`` episodes are dealt ``[rank::world]``, so the ranks' summed ``successes / episodes``
        is avg@k. ``greedy`` decoding uses one sample whatever ``samples`` says (it is deterministic)."""
