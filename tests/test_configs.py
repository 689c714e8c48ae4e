"""Every option of every config group and every experiment composes and instantiates (learner, data
module, callbacks, the model on the meta device for 32B runs, the Trainer where it can run on a CPU), and
the paper experiments carry the numbers of SPEAR_SPEC §12. Bad values fail with the key's name."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from callbacks.contracts import check_algorithm_callbacks
from spear_lit.config_check import ConfigError, check_config
from spear_lit.policy import builtin_checkpoint, byte_chat_tokenizer

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(
    d.name for d in CONF.iterdir() if d.is_dir() and d.name not in ("experiment", "debug")
)  # debug: test_debug.py
CASES = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
CASES += [("experiment", p.stem) for p in sorted((CONF / "experiment").glob("*.yaml"))]
SFT_BUNDLE = {("learner", "sft"), ("data", "expert"), ("callbacks", "sft"), ("loss", "none")}
HAS_BWRAP = shutil.which("bwrap") is not None

# Published architectures (config.json of Qwen2.5-32B-Instruct and Qwen3-32B), for meta-device builds.
QWEN25_32B = dict(
    architectures=["Qwen2ForCausalLM"],
    model_type="qwen2",
    hidden_size=5120,
    num_hidden_layers=64,
    num_attention_heads=40,
    num_key_value_heads=8,
    intermediate_size=27648,
    vocab_size=152064,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
)
QWEN3_32B = dict(
    architectures=["Qwen3ForCausalLM"],
    model_type="qwen3",
    hidden_size=5120,
    num_hidden_layers=64,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=25600,
    vocab_size=151936,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Fake 32B model directories (config + a saveable tokenizer) and AIME/DAPO files in their layouts."""
    root = tmp_path_factory.mktemp("config_inputs")
    dirs = {}
    for name, cfg in (("qwen2.5-32b", QWEN25_32B), ("qwen3-32b", QWEN3_32B)):
        d = root / name
        byte_chat_tokenizer().save_pretrained(d)
        (d / "config.json").write_text(json.dumps(cfg))
        dirs[name] = d
    dapo = root / "dapo_math_17k.jsonl"
    dapo.write_text(
        "\n".join(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": f"What is {i} * 7?"}],
                    "reward_model": {"ground_truth": str(7 * i)},
                }
            )
            for i in range(4)
        )
        + "\n"
    )
    aime = root / "aime_2024.jsonl"
    aime.write_text(
        "\n".join(json.dumps({"Problem": f"Compute {i} + 1.", "Answer": i + 1}) for i in range(3)) + "\n"
    )
    return {**dirs, "train": dapo, "val": aime}


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def _check(cfg) -> None:
    """train.py's start-up checks (spear_lit/config_check.py); ``???`` values (e.g. ALFWorld's data_path)
    are left to the missing-value check that train.py runs first."""
    primary = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))
    assert (
        check_config(
            OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(cfg, resolve=False), primary
        )
        == {}
    )


def _overrides(group: str, option: str, run_dir: Path) -> list[str]:
    if group == "experiment":
        ov = [f"+experiment={option}"]
    elif group == "term":  # not in the defaults list: added by name under loss.terms
        ov = [f"+term@loss.terms.{option}={option}"]
    elif group == "filter":  # added by name under data.filters, to GRPO's none
        ov = ["loss=grpo", f"+filter@data.filters.{option}={option}"]
    elif group == "agent":  # package header puts it at data.agent: Hydra names it agent@data.agent
        ov = [f"agent@data.agent={option}"]
    elif (group, option) in SFT_BUNDLE:  # only meaningful together: cold-start SFT
        ov = ["+experiment=sft_tiny", f"{group}={option}"]
    else:
        ov = [f"{group}={option}"]
    return [f"run_dir={run_dir}", *ov] + (
        [] if HAS_BWRAP or (group, option) == ("tool", "sandbox") else ["tool=unsafe"]
    )


