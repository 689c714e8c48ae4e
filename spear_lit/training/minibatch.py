"""What the data module hands the learner for one optimizer step."""

from __future__ import annotations

from dataclasses import dataclass, field

from spear_lit.rollout.batch import TokenBatch


@dataclass
class Normalizers:
    """Global normalizers of one optimizer mini-batch, over all its micro-batches and all ranks
    (SPEAR_SPEC §3.5), so the gradient does not depend on how the mini-batch is split."""

    num_rows: int
    num_tokens: int
    max_len: int


@dataclass
class MiniBatch:
    """One optimizer step's data on this rank.

    Attributes:
        micro_batches: this rank's rows, split for memory; may be empty rows-wise (a rank with no data
            still runs the same number of forward/backward passes as the others).
        kind: ``"on_policy"`` or ``"replay"`` (replay uses the replay loss settings and ``c(t)``).
        norm: the global normalizers of this step.
        iteration: the RL iteration ``t`` this step belongs to.
        step_in_iteration, steps_in_iteration: position of the step within its iteration.
        iteration_record: set on the last step of an iteration: rollout metrics and group statistics
            that callbacks (baseline history, logging) consume after the step.
        done, record_done: progress flags that keep the step in the data module's checkpointed queue
            until it has been applied (and its record consumed): resume anywhere, nothing lost or repeated.
    """

    micro_batches: list[TokenBatch]
    kind: str
    norm: Normalizers
    iteration: int
    step_in_iteration: int = 0
    steps_in_iteration: int = 1
    iteration_record: dict | None = field(default=None)
    empty: bool = False  # no rows on any rank (e.g. every group was filtered out): no update
    done: bool = False  # its optimizer step has completed (set by the learner): no longer pending
    record_done: bool = False  # the callbacks have consumed its iteration_record (set after them)

    @property
    def pending(self) -> bool:
        """Not yet applied, or applied but its iteration record not yet consumed by the callbacks."""
        return not (self.done and (self.iteration_record is None or self.record_done))

    @property
    def is_replay(self) -> bool:
        return self.kind == "replay"

    @property
    def last_of_iteration(self) -> bool:
        return self.iteration_record is not None
