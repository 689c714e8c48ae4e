"""The tool-call reward weight of SPEAR_SPEC §4/§7, a function of the RL iteration ``t`` chosen by
``_target_`` and pushed into the data module before every step. No state: ``t`` lives in the data
module's checkpoint, so a resumed run continues it."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L

from callbacks._iteration import rollout_data
from callbacks.contracts import contract


@contract(
    reads=("data.upcoming_iteration",),
    sets=("data.tool_reward_weight",),
    key="tool_reward",
    needed_if=lambda data, learner: getattr(data, "toolcall_bonus", None) is not None,
    when="a tool-call bonus is configured (data.toolcall_bonus is set)",
    why="the bonus is scaled by λ(t) (SPEAR_SPEC §7), which stays 0 without the schedule, so the bonus "
    "would be silently off. Keep it, or remove the bonus (data.toolcall_bonus=null)",
)
class ToolRewardSchedule(L.Callback):
    """Tool-call reward weight ``λ(t) = schedule(t)``.

    Args:
        schedule: ``t -> λ(t)``, e.g. SPEAR's cosine decay ``(cos(π t/T)+1)/2`` then 0:
            ``{_target_: spear_lit.algos.cosine_decay, _partial_: true, total_steps: 200}`` (``T`` = 200 in
            the paper); ``None`` = no tool reward (``λ = 0``).
    """

    def __init__(self, schedule: Callable[[int], float] | None = None):
        if schedule is not None and not callable(schedule):
            raise ValueError(
                f"callbacks.tool_reward.schedule={schedule!r}: must be a function of the RL iteration "
                "(e.g. {_target_: spear_lit.algos.cosine_decay, _partial_: true, total_steps: 200}) "
                "or null (no tool reward)"
            )
        self.schedule = schedule

    def value(self, t: int) -> float:
        return float(self.schedule(t)) if self.schedule is not None else 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        dm = rollout_data(trainer)
        dm.tool_reward_weight = self.value(dm.upcoming_iteration)