def _required(cfg, option: str, inputs) -> tuple[list[str], bool]:
    """Values a user must give (`???`), filled with the fake inputs; True when the policy is 32B."""
    ov, large = [], False
    if OmegaConf.is_missing(cfg.model, "path"):
        ov += [
            f"model.path={inputs['qwen3-32b' if 'qwen3' in option else 'qwen2.5-32b']}",
            "+model.meta=true",
        ]
        large = True
    elif str(cfg.model.get("path")).startswith("builtin:"):
        try:
            builtin_checkpoint(cfg.model.path.split(":", 1)[1])
        except FileNotFoundError:  # the shipped tiny checkpoint is not built yet: same architecture, random
            ov += ["model.path=null"]
    elif cfg.model.get("path"):  # a local real model (smollm2_math_spear; tests/test_real_model.py loads it)
        ov += ["model.path=null"]
    if "train_files" in cfg.task.keys() and OmegaConf.is_missing(cfg.task, "train_files"):  # `in` skips ???
        ov += [f"task.train_files=[{inputs['train']}]", f"task.val_files=[{inputs['val']}]"]
    if OmegaConf.is_missing(cfg, "iterations"):
        ov += ["iterations=3"]
    return ov, large


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_config_composes_and_instantiates(group, option, inputs, tmp_path):
    if (group, option) == ("tool", "sandbox") and not HAS_BWRAP:
        pytest.skip("bubblewrap is not installed (the sandboxed tool checks it at construction)")
    if (group, option) == ("logger", "mlflow") and importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow is not installed (tests/test_loggers.py checks the install message)")
    if (group, option) == ("trainer", "deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]'; .ci/run installs it)")
    base = _overrides(group, option, tmp_path)
    extra, large = _required(_compose(base), option, inputs)
    cfg = _compose(base + extra)
    if (group, option) == (
        "rollout",
        "vllm_aime",
    ):  # TP 4 on the default one-process trainer: refused up front
        with pytest.raises(
            ConfigError, match=r"rollout\.tensor_parallel_size=4 must divide the world size 1"
        ):
            _check(cfg)
    else:
        _check(cfg)  # train.py's start-up checks accept every shipped option and experiment
    learner = instantiate(cfg.learner, _convert_="all")
    data = instantiate(cfg.data, _convert_="all")
    data.connect(learner)
    named = {
        k: instantiate(c, _convert_="all") if c else None for k, c in (cfg.get("callbacks") or {}).items()
    }
    callbacks = check_algorithm_callbacks(
        data, learner, named
    )  # train.py's check: no needed callback is missing
    try:
        model = learner.policy_source.model()
        n_params = sum(p.numel() for p in model.parameters())
        if large:  # the config really is the 32B one (Qwen2.5-32B: 32.8B with embeddings, Qwen3-32B: 32.8B)
            assert next(model.parameters()).is_meta
            assert 31e9 < n_params < 34e9, n_params
        else:
            assert 0 < n_params < 50e6
        if group == "experiment" and option.startswith("aime"):
            _check_paper_settings(option, cfg, learner, data, callbacks)
        if cfg.trainer.accelerator != "gpu":  # GPU-only trainer options are composed, not instantiated
            trainer = instantiate(cfg.trainer, callbacks=callbacks, _convert_="all")
            assert trainer.callbacks
    finally:
        close = getattr(getattr(data, "tool", None), "close", None)
        if close:
            close()


