"""Results do not depend on the number of ranks (DESIGN.md, "Rules"; SPEAR_SPEC §5.4, §8.5).

The real data module and learner run ``python train.py`` under DDP (gloo, CPU) with 1, 2 and 4 processes,
fed by a deterministic agent (tests/rank_agent.py) whose trajectories depend only on (seed, iteration,
group uid). Filter decisions, replay decisions and sizes, the rows (and their advantages) of every
optimizer step, every per-iteration metric and the final parameters must agree.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import REPO, subprocess_env
from safetensors.torch import load_file

from spear_lit.training.checkpoints import read_checkpoint

ITERATIONS = 4
RUN = [
    f"iterations={ITERATIONS}",
    "data.prompts_per_iteration=8",
    "data.group_size=4",
    "data.mini_batch_rows=8",
    "data.micro_batch_rows=3",
    "max_response_len=40",
    "spear.buffer_size=3",
    "tool=unsafe",
    "data.agent._target_=rank_agent.DeterministicAgent",
    "callbacks.validation.every_n_iterations=2",
    "data.val_max_problems=8",
    "data.val_group_size=4",
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.logger=null",
    "+callbacks.rows._target_=rank_agent.RowLog",
    # Clip-Cov's random token pick is per micro-batch by definition (SPEAR_SPEC §3.2: k = ratio·Σm of the
    # micro-batch, covariance centred on its means), so it follows how rows are split into micro-batches,
    # on one rank too. Bounds no token reaches leave Clip-Cov = the clipped PPO objective here; every
    # other part of SPEAR (filters, advantages, P50, replay, SIL coefficient, tool bonus) runs as configured.
    "loss.terms.policy.objective.lb=1e9",
    "loss.terms.policy.objective.ub=2e9",
    "loss.terms.policy.replay_objective.lb=1e9",
    "loss.terms.policy.replay_objective.ub=2e9",
]
# columns that legitimately differ: wall-clock timings and speeds
TIMING = ("perf/",)


def _run(world: int, out, extra=(), rows_dir=None, check=True):
    rows_dir = rows_dir or out / "rows"  # read right after the run: runs may share it
    args = [
        *RUN,
        *extra,
        f"trainer.devices={world}",
        f"run_dir={out}",
        f"+callbacks.rows.out_dir={rows_dir}",
        f"hydra.run.dir={out}/hydra",
    ]
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if not check:
        return proc
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    steps = sorted(
        tuple(r) for k in range(world) for r in json.loads((rows_dir / f"rows{k}.json").read_text())
    )
    params = load_file(out / "policy_hf" / "model.safetensors")
    return rows, steps, params


def test_decisions_metrics_and_parameters_do_not_depend_on_the_number_of_ranks(tmp_path):
    _check_invariance({w: _run(w, tmp_path / f"ws{w}") for w in (1, 2, 4)})


def test_one_on_policy_step_per_iteration_does_not_depend_on_the_number_of_ranks(tmp_path):
    # All of an iteration's rows in one on-policy step: no old-log-prob pass; each rank's step gives the rows
    # it stores for replay their old log-probs, and later replays draw them across ranks.
    one_step = ["data.mini_batch_rows=64"]
    results = {w: _run(w, tmp_path / f"ws{w}", one_step) for w in (1, 2)}
    assert all(float(r["perf/old_logp_s"]) < 0.05 for r in results[1][0])  # the pass did not run
    _check_invariance(results)


def test_a_checkpoint_written_by_two_ranks_resumes_on_one_and_on_four(tmp_path):
    """Elastic resume: a checkpoint written after iteration 2 by 2 ranks, with rows in the replay buffer,
    continues on 1 and on 4 ranks exactly like the 2-rank run itself (the buffer's rows are re-dealt)."""
    every2 = ["callbacks.checkpoint.every_n_iterations=2"]  # a resume keeps every setting but trainer.*
    ref_rows, ref_steps, ref_params = _run(2, tmp_path / "ws2", every2, tmp_path / "rows")
    ckpt = tmp_path / "ws2" / "checkpoints" / "iter_00002.ckpt"
    assert float(ref_rows[1]["buffer/size"]) > 0  # the checkpoint's buffer holds rows of both ranks
    assert any(float(r["buffer/replayed"]) > 0 for r in ref_rows[2:])  # ... which later iterations replay
    for w in (1, 4):
        rows, steps, params = _run(w, tmp_path / f"ws{w}", [*every2, f"ckpt_path={ckpt}"], tmp_path / "rows")
        assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]  # the resumed run's csv carries 1-2 over
        _assert_same(w, (rows, steps, params), (ref_rows, [s for s in ref_steps if s[0] > 2], ref_params))

    # mid-iteration, the queued steps hold each rank's own rows: such a checkpoint resumes on 2 ranks only
    state = read_checkpoint(ckpt)
    queues = [r["queue"] for r in state["RolloutDataModule"]["ranks"]]
    assert all(queues)  # the iteration's last step, applied, its record not yet read by the callbacks
    for q in queues:
        q[-1].done = False  # as if preempted before that step
    torch.save(state, tmp_path / "mid.ckpt")
    proc = _run(
        1, tmp_path / "mid", [*every2, f"ckpt_path={tmp_path / 'mid.ckpt'}"], tmp_path / "rows", check=False
    )
    assert proc.returncode != 0 and "it resumes only on 2 ranks" in proc.stdout + proc.stderr


def _check_invariance(results: dict) -> None:
    rows1, steps1, params1 = results[1]
    assert [int(r["iteration"]) for r in rows1] == list(range(1, ITERATIONS + 1))
    # the scenario exercises what the test is about: groups dropped every iteration, replay fired
    assert all(float(r["filter/groups_dropped"]) == 2 for r in rows1)  # floor(0.75 * 8) = 6 of 8 kept
    assert any(float(r["buffer/replayed"]) > 0 for r in rows1), [r["buffer/replayed"] for r in rows1]
    assert any(kind == "replay" for _, kind, *_ in steps1)
    for w in sorted(results)[1:]:
        _assert_same(w, results[w], results[1])
        changed = any(not torch.equal(p, q) for p, q in zip(params1.values(), _initial().values()))
        assert changed  # the policy was trained


def _assert_same(w: int, run, reference) -> None:
    (rows, steps, params), (rows1, steps1, params1) = run, reference
    # the same rows, with the same advantages, in the same optimizer steps
    assert steps == steps1, f"world {w}"
    for a, b in zip(rows, rows1, strict=True):
        for k, v in b.items():
            if k.startswith(TIMING) or v == a[k]:
                continue
            x, y = float(a[k]), float(v)
            # float sums in another order (gradient all-reduce, metric all-reduce): relative 1e-4
            assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6) or (math.isnan(x) and math.isnan(y)), (
                f"world {w}, iteration {b['iteration']}, {k}: {x} vs {y}"
            )
    # final parameters: the same up to float summation order (see the tolerance note above)
    for name, p in params1.items():
        assert torch.allclose(params[name], p, rtol=1e-4, atol=1e-6), (
            f"world {w}: {name} differs by {float((params[name] - p).abs().max()):.2e}"
        )


def _initial():
    from spear_lit.policy import PolicySource

    return PolicySource("builtin:tiny-math-sft").model().state_dict()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
