"""What an agent loop hands the data module: training rows (:class:`Sample`) of one RL iteration.

Two loops implement :class:`Agent`: the ReTool-style tool loop (one row per multi-turn episode, math)
and the step-wise environment loop (one row per environment step, ALFWorld/WebShop, verl-agent style).
Everything after the rollout (rewards, filters, advantages, batching, replay) is shared.
"""

from __future__ import annotations

from typing import Protocol

from spear_lit.batch import Sample


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

    def collect(
        self,
        engine,
        tokenizer,
        *,
        t: int,
        seed: int,
        num_groups: int,
        group_size: int,
        max_response_len: int,
        temperature: float,
        top_p: float,
        greedy: bool = False,
        sync=None,
        shard: tuple[int, int] = (0, 1),
    ) -> list[Sample]:
        """Roll out this rank's share of the iteration's ``num_groups × group_size`` training trajectories.

        ``seed`` identifies this (run, iteration): the same seed draws the same ``num_groups`` prompts/initial
        states on every rank; ``shard = (rank, world)`` keeps groups ``[rank·G/world, (rank+1)·G/world)``
        (drawn once, sharded: no prompt repeats across ranks because of sharding). ``sync(has_work) -> bool``
        (multi-process) keeps ranks calling ``generate`` together (see ``run_tool_episodes``)."""

    def evaluate(
        self,
        engine,
        tokenizer,
        *,
        shard: tuple[int, int],
        limit: int | None,
        max_response_len: int,
        temperature: float,
        top_p: float,
        greedy: bool,
        sync=None,
        samples: int = 1,
    ) -> tuple[int, int]:
        """Held-out episodes → ``(successes, episodes)`` on this rank.

        Every item of ``items[:limit]`` is rolled out ``samples`` times (``k`` of avg@k; AIME: 32) and the
        ``len(items)·k`` episodes are dealt ``[rank::world]``, so the ranks' summed ``successes / episodes``
        is avg@k. ``greedy`` decoding uses one sample whatever ``samples`` says (it is deterministic)."""
