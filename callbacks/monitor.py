"""Entropy monitoring: observes, never acts (STYLE: acting on a threshold is a separate callback)."""

from __future__ import annotations

import logging

import lightning as L

from callbacks._iteration import finished_iteration
from callbacks.contracts import contract

log = logging.getLogger(__name__)


@contract(reads=("record.metrics.policy/entropy",), sets=("record.metrics.policy/entropy_vs_start",))
class EntropyMonitor(L.Callback):
    """Tracks the policy's pre-update token entropy per RL iteration and warns once when it collapses.

    Args:
        collapse_ratio: warn when entropy falls below this fraction of the first iteration's.
    """

    def __init__(self, collapse_ratio: float = 0.1):
        self.collapse_ratio = collapse_ratio
        self.first: float | None = None
        self.warned = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = finished_iteration(pl_module)
        value = record["metrics"].get("policy/entropy", float("nan")) if record is not None else float("nan")
        if value != value or "policy/entropy_vs_start" in record["metrics"]:  # none, or already seen (resume)
            return
        self.first = value if self.first is None else self.first
        record["metrics"]["policy/entropy_vs_start"] = value / self.first if self.first else 1.0
        if not self.warned and self.first and value < self.collapse_ratio * self.first:
            self.warned = True
            log.warning(
                "policy entropy collapsed: %.4f at iteration %d (started at %.4f)",
                value,
                record["iteration"],
                self.first,
            )

    def state_dict(self) -> dict:
        return {"first": self.first, "warned": self.warned}

    def load_state_dict(self, state_dict: dict) -> None:
        self.first, self.warned = state_dict["first"], state_dict["warned"]
