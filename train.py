"""Composition root: compose the Hydra config, instantiate, ``Trainer.fit``, export the policy.

    python train.py                          # SPEAR on the tiny math-with-tool task (CPU, minutes)
    python train.py +experiment=tiny_drbot   # a baseline; see conf/experiment/
    python train.py loss=grpo iterations=5   # swap a group, change a value
    python train.py ckpt_path=auto run_dir=outputs/x   # continue the run in outputs/x (fresh if none)
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from callbacks.checkpoint import ConfigRecord
from spear_lit.training import checkpoints as ckpts
from spear_lit.training.export import export_hf

log = logging.getLogger("spear_lit")


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Train from a composed config; returns ``(metrics, objects)`` (objects: learner, data, trainer).

    Raises :class:`~spear_lit.training.checkpoints.CheckpointError` before any rollout when the run would
    overwrite another run or the checkpoint cannot be resumed, and ``RunInterrupted`` (with the resume
    command) when a signal stopped it after saving a checkpoint.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"required config value(s) not set: {', '.join(missing)} (e.g. `python train.py {missing[0]}=...`)")
    ckpts.register_checkpoint_types()
    run_dir = Path(cfg.run_dir)
    # Processes Lightning launches for ranks > 0 re-run this script after rank 0 passed these checks.
    launched_child = os.environ.get("LOCAL_RANK", "0") != "0"
    ckpt = ckpts.resolve_resume(cfg.get("ckpt_path"), run_dir, check_dir=not launched_child)
    config = OmegaConf.to_container(cfg, resolve=False)
    if ckpt:
        saved = (ckpts.read_checkpoint(ckpt).get("spear_lit") or {}).get("config")
        changed = ckpts.check_config(saved, config, ckpt)
        if changed and not launched_child:
            log.warning("resuming %s with changed setting(s):\n  %s", ckpt, "\n  ".join(changed))
    L.seed_everything(cfg.seed, workers=True)
    learner = instantiate(cfg.learner, _convert_="all")
    data = instantiate(cfg.data, _convert_="all")
    data.connect(learner)
    callbacks = [instantiate(c, _convert_="all") for c in (cfg.get("callbacks") or {}).values() if c]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[*callbacks, ConfigRecord(config)], _convert_="all")
    try:
        # weights_only: our own dataclasses are allow-listed (register_checkpoint_types), nothing else runs
        trainer.fit(learner, datamodule=data, ckpt_path=ckpt, weights_only=True)
    except SIGTERMException as e:  # a SystemExit with code 0: make it an error that says how to resume
        raise ckpts.RunInterrupted(f"stopped by SIGTERM; {_hint(trainer, run_dir)}") from e
    if any(getattr(cb, "preempted", False) for cb in trainer.callbacks):
        raise ckpts.RunInterrupted(f"preempted, checkpoint saved; {_hint(trainer, run_dir)}")
    if cfg.get("export_hf") and not trainer.interrupted:
        path = export_hf(learner, data.tokenizer, run_dir / "policy_hf")
        if trainer.is_global_zero:
            log.info("final policy saved as a Hugging Face checkpoint: %s", path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return metrics, {"learner": learner, "data": data, "trainer": trainer}


def _hint(trainer, run_dir: Path) -> str:
    return ckpts.resume_hint(run_dir, ckpts.find_latest(run_dir)) if trainer.is_global_zero else ""


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))
    try:
        train(cfg)
    except ckpts.CheckpointError as e:
        log.error("%s", e)
        sys.exit(2)
    except ckpts.RunInterrupted as e:
        log.error("%s", e)
        sys.exit(ckpts.EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
