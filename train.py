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
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from spear_lit import config_check  # no torch: a refused value is reported before the heavy imports
from spear_lit.config_check import ConfigError

log = logging.getLogger("spear_lit")
CONF = Path(__file__).resolve().parent / "conf"


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Train from a composed config; returns ``(metrics, objects)`` (objects: learner, data, trainer).

    Raises, before any rollout, ``ConfigError`` for a bad value and ``CheckpointError`` when the run would
    overwrite another run or the checkpoint cannot be resumed; ``RunInterrupted`` (with the resume command)
    when a signal stopped it after saving a checkpoint.
    """
    import lightning as L  # here, not at the top: `check` refuses bad values before torch/Lightning load
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from callbacks.checkpoint import ConfigRecord
    from callbacks.contracts import check_algorithm_callbacks
    from spear_lit import plan as memory_plan
    from spear_lit.training import checkpoints as ckpts
    from spear_lit.training.console import quiet
    from spear_lit.training.export import export_hf
    from spear_lit.training.host_memory import keep_freed_memory

    check(cfg)
    memory_plan.check_at_start(cfg)  # GPU runs: one that cannot fit is refused before any weight is read
    quiet()
    keep_freed_memory()  # host memory: reuse freed activations instead of page-faulting them back in
    ckpts.register_checkpoint_types()
    run_dir = Path(cfg.run_dir)
    hint = lambda: ckpts.resume_hint(run_dir, ckpts.find_latest(run_dir)) if trainer.is_global_zero else ""
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
    named = {
        k: instantiate(c, _convert_="all") if c else None for k, c in (cfg.get("callbacks") or {}).items()
    }
    callbacks = check_algorithm_callbacks(data, learner, named)  # a needed one removed: error; contract order
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=[*callbacks, ConfigRecord(config)], _convert_="all"
    )
    try:
        # weights_only: our own dataclasses are allow-listed (register_checkpoint_types), nothing else runs
        trainer.fit(learner, datamodule=data, ckpt_path=ckpt, weights_only=True)
    except SIGTERMException as e:  # a SystemExit with code 0: make it an error that says how to resume
        raise ckpts.RunInterrupted(f"stopped by SIGTERM; {hint()}") from e
    if any(getattr(cb, "preempted", False) for cb in trainer.callbacks):
        raise ckpts.RunInterrupted(f"preempted, checkpoint saved; {hint()}")
    if cfg.get("export_hf") and not trainer.interrupted:
        path = export_hf(learner, data.tokenizer, run_dir / "policy_hf")
        if trainer.is_global_zero:
            log.info("final policy saved as a Hugging Face checkpoint: %s", path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return metrics, {"learner": learner, "data": data, "trainer": trainer}


def check(cfg: DictConfig) -> None:
    """Refuse missing and bad values, naming the key (:class:`ConfigError`; spear_lit/config_check.py has
    the rules); a single file where a list of files is expected becomes a one-element list in ``cfg``."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"required value(s) not set: {', '.join(missing)} (e.g. `python train.py {missing[0]}=...`)"
        )
    fixes = config_check.check_config(
        OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(cfg, resolve=False), _primary()
    )
    for key, value in fixes.items():
        OmegaConf.update(cfg, key, value, merge=False)


def _primary() -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))


def _agent(choices) -> str:
    """The agent group chosen (``math_tool``, ``alfworld_tiny``, ...), with its task for the math agent."""
    agent = next((v for k, v in choices.items() if k.startswith("agent@") or k == "agent"), None)
    return f"{agent} (task {choices.get('task')})" if agent in (None, "math_tool") else agent


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    if (
        os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
    ):  # one line; the full config is a file
        from hydra.core.hydra_config import HydraConfig

        c, out = HydraConfig.get().runtime.choices, HydraConfig.get().runtime.output_dir
        log.info(
            "experiment %s | model %s | agent %s | algorithm %s | rollout %s | trainer %s | run dir %s "
            "(config: %s/.hydra/config.yaml)",
            c.get("experiment", "tiny_spear (default)"),
            cfg.model.get("path") or c.get("model"),
            _agent(c),
            c.get("loss"),
            c.get("rollout"),
            c.get("trainer"),
            cfg.run_dir,
            out,
        )
    try:
        check(cfg)  # fast: the run's own keys and world sizes first, then the callables' signatures
        _run(cfg)
    except (ConfigError, InstantiationException) as e:  # a refused setting: one line, no traceback
        if isinstance(e, InstantiationException) and os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _refuse(e, OmegaConf.to_container(cfg, resolve=False))


def _refuse(e: Exception, raw: dict | None = None) -> None:
    """Exit with status 2 and one line (before Hydra configures logging it goes plainly to stderr)."""
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":  # once, not per srun task
        log.error("config error: %s", config_check.one_line(e, raw))
    sys.exit(2)


def _run(cfg: DictConfig) -> None:
    from spear_lit.training import checkpoints as ckpts  # torch and Lightning: after the cheap checks

    try:
        train(cfg)
    except ckpts.CheckpointError as e:
        log.error("%s", e)
        sys.exit(2)
    except ckpts.RunInterrupted as e:
        log.error("%s", e)
        sys.exit(ckpts.EXIT_INTERRUPTED)


if __name__ == "__main__":
    try:  # before Hydra composes: a misspelt top-level key, with or without `+`, named with the nearest one
        config_check.check_command_line(
            sys.argv[1:], _primary(), {d.name for d in CONF.iterdir() if d.is_dir()}
        )
    except ConfigError as e:
        _refuse(e)
    main()
