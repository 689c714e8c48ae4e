"""Failures are visible (issue 12 item 3): a sandbox that breaks mid-run is a metric and then an error,
a length that cannot hold one reply is refused at start-up, and machine load does not change a run."""

from __future__ import annotations

import csv
import multiprocessing as mp
import os

import lightning as L
import pytest
from helpers import TINY_RUN, compose_cfg

from train import train


class BreakSandbox(L.Callback):
    """After iteration ``after``, bubblewrap "disappears": idle sandbox workers die and new ones cannot start."""

    def __init__(self, after: int = 1):
        self.after = after

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mb = pl_module.current_minibatch
        if mb is not None and mb.last_of_iteration and mb.iteration == self.after:
            pool = trainer.datamodule.agent.tool._sandboxes
            pool._bwrap = "/nonexistent/bwrap"
            for worker in pool._idle:
                worker.kill()
            pool._idle.clear()


@pytest.mark.sandbox
def test_a_sandbox_failing_every_call_is_a_metric_then_stops_the_run(tmp_path):
    cfg = compose_cfg(
        tmp_path,
        [
            *TINY_RUN,
            "iterations=6",
            "data.tool_failure_patience=2",
            "+callbacks.breaker._target_=test_failures.BreakSandbox",
        ],
    )
    with pytest.raises(RuntimeError, match="tool failed on every call for 2 consecutive iterations"):
        train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert float(rows[0]["tool/error_rate"]) == 0 and float(rows[0]["tool/calls"]) > 0
    assert float(rows[1]["tool/error_rate"]) == 1  # iteration 2: every call failed, reported; 3 stopped it
    assert len(rows) == 2


def test_a_response_length_that_cannot_hold_one_reply_is_refused_at_start(tmp_path):
    with pytest.raises(ValueError, match=r"max_response_len=1 cannot hold the shortest useful reply"):
        train(compose_cfg(tmp_path, [*TINY_RUN, "max_response_len=1"]))


def _burn(stop):
    while not stop.is_set():
        sum(i * i for i in range(10_000))


@pytest.mark.sandbox
def test_the_same_seed_gives_the_same_run_under_machine_load(tmp_path):
    """Tool limits decide by CPU time, so two busy processes beside the run change nothing."""
    run = [*TINY_RUN, "iterations=3"]
    train(compose_cfg(tmp_path / "quiet", run))
    stop = mp.Event()
    burners = [mp.Process(target=_burn, args=(stop,), daemon=True) for _ in range(os.cpu_count() or 2)]
    for p in burners:
        p.start()
    try:
        train(compose_cfg(tmp_path / "loaded", run))
    finally:
        stop.set()
        for p in burners:
            p.join(timeout=10)

    def rows(d):
        return [
            {k: v for k, v in r.items() if not k.startswith("perf/")}
            for r in csv.DictReader(open(d / "metrics.csv"))
        ]

    assert rows(tmp_path / "loaded") == rows(tmp_path / "quiet")
