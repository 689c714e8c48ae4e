"""The P50 baseline history (SPEAR_SPEC §5.1): group mean rewards of past iterations, global over ranks."""

from __future__ import annotations

import lightning as L

from callbacks._iteration import finished_iteration, rollout_data
from callbacks.contracts import contract
from spear_lit.algos import BaselineHistory


@contract(
    reads=("record.iteration", "record.group_means", "record.group_stds"),
    sets=("data.baseline",),
    key="baseline",
    needed_if=lambda data, learner: getattr(data, "replay", None) is not None,
    when="replay is on (data.replay is set)",
    why="replay's trigger and its P50 recalibration of advantages read the baseline history this callback "
    "keeps (SPEAR_SPEC §5); without it replay would silently run without a baseline. Keep it, or turn "
    "replay off (data.replay=null)",
)
class P50Baseline(L.Callback):
    """Records each iteration's group means after its last step; the data module reads ``p50`` from it
    when it decides and recalibrates replay.

    The history is identical on every rank (group means are all-gathered), so Lightning's rank-0-only
    callback state is enough to resume it.

    Args:
        capacity: ``baseline_buffer_size``, counted in group means (10240 in the paper).
    """

    def __init__(self, capacity: int = 10240):
        self.history = BaselineHistory(capacity)

    def setup(self, trainer, pl_module, stage: str) -> None:
        rollout_data(trainer).baseline = self.history

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = finished_iteration(pl_module)
        if record is not None and record["group_means"] and record["iteration"] not in self.history.steps:
            self.history.add(record["iteration"], record["group_means"], record["group_stds"])

    def state_dict(self) -> dict:
        return self.history.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.history.load_state_dict(state_dict)
