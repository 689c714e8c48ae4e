"""Callback contracts (callbacks/contracts.py): a run whose algorithm needs a removed callback fails at start,
naming it, how it was removed and why; the callbacks run in the order of what they read and set, whatever
their order in the config."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import lightning as L
import pytest
from helpers import REPO, TINY_RUN, compose_cfg, subprocess_env
from hydra.utils import instantiate

import callbacks
from callbacks.contracts import check_algorithm_callbacks, contract, contract_order
from spear_lit.algos import cosine_decay
from spear_lit.config_check import ConfigError
from train import train

SPEAR_NEEDS = {  # callbacks.<key>: class, words of why SPEAR needs it
    "baseline": ("P50Baseline", "P50 recalibration"),
    "sil_warmup": ("SILWarmup", "replay losses"),
    "tool_reward": ("ToolRewardSchedule", "bonus is scaled by λ(t)"),
}


def _built(tmp_path, *overrides):
    """learner, data module and ``name -> callback`` (None where set to null) as train.py builds them."""
    cfg = compose_cfg(tmp_path, ["tool=unsafe", *overrides])  # the check reads the objects, not the sandbox
    learner = instantiate(cfg.learner, _convert_="all")
    data = instantiate(cfg.data, _convert_="all")
    named = {k: instantiate(c, _convert_="all") if c else None for k, c in cfg.callbacks.items()}
    return learner, data, named


@pytest.fixture(scope="module")
def spear(tmp_path_factory):
    return _built(tmp_path_factory.mktemp("spear"))


def test_train_py_refuses_spear_without_its_baseline_at_start(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            *TINY_RUN,
            "loss=spear",
            "~callbacks.baseline",
            f"run_dir={tmp_path}",
            f"hydra.run.dir={tmp_path}/hydra",
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = next(
        line for line in (proc.stdout + proc.stderr).splitlines() if "config error" in line
    )  # one line
    for words in (
        "callbacks.baseline (callbacks.P50Baseline)",
        "removed (`~callbacks.baseline`",
        "replay is on",
        "P50 recalibration",
        "data.replay=null",
    ):
        assert words in error, (words, error)
    assert not (tmp_path / "metrics.csv").exists()  # refused before any rollout


@pytest.mark.parametrize("key", sorted(SPEAR_NEEDS))
def test_each_callback_spear_needs_is_named_when_removed_or_null(key, spear):
    learner, data, named = spear
    cls, why = SPEAR_NEEDS[key]
    removed = {k: v for k, v in named.items() if k != key}
    with pytest.raises(ConfigError) as err:
        check_algorithm_callbacks(data, learner, removed)
    assert f"callbacks.{key} (callbacks.{cls}) was removed (`~callbacks.{key}`" in str(err.value)
    assert why in str(err.value)
    assert not any(f"callbacks.{other}" in str(err.value) for other in SPEAR_NEEDS if other != key)
    with pytest.raises(ConfigError, match=rf"callbacks\.{key} \(callbacks\.{cls}\) was set to null"):
        check_algorithm_callbacks(data, learner, {**named, key: None})


def test_the_need_follows_the_objects_not_the_loss_name(spear, tmp_path):
    learner, _, named = spear
    no_algorithm_callbacks = {k: v for k, v in named.items() if k not in SPEAR_NEEDS}
    # loss=spear without replay: no SIL warm-up or baseline needed, still the tool-reward schedule
    _, data, _ = _built(tmp_path / "a", "loss=spear", "data.replay=null")
    with pytest.raises(ConfigError) as err:
        check_algorithm_callbacks(data, learner, no_algorithm_callbacks)
    assert "callbacks.tool_reward" in str(err.value) and "baseline" not in str(err.value)
    assert "sil_warmup" not in str(err.value)
    # Dr.BoT (no replay, no bonus) needs none of them
    _, drbot, _ = _built(tmp_path / "b", "loss=drbot")
    kept = check_algorithm_callbacks(drbot, learner, {**no_algorithm_callbacks, "tool_reward": None})
    assert {type(c).__name__ for c in kept} == {
        type(c).__name__ for c in no_algorithm_callbacks.values() if c
    }


def test_contract_order_puts_writers_of_the_record_before_its_report(spear):
    learner, data, named = spear
    backwards = dict(reversed(named.items()))  # report before validation and the entropy monitor
    order = [type(c).__name__ for c in check_algorithm_callbacks(data, learner, backwards)]
    assert order.index("Validation") < order.index("IterationReport")
    assert order.index("EntropyMonitor") < order.index("IterationReport")
    assert order.index("SILWarmup") < order.index("IterationReport")  # the report reads sched/sil_coef
    # callbacks without a contract keep their relative order
    free = [type(c).__name__ for c in backwards.values() if c is not None and not hasattr(c, "contract")]
    assert [n for n in order if n in free] == free
    as_configured = [type(c).__name__ for c in named.values() if c is not None]  # already a contract order
    assert [type(c).__name__ for c in check_algorithm_callbacks(data, learner, named)] == as_configured


def test_contracts_are_stated_in_the_docstring_and_a_cycle_is_refused():
    for cls in (
        callbacks.SILWarmup,
        callbacks.ToolRewardSchedule,
        callbacks.P50Baseline,
        callbacks.EntropyMonitor,
    ):
        assert cls.contract.reads and cls.contract.sets
        assert f"Reads: {', '.join(cls.contract.reads)}." in cls.__doc__
        assert f"Sets: {', '.join(cls.contract.sets)}." in cls.__doc__
    assert "Required (``callbacks.baseline``) when replay is on" in callbacks.P50Baseline.__doc__

    @contract(reads=("record.metrics.b",), sets=("record.metrics.a",))
    class A(L.Callback):
        pass

    @contract(reads=("record.metrics.a",), sets=("record.metrics.b",))
    class B(L.Callback):
        pass

    with pytest.raises(ValueError, match=r"cycle: \['A', 'B'\]"):
        contract_order([A(), B()])


def test_tool_reward_schedule_is_the_function_it_is_given():
    tool = instantiate(
        {
            "_target_": "callbacks.ToolRewardSchedule",
            "schedule": {"_target_": "spear_lit.algos.cosine_decay", "_partial_": True, "total_steps": 30},
        }
    )
    assert [tool.value(t) for t in (0, 15, 30, 31)] == [1.0, pytest.approx(0.5), 0.0, 0.0]
    assert tool.value(7) == cosine_decay(7, total_steps=30)
    assert callbacks.ToolRewardSchedule(None).value(5) == 0.0  # schedule: null = no tool reward
    with pytest.raises(ValueError, match=r"callbacks\.tool_reward\.schedule='cosine': must be a function"):
        callbacks.ToolRewardSchedule("cosine")


@pytest.mark.sandbox
def test_record_writers_listed_after_the_report_still_reach_its_rows(tmp_path):
    """Validation and the entropy monitor configured after the report: every row still has their metrics."""
    late = [
        "~callbacks.entropy",
        "+callbacks.late_entropy={_target_: callbacks.EntropyMonitor}",
        "+callbacks.late_validation={_target_: callbacks.Validation, every_n_iterations: 1, sampled: false}",
    ]
    cfg = compose_cfg(tmp_path, [*TINY_RUN, "iterations=2", "export_hf=false", *late])
    names = list(cfg.callbacks)
    assert names.index("report") < names.index("late_validation") and names.index("report") < names.index(
        "late_entropy"
    )
    train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= float(r["val/arith/accuracy"]) <= 1.0 and float(r["perf/validation_s"]) > 0
        assert math.isfinite(float(r["policy/entropy_vs_start"]))
    assert float(rows[0]["policy/entropy_vs_start"]) == 1.0
