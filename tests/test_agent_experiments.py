"""The ALFWorld/WebShop experiments (conf/experiment/{alfworld,webshop}_*.yaml over conf/agent/):

* every one composes and instantiates (the 1.5B ones with a Qwen2.5-1.5B-Instruct-shaped model on the meta
  device), and the paper ones carry the numbers of SPEAR_SPEC §12;
* cold-start SFT rows come from the agent's expert, in the prompt format of the tiny RL experiments;
* a tiny WebShop SPEAR run goes through ``train.train`` end to end and writes metrics.csv (ALFWorld too,
  with its games generated on first use);
* GiGPO advantages reach the rows: within a group, steps taken from the same observation get the step term.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import REPO, compose_cfg
from hydra.utils import instantiate
from omegaconf import OmegaConf

from callbacks.contracts import check_algorithm_callbacks
from datamodules.scoring import score_rows
from spear_lit.batch import Sample
from spear_lit.policy import builtin_checkpoint, byte_chat_tokenizer
from train import train

EXPERIMENTS = sorted(
    p.stem
    for pattern in ("alfworld_*.yaml", "webshop_*.yaml")
    for p in (REPO / "conf" / "experiment").glob(pattern)
)
PAPER = [e for e in EXPERIMENTS if "_1.5b_" in e]

# config.json of Qwen2.5-1.5B-Instruct (published architecture), for meta-device builds.
QWEN25_1_5B = dict(
    architectures=["Qwen2ForCausalLM"],
    model_type="qwen2",
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=8960,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    torch_dtype="bfloat16",
)


@pytest.fixture(scope="module")
def qwen_1_5b(tmp_path_factory) -> Path:
    """A fake Qwen2.5-1.5B-Instruct directory: its config.json and a saveable (byte) tokenizer."""
    d = tmp_path_factory.mktemp("qwen2.5-1.5b-instruct")
    byte_chat_tokenizer().save_pretrained(d)
    (d / "config.json").write_text(json.dumps(QWEN25_1_5B))
    return d


def _compose(name: str, run_dir: Path, extra=(), model_dir: Path | None = None):
    """``+experiment=name`` with the values a user must give filled in; returns (cfg, is_1.5b)."""
    base = [f"+experiment={name}", *extra]
    cfg = compose_cfg(run_dir, base)
    fill, large = [], False
    if OmegaConf.is_missing(cfg.model, "path"):
        fill += [f"model.path={model_dir}", "+model.meta=true"]
        large = True
    elif str(cfg.model.path).startswith("builtin:"):
        try:
            builtin_checkpoint(cfg.model.path.split(":", 1)[1])
        except FileNotFoundError:  # the shipped tiny checkpoint is not built yet: same architecture, random
            fill += ["model.path=null"]
    if "data_path" in cfg.data.agent.env.keys():  # ALFWorld: never touch ~/.cache from a test
        fill += [f"data.agent.env.data_path={run_dir / 'alfworld'}"]
    return compose_cfg(run_dir, base + fill), large


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(name, qwen_1_5b, tmp_path):
    cfg, large = _compose(name, tmp_path, model_dir=qwen_1_5b)
    assert not OmegaConf.missing_keys(cfg)
    learner = instantiate(cfg.learner, _convert_="all")
    data = instantiate(cfg.data, _convert_="all")
    data.connect(learner)
    named = {
        k: instantiate(c, _convert_="all") if c else None for k, c in (cfg.get("callbacks") or {}).items()
    }
    callbacks = check_algorithm_callbacks(
        data, learner, named
    )  # train.py's check: no needed callback is missing
    agent = data.agent
    assert type(agent).__name__ == "EnvAgent" and agent.name == name.split("_")[0]
    assert agent._pools == {}  # environments (ALFWorld: worker processes) start only when first used
    model = learner.policy_source.model()
    n_params = sum(p.numel() for p in model.parameters())
    if large:  # Qwen2.5-1.5B-Instruct: 1.54B parameters (tied embeddings)
        assert next(model.parameters()).is_meta and 1.4e9 < n_params < 1.7e9, n_params
        _check_paper_settings(name, cfg, learner, data, callbacks)
    else:
        assert (
            0 < n_params < 50e6 and model.config.max_position_embeddings >= 2048
        )  # compact prompts: ~900 tokens
        assert agent.prompt.compact
        trainer = instantiate(cfg.trainer, callbacks=callbacks, _convert_="all")
        assert trainer.callbacks
    if name.endswith("_sft"):  # the SFT data are rendered exactly as the tiny RL experiments' rollouts
        assert type(data).__name__ == "ExpertTraceDataModule" and data.task is None
        rl, _ = _compose(name.replace("_sft", "_spear"), tmp_path)
        sft_agent, rl_agent = OmegaConf.to_container(cfg.data.agent), OmegaConf.to_container(rl.data.agent)
        assert sft_agent.pop("train_tasks") is None  # SFT demonstrates on every training task
        rl_agent.pop("train_tasks")  # RL may train on the first few (webshop_tiny: 4)
        assert sft_agent == rl_agent
        assert OmegaConf.to_container(cfg.model.tiny) == OmegaConf.to_container(rl.model.tiny)


def _check_paper_settings(name: str, cfg, learner, data, callbacks):
    """SPEAR_SPEC §12: the ALFWorld/WebShop settings and the GRPO / Dr.BoT / SPEAR / GiGPO table."""
    env = name.split("_")[0]
    algo = name.rsplit("_", 1)[1]
    gigpo = "_gigpo_" in name
    steps, mini, micro, iterations, max_model_len = {
        "alfworld": (50, 1024, 8, 200, 2048 + 512),
        "webshop": (15, 256, 4, 350, 4096 + 512),
    }[env]
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.strategy.data_parallel_size) == (1, 2, 2)
    eng = data.engine
    assert type(eng).__name__ == "VLLMEngine" and (eng.tp, eng.gpu_memory_utilization) == (1, 0.6)
    assert eng.max_model_len == max_model_len
    assert (data.B, data.n, data.mini_batch_rows, data.micro_batch_rows, data.L, data.iterations) == (
        32,
        8,
        mini,
        micro,
        512,
        iterations,
    )
    assert (data.temperature, data.top_p, data.val_temperature, data.val_max_problems) == (1.0, 1.0, 0.4, 128)
    agent = data.agent
    assert (agent.max_steps, agent.invalid_penalty, agent.gamma, agent.eval_envs) == (steps, 0.1, 0.95, 128)
    assert (
        agent.env_factory.keywords["max_steps"] == steps
        and agent.env_factory.keywords["reward_scale"] == 10.0
    )
    assert not agent.prompt.compact and agent.prompt.history_len == 2
    assert learner.optimizer_factory.keywords["lr"] == 1e-6
    assert set(learner.terms) == {"policy", "entropy"} and learner.terms["entropy"].coef == 0.001  # no KL
    policy = learner.terms["policy"]
    obj = policy.objective
    assert obj.keywords["clip_low"] == 0.2 and obj.keywords["clip_high"] == (0.2 if algo == "grpo" else 0.28)
    assert policy.aggregation.func.__name__ == ("token_mean" if algo == "grpo" else "seq_mean_token_sum_norm")
    assert set(data.filters) == (
        set() if algo == "grpo" else {"overlong", "incomplete", "repetitive", "unreadable"}
    )
    assert data.group_keep_ratio == (1.0 if algo == "grpo" else 0.75)
    adv = data.advantage
    if gigpo:  # mean_std_norm in every GiGPO variant (SPEAR_SPEC §2.2)
        assert adv.func.__name__ == "gigpo" and adv.keywords == {"step_weight": 1.0, "norm_by_std": True}
    else:
        assert adv.func.__name__ == "grpo" and adv.keywords == {"norm_by_std": algo == "grpo"}
    by_type = {type(c).__name__: c for c in callbacks}
    assert not by_type["Validation"].greedy and by_type["Validation"].sampled  # sampled at temperature 0.4
    tool = by_type["ToolRewardSchedule"]
    if algo == "spear":
        assert obj.func.__name__ == "clip_cov_loss"
        assert (obj.keywords["ratio"], obj.keywords["lb"], obj.keywords["ub"]) == (2e-4, 1.0, 5.0)
        rep = policy.replay_objective
        assert rep.func.__name__ == "clip_cov_loss" and rep.keywords["clip_high"] == 0.28
        assert (rep.keywords["ratio"], rep.keywords["lb"], rep.keywords["ub"]) == (0.02, 2.0, 60.0)
        r = data.replay.buffer
        assert (r.capacity, r.tolerate_steps, r.trigger_factor, r.decay, r.norm_by_std) == (
            2048,
            5,
            1.5,
            -1.0,
            False,
        )
        assert not r.require_tool_call
        sil = by_type["SILWarmup"]
        assert (sil.peak, sil.total) == (1.0, 200) and tool.schedule.keywords == {"total_steps": 200}
        assert tool.schedule.func.__name__ == "cosine_decay"
        assert by_type["P50Baseline"].history.capacity == 10240
        assert data.toolcall_bonus.func.__name__ == "standard_bonus"
    else:
        assert obj.func.__name__ == "ppo_clip_loss" and obj.keywords["clip_c"] == 10.0
        assert data.replay is None and data.toolcall_bonus is None and tool.schedule is None


def test_every_algorithm_has_its_gigpo_twin_on_both_environments():
    for env in ("alfworld", "webshop"):
        for algo in ("grpo", "drbot", "spear"):
            assert {f"{env}_1.5b_{algo}", f"{env}_1.5b_gigpo_{algo}", f"{env}_tiny_{algo}"} <= set(
                EXPERIMENTS
            )
        assert f"{env}_tiny_sft" in EXPERIMENTS


# ------------------------------------------------------------------------------------------ SFT rows


def test_sft_rows_are_the_agent_experts_steps_and_a_few_steps_train(tmp_path):
    cfg, _ = _compose(
        "webshop_tiny_sft",
        tmp_path,
        [
            "data.num_examples=3",
            "data.batch_size=4",
            "trainer.max_steps=2",
            "trainer.logger=null",
            "~callbacks.checkpoint",
            "~callbacks.progress",
        ],
    )
    metrics, objs = train(cfg)
    data, tok = objs["data"], objs["data"].tokenizer
    responses = [tok.decode(r["response_ids"]) for r in data.rows]
    assert responses[0].startswith("<think></think><action>search[") and responses[0].endswith(
        "</action><|im_end|>"
    )
    prompts = [tok.decode(r["prompt_ids"]) for r in data.rows]
    # whole expert episodes, up to the purchase; agent=webshop_tiny numbers its actions: clicks are numbers
    assert all(re.search(r"<action>\d+</action>", r) for r in responses if "search[" not in r)
    buys = [
        r
        for p, r in zip(prompts, responses)
        if (m := re.search(r"(\d+): click\[buy now\]", p)) and f"<action>{m.group(1)}</action>" in r
    ]
    assert len(buys) == 3
    assert all(r["response_mask"] == [1] * len(r["response_ids"]) for r in data.rows)
    assert data.agent._pools == {}  # the environments were closed once the rows were built
    assert objs["trainer"].global_step == 2 and torch.isfinite(torch.tensor(metrics["sft/loss"]))
    assert (tmp_path / "policy_hf" / "config.json").exists()


def test_exactly_one_source_of_demonstrations(tmp_path):
    from datamodules.expert_data import ExpertTraceDataModule

    with pytest.raises(ValueError, match="exactly one of `task`"):
        ExpertTraceDataModule(None, agent=None)
    with pytest.raises(ValueError, match="exactly one of `task`"):
        ExpertTraceDataModule(object(), agent=object())


# ------------------------------------------------------------------------------------------ tiny runs

TINY = [
    "model.path=null",
    "iterations=2",
    "data.prompts_per_iteration=2",
    "data.group_size=2",
    "data.agent.max_steps=3",
    "max_response_len=40",
    "data.mini_batch_rows=8",
    "data.micro_batch_rows=8",
    "data.val_max_problems=2",
    "data.agent.eval_envs=2",
    "callbacks.validation.every_n_iterations=1",
    "spear.buffer_size=2",
    "trainer.logger=null",
    "export_hf=false",
]


def _metrics(run_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(run_dir / "metrics.csv")))


def test_webshop_tiny_spear_trains_end_to_end(tmp_path):
    cfg, _ = _compose("webshop_tiny_spear", tmp_path, TINY)
    _, objs = train(cfg)
    rows = _metrics(tmp_path)
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    # a random byte policy never writes an action: 2 x 2 episodes of 3 invalid steps; each step row costs
    # -0.1, but a trajectory's reward (what rollout/reward_mean and group statistics use) is its
    # environment reward, 0 (SPEAR_SPEC §5.1, §8.5: one value per trajectory)
    assert all(float(r["rollout/turns_mean"]) == 3 and float(r["rollout/success_rate"]) == 0 for r in rows)
    assert all(float(r["rollout/reward_mean"]) == pytest.approx(0.0) for r in rows)
    assert "val/webshop/accuracy" in rows[0] and "val/webshop/accuracy_sampled" in rows[0]
    assert objs["trainer"].global_step >= 2


def test_alfworld_tiny_spear_generates_its_games_once_and_trains(tmp_path):
    from spear_lit.envs.alfworld.cache import ensure_games

    games = tmp_path / "alfworld"  # where _compose points the game cache
    cfg, _ = _compose(
        "alfworld_tiny_spear", tmp_path, [*TINY, "data.agent.env.games={train: [0, 2], valid_seen: [2, 3]}"]
    )
    train(cfg)
    rows = _metrics(tmp_path)
    assert [int(r["iteration"]) for r in rows] == [1, 2] and "val/alfworld/accuracy" in rows[0]
    train_dir, val_dir = games / "seed0-0-2", games / "seed0-2-3"
    assert len(list(train_dir.glob("train/*/*/game.tw-pddl"))) == 2
    assert len(list(val_dir.glob("valid_seen/*/*/game.tw-pddl"))) == 1
    stamp = (train_dir / ".train.complete").stat().st_mtime_ns
    assert ensure_games(games, "train", seed=0, start=0, stop=2) == str(
        train_dir
    )  # cached: not generated again
    assert (train_dir / ".train.complete").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------------------------ GiGPO


def test_gigpo_step_term_reaches_rows_of_a_group_that_share_an_anchor(tmp_path):
    cfg, _ = _compose("webshop_tiny_spear", tmp_path, ["advantage=gigpo"])  # conf/advantage/gigpo.yaml
    data = instantiate(cfg.data, _convert_="all")
    assert data.advantage.keywords == {
        "step_weight": 1.0,
        "norm_by_std": True,
    }  # not SPEAR's norm_by_std false

    def row(group, episode, score, step_return, anchor):
        return Sample(
            prompt_ids=[1],
            response_ids=[2],
            response_mask=[1],
            group=group,
            episode=episode,
            score=score,
            success=score > 0,
            num_tool_calls=2,
            step_return=step_return,
            anchor=anchor,
        )

    samples = [
        row(0, 0, 10.0, 9.5, "A"),
        row(0, 0, 10.0, 10.0, "B"),  # group 0, episode 0: won (reward 10)
        row(0, 1, 0.0, 0.0, "A"),
        row(0, 1, 0.0, 0.0, "C"),  # group 0, episode 1: lost, started in A too
        row(1, 2, 0.0, 0.0, "A"),
        row(1, 2, 0.0, 0.0, "D"),
    ]  # group 1: same text "A", another group
    rows = score_rows(samples, 1, prompts_per_iteration=data.B, max_response_len=data.L, filters=data.filters)
    adv = data.advantage(rows.rewards, rows.group_ids, rows.step_returns, rows.anchor_ids)
    # episode term, group 0 rows [10, 10, 0, 0]: mean 5, unbiased std sqrt(100/3) = 5.773503 -> +-0.866025;
    # group 1 rows [0, 0]: 0. Step term, step group (0, "A") = returns [9.5, 0]: mean 4.75, std 6.717514
    # -> +-0.707107; every other anchor is alone in its group (incl. group 1's "A") -> 0.
    e, s = 5 / (100 / 3) ** 0.5, 4.75 / (2 * 4.75**2) ** 0.5
    assert adv.tolist() == pytest.approx([e + s, e, -e - s, -e, 0.0, 0.0], abs=1e-5)
    grpo = instantiate(
        compose_cfg(tmp_path, ["+experiment=webshop_tiny_grpo", "model.path=null"]).data.advantage
    )
    plain = grpo(rows.rewards, rows.group_ids, rows.step_returns, rows.anchor_ids)
    assert plain.tolist() == pytest.approx([e, e, -e, -e, 0.0, 0.0], abs=1e-5)  # GRPO: no step term
