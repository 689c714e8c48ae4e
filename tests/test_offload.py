"""FSDP2 CPU offload (trainer.strategy.cpu_offload, spear_lit/training/offload.py) on 2 CPU ranks.

On a CPU host the offload moves nothing (the device is the host), so what is tested is that the path runs
and changes no number: every fully_shard group gets FSDP2's CPUOffloadPolicy, the parameter shards and
AdamW's state are in host memory, and the run's rows, decisions, metrics and parameters equal the same run
without offload (tests/test_rank_invariance.py's deterministic scenario, FSDP2). The GPU memory it frees
and the transfer time it costs can only be measured on a GPU (not done: no GPU lent).
"""

from __future__ import annotations

import json

from test_rank_invariance import _assert_same, _run

FSDP = ["trainer=fsdp", "trainer.accelerator=cpu"]


def test_cpu_offload_changes_no_number_and_keeps_shards_and_adam_state_on_the_host(tmp_path):
    log = ["+callbacks.offload._target_=rank_agent.OffloadLog", f"+callbacks.offload.out_dir={tmp_path}/log"]
    reference = _run(2, tmp_path / "plain", FSDP)
    offloaded = _run(2, tmp_path / "offload", [*FSDP, "trainer.strategy.cpu_offload=true", *log])
    _assert_same(2, offloaded, reference)
    for r in (0, 1):
        record = json.loads((tmp_path / "log" / f"offload{r}.json").read_text())
        assert record == {
            "policies": ["CPUOffloadPolicy"],
            "param_devices": ["cpu"],
            "state_devices": ["cpu"],
        }
