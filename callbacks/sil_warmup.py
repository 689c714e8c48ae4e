"""The self-imitation warm-up of SPEAR_SPEC §4, a pure function of the RL iteration ``t`` pushed in before
every step. No state: ``t`` lives in the data module's checkpoint, so a resumed run continues it."""

from __future__ import annotations

import lightning as L

from callbacks._iteration import rollout_data
from callbacks.contracts import contract
from spear_lit.algos import cosine_warmup


@contract(
    reads=("data.upcoming_iteration",),
    sets=("learner.sil_coef",),
    key="sil_warmup",
    needed_if=lambda data, learner: getattr(data, "replay", None) is not None,
    when="replay is on (data.replay is set)",
    why="c(t) scales the replay losses (SPEAR_SPEC §4); without it they get the full weight c = 1 from the "
    "first iteration. Keep it, or turn replay off (data.replay=null)",
)
class SILWarmup(L.Callback):
    """Self-imitation coefficient ``c(t) = C·(1 - cos(π t/T))/2`` (``C`` after ``T``), applied to replay losses.

    Args:
        peak: ``C`` (1 in the paper).
        total_iterations: ``T`` (300 AIME, 200 ALFWorld/WebShop).
    """

    def __init__(self, peak: float = 1.0, total_iterations: int = 200):
        if total_iterations < 1:
            raise ValueError(f"callbacks.sil_warmup.total_iterations={total_iterations}: must be >= 1")
        self.peak, self.total = peak, total_iterations

    def value(self, t: int) -> float:
        return cosine_warmup(t, total_steps=self.total, peak=self.peak)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module.sil_coef = self.value(rollout_data(trainer).upcoming_iteration)
