"""Nothing overruns an engine: prompts over ``data.agent.max_prompt_len`` (or reaching the engine's context
length) are never sent, and a multi-turn episode ends, marked truncated, before prompt + response reaches
``max_model_len`` (vLLM raises on such a request and the other ranks would wait forever)."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, subprocess_env

from spear_lit.agents import ToolAgent
from spear_lit.policy import PolicySource
from spear_lit.rollout import HFEngine
from spear_lit.rollout.chat import prompt_ids
from spear_lit.tasks import FileMathTask
from spear_lit.tools import CodeInterpreter

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
BACKEND = "bwrap" if shutil.which("bwrap") else "unsafe"
FILLER = " (Please answer carefully.)"  # 26 characters: the byte tokenizer's 26 tokens


def write_problems(path, short: int = 6, medium: int = 2, long: int = 2) -> None:
    """AIME-2024-style jsonl: short arithmetic problems (34 prompt tokens with the chat template), medium
    ones (196) and long ones (1114)."""
    rng = random.Random(0)
    rows = []
    for kind, n, pad in (("short", short, 0), ("medium", medium, 6), ("long", long, 40)):
        for _ in range(n):
            a, b = rng.randrange(100, 999), rng.randrange(10, 99)
            rows.append({"Problem": f"Compute {a}*{b}.{FILLER * pad}", "Answer": a * b, "kind": kind})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


class RecordingEngine(HFEngine):
    """The real HF engine; records the longest request it was sent (prompt + its token budget)."""

    longest = 0

    def generate(self, prompts, *, max_new_tokens, **kw):
        self.longest = max([self.longest, *(len(p) + b for p, b in zip(prompts, max_new_tokens))])
        return super().generate(prompts, max_new_tokens=max_new_tokens, **kw)


@pytest.fixture(scope="module")
def tiny():
    src = PolicySource("builtin:tiny-math-sft")
    return src.model().eval(), src.tokenizer()


def _collect(tmp_path, tiny, *, max_prompt_len, max_model_len):
    path = tmp_path / "problems.jsonl"
    write_problems(path)
    task = FileMathTask(
        train_files=[str(path)], val_files=[str(path)], system_prompt=None, prompt_suffix=None
    )
    model, tok = tiny
    lengths = [len(prompt_ids(tok, p.prompt)) for p in task.val_problems()]
    assert sorted(set(lengths)) == [34, 196, 1114]  # 6 short, 2 medium, 2 long (the byte tokenizer)
    engine = RecordingEngine(max_model_len=max_model_len)
    engine.bind(model, tok)
    with CodeInterpreter(backend=BACKEND, num_workers=2) as tool:
        agent = ToolAgent(task, tool, max_turns=3, max_prompt_len=max_prompt_len)
        kw = dict(max_response_len=160, temperature=1.0, top_p=1.0)
        samples = agent.collect(engine, tok, t=1, seed=0, num_groups=10, group_size=2, shard=(0, 1), **kw)
        train_stats = agent.pop_stats()
        wins, n = agent.evaluate(engine, tok, shard=(0, 1), limit=None, greedy=True, **kw)
        val_stats = agent.pop_stats()
    problems = task.train_problems(10, random.Random(0))  # the draw collect made (seed 0)
    short = {i for i, p in enumerate(problems) if len(prompt_ids(tok, p.prompt)) == 34}
    # only the short problems' groups are rolled out, each keeping the group index of the draw
    assert {s.group for s in samples} == short and len(samples) == 2 * len(short)
    assert train_stats["prompts_dropped"] == 2 * (10 - len(short))
    # validation: the 4 others count as failed episodes (avg@k keeps its denominator), never sent
    assert n == 10 and val_stats["prompts_dropped"] == 4 and 0 <= wins <= 6
    return samples, train_stats, engine


def test_prompts_over_the_cap_are_never_sent(tmp_path, tiny):
    samples, stats, engine = _collect(tmp_path, tiny, max_prompt_len=100, max_model_len=None)
    assert engine.longest < 100 + 160  # the cap, not the context (1024), dropped medium and long ones


def test_episodes_end_marked_truncated_before_the_context_length(tmp_path, tiny):
    """A 150-token context: the medium (196) and long prompts reach it and are dropped without a cap; a short
    prompt's tool episode (34 + ~131 tokens) would cross it and ends, truncated, instead."""
    samples, stats, engine = _collect(tmp_path, tiny, max_prompt_len=None, max_model_len=150)
    assert engine.longest <= 150  # no request ever reached past the context length
    assert all(len(s.prompt_ids) + len(s.response_ids) <= 150 for s in samples)
    assert stats["context_truncated"] > 0
    truncated = [s for s in samples if len(s.prompt_ids) + len(s.response_ids) == 150]
    assert truncated and all(s.incomplete for s in truncated)  # filtered as incomplete, never a crash


ENGINES = [pytest.param("hf", id="rollout=hf")]
if HAVE_VLLM:
    ENGINES.append(
        pytest.param(
            "vllm_cpu", id="rollout=vllm_cpu", marks=[pytest.mark.vllm, pytest.mark.xdist_group("vllm")]
        )
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_a_run_with_over_long_prompts_goes_on_on_2_ranks(engine, tmp_path):
    """train.py on 2 DDP ranks, a context of 150 tokens and problems of up to ~1100: the run completes every
    iteration's steps on both ranks (a crashed replica would leave the other rank waiting at a collective)
    and counts what it dropped and truncated."""
    path = tmp_path / "problems.jsonl"
    write_problems(path, short=12, medium=2, long=2)
    out = tmp_path / "run"
    args = [
        "task=math_files",
        f"task.train_files=[{path}]",
        f"task.val_files=[{path}]",
        "task.system_prompt=null",
        "task.prompt_suffix=null",
        f"rollout={engine}",
        "rollout.max_model_len=150",
        "data.agent.max_prompt_len=100",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "iterations=2",
        "data.prompts_per_iteration=8",
        "data.group_size=2",
        "data.mini_batch_rows=8",
        "data.micro_batch_rows=4",
        "data.agent.max_turns=3",
        "data.val_max_problems=16",
        "callbacks.validation.every_n_iterations=2",
        "spear.buffer_size=2",
        "trainer.logger=null",
        "tool.num_workers=1",
        "export_hf=false",
        f"run_dir={out}",
        f"hydra.run.dir={out}/hydra",
    ]
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
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    steps = [int(r["optimizer_steps"]) for r in rows]
    assert 0 < steps[0] < steps[1], steps
    dropped = sum(float(r["rollout/prompts_dropped"]) for r in rows)
    assert dropped > 0 and dropped % 2 == 0  # whole groups of 2 episodes, over both ranks
    assert sum(float(r["rollout/context_truncated"]) for r in rows) > 0
    assert rows[-1]["val/aime/accuracy"] != ""  # validation ran over them too
