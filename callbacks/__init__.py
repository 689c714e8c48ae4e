"""Cross-cutting behaviour around the learner: schedules, baseline maintenance, monitoring, reporting."""

from callbacks.baseline import P50Baseline
from callbacks.checkpoint import IterationCheckpoint
from callbacks.monitor import EntropyMonitor
from callbacks.preemption import Preemption
from callbacks.report import IterationReport
from callbacks.schedules import SILWarmup, ToolRewardSchedule
from callbacks.validation import Validation

__all__ = ["EntropyMonitor", "IterationCheckpoint", "IterationReport", "P50Baseline", "Preemption",
           "SILWarmup", "ToolRewardSchedule", "Validation"]