def _check_paper_settings(option, cfg, learner, data, callbacks):
    """SPEAR_SPEC §12, AIME table and common settings."""
    spear = option in ("aime_32b", "aime_qwen3_32b")
    by_type = {type(c).__name__: c for c in callbacks}
    assert (
        cfg.trainer.num_nodes == 16
        and cfg.trainer.devices == 8
        and cfg.trainer.strategy.data_parallel_size == 128
    )
    eng = data.engine
    # the paper's 0.9 assumed offloaded trainer state; conf/rollout/vllm_aime.yaml says why 0.85 here
    assert type(eng).__name__ == "VLLMEngine" and eng.tp == 4 and eng.gpu_memory_utilization == 0.85
    assert (data.B, data.n, data.mini_batch_rows, data.agent.max_turns, data.L) == (
        128,
        16,
        64 * 16,
        8,
        16384,
    )
    assert (data.temperature, data.val_temperature, data.val_top_p) == (1.0, 1.0, 0.6)
    assert learner.optimizer_factory.keywords["lr"] == 1e-6
    obj = learner.terms["policy"].objective
    assert obj.keywords["clip_high"] == (0.28 if option != "aime_32b_grpo" else 0.2)
    assert obj.func.__name__ == ("clip_cov_loss" if spear else "ppo_clip_loss")
    assert obj.keywords.get("clip_c", 10.0) == 10.0
    assert data.advantage.keywords["norm_by_std"] is (option == "aime_32b_grpo")
    assert learner.terms["policy"].aggregation.func.__name__ == (
        "token_mean" if option == "aime_32b_grpo" else "seq_mean_token_sum_norm"
    )
    assert set(data.filters) == (
        set() if option == "aime_32b_grpo" else {"overlong", "incomplete", "repetitive", "unreadable"}
    )
    assert data.group_keep_ratio == (1.0 if option == "aime_32b_grpo" else 0.75)
    tool = by_type["ToolRewardSchedule"]
    if spear:
        r = data.replay.buffer
        assert (r.capacity, r.tolerate_steps, r.decay) == (2048, 5, -1.0)
        sil = by_type["SILWarmup"]
        assert (sil.peak, sil.total) == (1.0, 300)
        assert tool.schedule.func.__name__ == "cosine_decay" and tool.schedule.keywords == {
            "total_steps": 200
        }
        assert by_type["P50Baseline"].history.capacity == 10240
        bonus = "qwen3_bonus" if "qwen3" in option else "standard_bonus"
        assert data.toolcall_bonus.func.__name__ == bonus
    else:
        assert data.replay is None and data.toolcall_bonus is None and tool.schedule is None


# ---------------------------------------------------------------- errors name the key
@pytest.mark.parametrize(
    "override, words",
    [
        (
            "callbacks.tool_reward.schedule=cosine",
            ["callbacks.tool_reward.schedule", "must be a function", "null"],
        ),
        (
            "+data.filters.bogus=true",
            ["data.filters.bogus=True", "_target_", "(samples, max_response_len) -> bool[N]"],
        ),
        (
            "+data.filters.shape={_target_:datamodules.variants.standard_bonus,_partial_:true}",  # not a filter's call shape
            ["data.filters.shape", "weight", "called as (samples, max_response_len)"],
        ),
        ("model.dtype=int3", ["model.dtype", "float32", "bfloat16", "float16"]),
    ],
)
def test_invalid_value_names_the_key_and_the_allowed_values(override, words, tmp_path):
    # tiny_sft's architecture with random weights (model.path=null): no checkpoint needed
    cfg = _compose([f"run_dir={tmp_path}", "model=tiny_sft", "model.path=null", "tool=unsafe", override])
    with pytest.raises(Exception) as err:
        instantiate(cfg.learner, _convert_="all")
        instantiate(cfg.data, _convert_="all")
        [instantiate(c, _convert_="all") for c in cfg.callbacks.values() if c]
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_unknown_key_without_plus_is_refused_by_name(tmp_path):
    with pytest.raises(Exception, match=r"data\.filters\.bogus"):
        _compose([f"run_dir={tmp_path}", "data.filters.bogus=true"])


@pytest.mark.parametrize("overrides", [["model=hf"], ["+experiment=aime_32b", "iterations=3"]])
def test_missing_model_path_names_the_key(overrides, tmp_path):
    cfg = _compose([f"run_dir={tmp_path}", *overrides])
    assert "model.path" in OmegaConf.missing_keys(cfg)
    # Instantiating reaches it through `learner.policy: ${model}`, so OmegaConf names the alias
    # (learner.policy.path); train.py could report OmegaConf.missing_keys(cfg) up front instead.
    with pytest.raises(Exception, match=r"Missing mandatory value: \S*policy\.path"):
        instantiate(cfg.learner, _convert_="all")
