"""Experiment loggers (``conf/logger/``): Lightning's own loggers, checked before the run starts.

Each ``conf/logger/<name>.yaml`` targets :func:`make_logger` with the dotted path of a Lightning logger
class, the package that logger writes with, and the spear_lit extra that installs it. A missing package
then fails when the Trainer is built (before any rollout) with the install command, instead of with
Lightning's generic hint halfway through set-up. :func:`log_image` sends the run's plot to whichever
logger supports images or artifacts.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from lightning.pytorch.loggers import Logger


def make_logger(cls: str, requires: str | None = None, extra: str | None = None, **kwargs) -> Logger:
    """Build the Lightning logger ``cls`` with ``kwargs`` after checking that its package is installed.

    Args:
        cls: dotted path of the logger class, e.g. ``lightning.pytorch.loggers.TensorBoardLogger``.
        requires: import name of the package the logger needs (``tensorboard``, ``wandb``, ``mlflow``);
            ``None`` when it needs nothing beyond Lightning (CSV).
        extra: the spear_lit extra that installs it (``pip install -e '.[<extra>]'``).
        **kwargs: the logger's own arguments (``save_dir``, ``project``, ``offline``, ...).

    Raises:
        ImportError: ``requires`` cannot be imported; the message names the install command.
    """
    if requires and importlib.util.find_spec(requires) is None:
        how = f"pip install -e '.[{extra}]'" if extra else f"pip install {requires}"
        raise ImportError(
            f"{cls.rsplit('.', 1)[-1]} needs the `{requires}` package, which is not installed: "
            f"run `{how}` (or choose another logger, e.g. logger=csv)"
        )
    module, name = cls.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**kwargs)


def log_image(logger: Logger, key: str, path: Path) -> None:
    """Send the PNG at ``path`` to ``logger`` as an image (TensorBoard, W&B) or artifact (MLflow).

    Loggers without either (CSV) are skipped: the file already sits in the run directory.
    """
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    if isinstance(logger, TensorBoardLogger):
        import matplotlib.image

        pixels = matplotlib.image.imread(str(path))  # [H, W, 4] floats in [0, 1] (RGBA PNG)
        logger.experiment.add_image(key, pixels[..., :3], dataformats="HWC")
        logger.experiment.flush()
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[str(path)])
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_artifact(logger.run_id, str(path))
