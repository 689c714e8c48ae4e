"""``+debug=quick`` (RL) and ``+debug=quick_sft`` (SFT): every experiment composes with it, the debug values
win over the experiment's, everything else stays the experiment's, and tiny runs really take 2 iterations."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from helpers import compose_cfg
from omegaconf import OmegaConf

from train import train

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
HAS_BWRAP = shutil.which("bwrap") is not None


def _debug_for(cfg) -> str:
    return "quick_sft" if cfg.learner._target_.endswith("SFTLearner") else "quick"


def _with_debug(name: str, run_dir: Path, extra=()):
    """(experiment alone, experiment + its debug option) as plain containers; debug last on the command line."""
    plain = compose_cfg(run_dir, [f"+experiment={name}", *extra])
    debug = compose_cfg(run_dir, [f"+experiment={name}", *extra, f"+debug={_debug_for(plain)}"])
    return OmegaConf.to_container(plain), OmegaConf.to_container(debug), _debug_for(plain)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_debug_overrides_every_experiment_and_keeps_the_rest(name, tmp_path):
    plain, debug, option = _with_debug(name, tmp_path)
    assert debug["trainer"]["logger"]["cls"] == "lightning.pytorch.loggers.CSVLogger"
    assert debug["export_hf"] is False
    # what a debug run keeps: the policy, the task/agent, the algorithm, the devices
    for key in ("model", "loss", "task"):
        assert debug.get(key) == plain.get(key), key
    for key in ("accelerator", "devices", "strategy", "precision"):
        assert debug["trainer"].get(key) == plain["trainer"].get(key), key
    if option == "quick_sft":
        assert debug["trainer"]["max_steps"] == 2
        assert (debug["data"]["num_examples"], debug["data"]["batch_size"]) == (16, 4)
        return
    assert debug["iterations"] == 2
    d = debug["data"]
    assert (d["prompts_per_iteration"], d["group_size"], d["mini_batch_rows"], d["micro_batch_rows"]) == (
        2,
        2,
        4,
        2,
    )
    assert (d["val_max_problems"], d["val_group_size"]) == (2, 1)
    assert debug["callbacks"]["validation"]["every_n_iterations"] == 0
    assert debug["callbacks"]["checkpoint"]["every_n_iterations"] == 0
    assert d.get("agent") == plain["data"].get("agent") and d["advantage"] == plain["data"]["advantage"]
    if plain["data"].get("replay"):  # SPEAR: a buffer of 2 rows, so replay can fire within 2 iterations
        assert (
            debug["data"]["replay"]["capacity"] == "${spear.buffer_size}"
            and debug["spear"]["buffer_size"] == 2
        )


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.sandbox
@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap is not installed (make sandbox)")
@pytest.mark.parametrize("name", ["tiny_spear", "tiny_grpo", "webshop_tiny_spear"])
def test_debug_runs_two_tiny_iterations(name, tmp_path):
    cfg = compose_cfg(tmp_path, [f"+experiment={name}", "+debug=quick", "tool.num_workers=2"])
    _, objs = train(cfg)
    rows = _rows(tmp_path)
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    assert objs["data"].B == 2 and objs["data"].n == 2
    assert int(rows[-1]["optimizer_steps"]) >= 2  # at least one mini-batch per iteration
    val = [k for k in rows[0] if k.startswith("val/")]
    assert (
        val and all(rows[0][k] == "" for k in val) and all(rows[1][k] != "" for k in val)
    )  # only at the end
    assert not list((tmp_path / "checkpoints").glob("iter_*.ckpt"))  # no periodic checkpoints
    assert not (tmp_path / "policy_hf").exists()
    assert list((tmp_path / "lightning_logs").glob("version_*/metrics.csv"))  # the CSV logger


@pytest.mark.sandbox
@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap is not installed (make sandbox)")
def test_debug_sft_takes_two_steps(tmp_path):
    _, objs = train(compose_cfg(tmp_path, ["+experiment=sft_tiny", "+debug=quick_sft"]))
    assert objs["trainer"].global_step == 2
    assert not (tmp_path / "policy_hf").exists()
