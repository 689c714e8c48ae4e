"""The memory plan (``python -m spear_lit.plan``, spear_lit/plan.py): its fake-tensor simulation agrees with
the same step on real tensors and real weights on 2 CPU ranks, it moves the right way with the sizes, and
``train.py`` refuses at start a configuration that does not fit."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys

import pytest
import torch.multiprocessing as mp
from helpers import REPO, subprocess_env

# A small FSDP2 configuration whose logits matter (vocabulary 8192), rows of 64 + max_response_len tokens
SMALL = [
    "trainer=fsdp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "model=tiny_random",
    "+model.tiny.vocab_size=8192",
    "+model.tiny.max_position_embeddings=4096",
    "data.agent.max_prompt_len=64",
    "max_response_len=448",
    "data.micro_batch_tokens=1024",
]


def _plan(overrides, device_gib: float = 80.0) -> dict:
    from spear_lit import plan

    return plan.make_plan(plan.compose(overrides), device_gib)


def _real_rank(rank: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    from spear_lit import plan

    cfg = plan.compose(overrides)
    s = plan.setup_of(cfg, plan.instantiate_source(cfg).config())
    step = plan.run_step(cfg, s, fake=False)
    with open(f"{out}/real{rank}.json", "w") as f:
        json.dump({"train": step["train"]["Total"], "old_logp": step["old_logp"]["Total"]}, f)
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_plan_agrees_with_the_same_step_on_real_tensors_on_2_cpu_ranks(tmp_path):
    """Fake tensors on a fake 2-rank group vs real weights (read on rank 0, broadcast into the shards as
    train.py does) and real tensors on 2 gloo ranks, tracked alike: the peaks agree within 10 %."""
    mp.start_processes(_real_rank, args=(_port(), SMALL, str(tmp_path)), nprocs=2, start_method="spawn")
    real = [json.loads((tmp_path / f"real{k}.json").read_text()) for k in range(2)]
    from spear_lit import plan

    cfg = plan.compose(SMALL)
    s = plan.setup_of(cfg, plan.instantiate_source(cfg).config())
    fake = plan.simulate(cfg, s)
    for phase in ("train", "old_logp"):
        want = max(r[phase] for r in real)
        got = fake[phase]["Total"]
        assert abs(got / want - 1) < 0.10, (phase, got, want)
    assert fake["train"]["Total"] > 50 * 2**20  # the logits' chunks and activations: not a trivial peak


def test_the_plan_grows_with_the_rows_and_shrinks_with_sequence_parallelism_and_checkpointing():
    """Saved activations are linear in the micro-batch's tokens (longer rows, more padded rows); sequence
    parallelism 2 halves them on each rank, gradient checkpointing keeps only the layers' inputs."""
    base = _plan(SMALL)["train"]
    longer = _plan([*SMALL, "max_response_len=1984", "data.micro_batch_tokens=2048"])["train"]
    padded = [*SMALL, "data.micro_batch_tokens=null"]
    rows2, rows4 = (_plan([*padded, f"data.micro_batch_rows={n}"])["train"] for n in (2, 4))
    sp = _plan([*SMALL, "trainer.strategy.sequence_parallel_size=2"])["train"]
    ckpt = _plan([*SMALL, "+model.gradient_checkpointing=true"])["train"]
    act = lambda t: t["activations"]  # noqa: E731
    assert 1.8 < act(longer) / act(base) < 2.2 and longer["micro_step_peak"] > base["micro_step_peak"]
    assert 1.8 < act(rows4) / act(rows2) < 2.2 and rows4["micro_step_peak"] > rows2["micro_step_peak"]
    assert 0.4 < act(sp) / act(base) < 0.6 and sp["micro_step_peak"] < base["micro_step_peak"]
    assert act(ckpt) < 0.2 * act(base) and ckpt["micro_step_peak"] < base["micro_step_peak"]


def test_train_refuses_a_configuration_that_does_not_fit_before_reading_weights(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            *SMALL,
            "plan.device_gib=0.5",  # below the stated CUDA context + NCCL alone
            "iterations=1",
            f"run_dir={tmp_path}",
            f"hydra.run.dir={tmp_path}/hydra",
        ],
        cwd=REPO,
        env={**subprocess_env(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "the memory plan does not fit 0.5 GiB per GPU" in out, out[-3000:]
    assert "verdict: DOES NOT FIT" in out and "plan.check=false" in out
    assert not (tmp_path / "metrics.csv").exists()


@pytest.mark.parametrize("device_gib,fits", [(80.0, True), (0.5, False)])
def test_the_cli_prints_a_table_and_a_last_json_line(device_gib, fits):
    proc = subprocess.run(
        [sys.executable, "-m", "spear_lit.plan", f"--device-gib={device_gib}", *SMALL],
        cwd=REPO,
        env={**subprocess_env(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == (0 if fits else 1), proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["fits"] is fits and summary["device_gib"] == device_gib
    assert "| saved activations |" in proc.stdout
    assert summary["peak_gib"] == pytest.approx(summary["train"]["peak"], abs=1e-3)
