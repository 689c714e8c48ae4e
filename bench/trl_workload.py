"""The workload of bench/vs_trl.py, shared by both trainers: fixed-length prompts, a substring reward, no tool.

Every prompt is "Add A and B." padded with spaces so that its ChatML rendering (the byte tokenizer, one token
per byte) is exactly ``PROMPT_TOKENS`` ids; every completion is exactly ``max_new_tokens`` long because EOS is
forbidden until then (TRL: ``generation_kwargs={"min_new_tokens": 128}``; ours: :class:`FixedLengthHFEngine`).
Bench-only: forbidding EOS means the samples no longer come from exactly softmax(z/T), which training needs.
"""

from __future__ import annotations

import random
import time

import lightning as L
import torch

from spear_lit.policy.tokenizer import byte_chat_tokenizer
from spear_lit.rollout import HFEngine
from spear_lit.rollout.chat import prompt_ids
from spear_lit.tasks.base import Problem

PROMPT_TOKENS = 64


def add_problem(a: int, b: int, tokenizer=None) -> Problem:
    """``Add a and b.`` whose chat-templated prompt is exactly ``PROMPT_TOKENS`` token ids."""
    tok = tokenizer or byte_chat_tokenizer()
    text = f"Add {a} and {b}."
    overhead = len(prompt_ids(tok, "", None))  # <|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n
    text = text.ljust(PROMPT_TOKENS - overhead)
    n = len(prompt_ids(tok, text, None))
    if n != PROMPT_TOKENS:
        raise AssertionError(f"prompt is {n} tokens, not {PROMPT_TOKENS}")
    return Problem(uid=f"add-{a}-{b}", prompt=text, answer=str(a + b))


def draw_problems(n: int, rng: random.Random, tokenizer=None) -> list[Problem]:
    """``n`` addition problems with operands in [10, 999]."""
    tok = tokenizer or byte_chat_tokenizer()
    return [add_problem(rng.randint(10, 999), rng.randint(10, 999), tok) for _ in range(n)]


def substring_reward(completion: str, answer: str) -> float:
    """1 if the sum appears anywhere in the completion, else 0 (the same function in both trainers)."""
    return 1.0 if answer in completion else 0.0


class AddTask:
    """A :class:`spear_lit.tasks.base.Task` of :func:`add_problem` prompts scored by :func:`substring_reward`."""

    name = "add"
    system_prompt = None

    def __init__(self):
        self._tok = byte_chat_tokenizer()

    def train_problems(self, n: int, rng: random.Random) -> list[Problem]:
        return draw_problems(n, rng, self._tok)

    def val_problems(self) -> list[Problem]:
        return draw_problems(8, random.Random(1), self._tok)

    def score(self, response: str, problem: Problem) -> tuple[float, str | None]:
        return substring_reward(response, problem.answer), None


class NoTool:
    """The tool of a single-turn agent: never called (``max_turns=1`` runs no tool round)."""

    def __call__(self, codes: list[str]) -> list[str]:
        raise RuntimeError("the vs_trl workload has no tool; a single-turn agent never calls one")


class FixedLengthHFEngine(HFEngine):
    """Our HF engine with EOS forbidden (its logit set to -inf at every step), as TRL's
    ``generation_kwargs={"min_new_tokens": ...}`` with the budget: every completion has exactly the budget's
    length."""

    def next_token_logits(self, logits, step):
        return logits.index_fill(-1, torch.tensor([self.tokenizer.eos_token_id]), float("-inf"))


class StepClock(L.Callback):
    """``(wall, process CPU)`` seconds at the end of every optimizer step (one per iteration in this bench)."""

    def __init__(self):
        self.ends: list[tuple[float, float]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.ends.append((time.perf_counter(), time.process_time()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > len(self.ends) - 1:  # a step happened (not the call that ends the stream)
            self.ends.append((time.perf_counter(), time.process_time()))


def fixed_length_vllm_engine(**kwargs):
    """Our vLLM engine with EOS forbidden until the budget (vLLM ``min_tokens``), for ``rollout=vllm_cpu``.

    Built by a function so that importing this module does not need vLLM."""
    from spear_lit.rollout.vllm_engine import VLLMEngine, exact_sampling_params

    class FixedLengthVLLMEngine(VLLMEngine):
        def _generate_all(self, requests, temperature, top_p, greedy):
            from vllm.inputs import TokensPrompt

            params = []
            for _, budget, seed in requests:
                p = exact_sampling_params(
                    max_tokens=budget,
                    temperature=temperature,
                    top_p=top_p,
                    greedy=greedy,
                    seed=seed,
                    eos_token_id=self.tokenizer.eos_token_id,
                )
                p.min_tokens = budget  # set before the request is added, where vLLM reads it
                params.append(p)
            outs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=list(p)) for p, _, _ in requests], params, use_tqdm=False
            )
            return [
                [int(t) for t in o.outputs[0].token_ids][:budget] for o, (_, budget, _) in zip(outs, requests)
            ]

    return FixedLengthVLLMEngine(**kwargs)
