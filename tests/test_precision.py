"""fp32 master weights with bf16 compute (spear_lit/training/precision.py), and fp32 wherever the algorithm
subtracts, whatever the default dtype or precision plugin.

The end-to-end part runs ``train.py`` on 2 FSDP2 CPU ranks (gloo) at the paper's lr 1e-6, fed by the
deterministic agent of tests/rank_agent.py (the same rows whatever the weights), under three precisions:
``32-true`` (the reference), ``bf16-mixed`` (what the recipes run: MixedPrecisionPolicy over fp32 shards)
and ``bf16-true`` with the explicit opt-in (pure bf16 weights and AdamW state, the old recipe).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, compose_cfg, subprocess_env
from omegaconf import OmegaConf
from test_aime_recipe import write_aime_inputs

from spear_lit.batch import TokenBatch
from spear_lit.config_check import ConfigError, check_config
from spear_lit.training import precision


def _check(cfg) -> None:
    primary = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "config.yaml"))
    check_config(
        OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(cfg, resolve=False), primary
    )


def test_rows_stay_fp32_under_a_bf16_default_dtype():
    rows = [
        {
            "prompt_ids": [5, 6],
            "response_ids": [7, 8, 9],
            "response_mask": [1, 0, 1],
            "old_logp": [-12.34, -0.5, -3.0],
        }
    ]
    with precision.default_dtype(torch.bfloat16):
        assert torch.zeros(1).dtype == torch.bfloat16  # what HalfPrecision's step context does
        b = TokenBatch.from_rows(rows, pad_id=0)
    assert torch.get_default_dtype() == torch.float32  # restored
    assert (b.old_logp.dtype, b.response_mask.dtype, b.advantages.dtype) == (torch.float32,) * 3
    # -12.34 in bf16 would be -12.3125 (8 significant bits); fp32 keeps it to 1e-6
    assert abs(float(b.old_logp[0, 0]) + 12.34) < 1e-6
    assert float(torch.tensor(-12.34).bfloat16()) == -12.3125


def test_mixed_precision_policy_and_compute_dtype():
    mp = precision.fsdp_mp_policy("bf16-mixed")
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert precision.fsdp_mp_policy("32-true") is None and precision.fsdp_mp_policy("bf16-true") is None
    assert precision.compute_dtype("bf16-mixed", torch.float32) == torch.bfloat16
    assert precision.compute_dtype("32-true", torch.float32) == torch.float32


def test_update_ratio_hand_worked():
    """θ = [3, 4] → [3.03, 4.04]: RMS(Δθ) / RMS(θ) = |Δθ| / |θ| = 0.05 / 5 = 0.01."""
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    ratio = precision.UpdateRatio([p])
    with ratio.measure():
        with torch.no_grad():
            p.mul_(1.01)
    assert ratio.value == pytest.approx(0.01, rel=1e-6)


def test_adamw_at_lr_1e6_moves_fp32_master_weights_but_not_bf16_ones():
    """The review's CPU check as a test: 20 AdamW steps at lr 1e-6 with a constant-sign gradient on
    N(0, 0.02) weights. With fp32 weights each step moves every weight by ~lr (update ratio ≈ 1e-6 / 0.02 =
    5e-5). With bf16 weights (and AdamW state) the update is below half a ULP for all but the ~2 % of
    weights nearest zero: almost nothing changes, and the ratio's RMS is ~sqrt(0.02) ≈ 0.14 of fp32's."""
    torch.manual_seed(0)
    w0 = torch.randn(256, 256) * 0.02
    ratios, changed = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.nn.Parameter(w0.clone().to(dtype))
        opt = torch.optim.AdamW([p], lr=1e-6, weight_decay=0.01)
        ratio, values = precision.UpdateRatio([p]), []
        for _ in range(20):
            p.grad = torch.ones_like(p)
            with ratio.measure():
                opt.step()
            values.append(ratio.value)
        ratios[dtype] = sum(values) / len(values)
        changed[dtype] = float((p.detach() != w0.to(dtype)).float().mean())
    assert ratios[torch.float32] == pytest.approx(1e-6 / 0.02, rel=0.05)
    assert ratios[torch.bfloat16] < 0.3 * ratios[torch.float32], ratios
    assert changed[torch.float32] > 0.99 and changed[torch.bfloat16] < 0.05, changed


def test_half_precision_weights_are_refused_at_start_up_naming_the_keys(tmp_path):
    base = ["+experiment=aime_32b", "model.path=builtin:tiny-math-sft", "iterations=1"]
    base += ["task.train_files=[x.parquet]", "task.val_files=[y.parquet]"]
    _check(compose_cfg(tmp_path, base))  # the recipe as shipped: fp32 master weights, bf16-mixed
    for bad, key in (
        ("trainer.precision=bf16-true", "trainer.precision=bf16-true"),
        ("model.dtype=bfloat16", "model.dtype=bfloat16"),
    ):
        with pytest.raises(ConfigError, match="learner.allow_half_precision_weights=true") as e:
            _check(compose_cfg(tmp_path, [*base, bad]))
        assert key in str(e.value) and "\n" not in str(e.value)
        _check(compose_cfg(tmp_path, [*base, bad, "learner.allow_half_precision_weights=true"]))  # opted in


def test_optimizer_refuses_half_precision_parameters_unless_allowed():
    params = [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))]
    with pytest.raises(ValueError, match="learner.allow_half_precision_weights=true"):
        precision.check_optimizer_params(params, allow=False)
    precision.check_optimizer_params(params, allow=True)


def test_unseeded_tensor_parallel_replicas_are_refused(tmp_path):
    base = ["+experiment=aime_32b", "model.path=builtin:tiny-math-sft", "iterations=1"]
    base += ["task.train_files=[x.parquet]", "task.val_files=[y.parquet]"]
    with pytest.raises(ConfigError, match="rollout.seed=null with rollout.tensor_parallel_size=4"):
        _check(compose_cfg(tmp_path, [*base, "rollout.seed=null"]))
    _check(compose_cfg(tmp_path, [*base, "rollout.seed=null", "rollout.tensor_parallel_size=1"]))


# ------------------------------------------------------------------------------ 2 FSDP2 ranks, lr 1e-6
# The AIME recipe itself (FSDP2, bf16-mixed over fp32 master weights, lr 1e-6), overriding only the device,
# sizes and paths, and its agent: the deterministic one gives every precision the same rows.
RUN = [
    "+experiment=aime_32b",
    "trainer.accelerator=cpu",
    "trainer.num_nodes=1",
    "trainer.devices=2",
    "trainer.strategy.data_parallel_size=2",
    "rollout=hf",
    "model.path=builtin:tiny-math-sft",
    "iterations=1",
    "data.prompts_per_iteration=8",
    "data.group_size=4",
    "data.mini_batch_rows=8",
    "data.micro_batch_rows=4",
    "max_response_len=40",
    "spear.buffer_size=2",
    "tool=unsafe",
    "data.agent._target_=rank_agent.DeterministicAgent",
    "correction=none",  # the scripted agent samples nothing: no sampler log-probs for the recipe's MIS
    "~callbacks.validation",
    "trainer.logger=null",
    "export_hf=false",
    "+callbacks.dtypes._target_=rank_agent.DtypeLog",
]


def _run(tmp_path, name: str, extra: list[str]) -> tuple[dict, list[str]]:
    out = tmp_path / name
    files = write_aime_inputs(tmp_path)
    args = [*RUN, f"task.train_files=[{files['train']}]", f"task.val_files=[{files['val'][0]}]"]
    args += [*extra, f"run_dir={out}", f"hydra.run.dir={out}/hydra", f"+callbacks.dtypes.out_dir={out}"]
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (row,) = list(csv.DictReader(open(out / "metrics.csv")))
    dtypes = sorted({d for k in range(2) for d in json.loads((out / f"dtypes{k}.json").read_text())})
    return row, dtypes


def test_the_aime_recipes_bf16_mixed_updates_like_fp32_and_pure_bf16_does_not(tmp_path):
    ref, ref_dtypes = _run(tmp_path, "fp32", ["trainer.precision=32-true"])
    mixed, mixed_dtypes = _run(tmp_path, "mixed", ["trainer.precision=bf16-mixed"])
    pure, pure_dtypes = _run(
        tmp_path, "pure", ["trainer.precision=bf16-true", "learner.allow_half_precision_weights=true"]
    )
    r_ref, r_mixed, r_pure = (float(r["policy/update_ratio"]) for r in (ref, mixed, pure))
    # Adam's first steps move each weight by ~lr whatever the gradient's scale: the bf16-compute gradient
    # gives the same update size as fp32 (measured 3.78989e-6 vs 3.78991e-6; pure bf16 3.9e-7)
    assert r_ref > 0 and abs(r_mixed / r_ref - 1) < 0.1, (r_ref, r_mixed)
    assert r_pure < 0.2 * r_ref, (r_ref, r_pure)  # bf16 weights: the lr-1e-6 update mostly rounds away
    fp32 = [d for d in ref_dtypes if not d.endswith("torch.float32")]
    assert not fp32 and ref_dtypes == mixed_dtypes == pure_dtypes, (ref_dtypes, mixed_dtypes, pure_dtypes)
    assert any(d.startswith("replay.old_logp") for d in pure_dtypes)  # the buffer was checked, under bf16
