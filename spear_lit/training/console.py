"""A quiet console: the progress bar and what needs a reader, not noise we have understood.

Each filter names what it hides and why it is harmless here; every other warning stays.
"""

from __future__ import annotations

import logging
import warnings

# Lightning's start-up lines that say nothing about the run (the device line is in the run summary)
_LIGHTNING_INFO = ("GPU available", "TPU available", "HPU available", "💡 Tip")
_UNDERSTOOD_WARNINGS = (
    # the learner takes the data-loader iterator on purpose: no prefetch, so rollouts stay on-policy
    r".*`dataloader_iter`",
    # Lightning 2.6's own use of a torch 2.13 deprecation; nothing of ours
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # printed on any machine with SLURM installed; train.sbatch runs srun for real runs
    r"The `srun` command is available on your system but is not used",
)


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LIGHTNING_INFO)


def quiet() -> None:
    """Hide the understood start-up noise of Lightning and transformers (call once, before fit)."""
    for pattern in _UNDERSTOOD_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropInfo())
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        if logger.handlers:  # Lightning's own console handler, beside the root's (Hydra): print once
            logger.propagate = False
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars of a 4 MB model
    except ImportError:
        pass
