"""Cross-cutting behaviour around the learner: schedules, baseline maintenance, monitoring, reporting.

Each algorithm callback states what it reads and sets (``@contract``, :mod:`callbacks.contracts`); ``train.py``
refuses a run that lacks one its algorithm needs and runs them in contract order."""

from callbacks.baseline import P50Baseline
from callbacks.checkpoint import IterationCheckpoint
from callbacks.monitor import EntropyMonitor
from callbacks.preemption import Preemption
from callbacks.report import IterationReport
from callbacks.sil_warmup import SILWarmup
from callbacks.tool_reward import ToolRewardSchedule
from callbacks.validation import Validation

__all__ = [
    "EntropyMonitor",
    "IterationCheckpoint",
    "IterationReport",
    "P50Baseline",
    "Preemption",
    "SILWarmup",
    "ToolRewardSchedule",
    "Validation",
]
