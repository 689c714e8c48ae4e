"""Expert traces for cold-start SFT, tokenized exactly as rollouts are: multi-turn math episodes, or an
environment agent's expert steps (one row per step)."""

from __future__ import annotations

import random

import lightning as L
import torch
from torch.utils.data import DataLoader

from spear_lit.batch import TokenBatch
from spear_lit.rollout.chat import observation_ids, prompt_ids


def encode_episode(tokenizer, prompt: str, turns: list[dict], system: str | None = None) -> dict:
    """Token ids of a demonstration, built from the same pieces as a rollout (token-in/token-out):
    prompt ids, then each assistant turn's ids + EOS (loss mask 1), each run of tool messages as the
    observation ids the agent loop would append (mask 0)."""
    resp, mask = [], []
    i = 0
    while i < len(turns):
        if turns[i]["role"] == "assistant":
            ids = tokenizer(turns[i]["content"], add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id
            ]
            resp += ids
            mask += [1] * len(ids)
            i += 1
        else:
            outs = []
            while i < len(turns) and turns[i]["role"] == "tool":
                outs.append(turns[i]["content"])
                i += 1
            ids = observation_ids(tokenizer, outs)
            resp += ids
            mask += [0] * len(ids)
    return {"prompt_ids": prompt_ids(tokenizer, prompt, system), "response_ids": resp, "response_mask": mask}


class ExpertTraceDataModule(L.LightningDataModule):
    """Expert demonstrations for supervised warm-up, from a task or from an agent's environment.

    * ``task`` (math): ``num_examples`` problems, each demonstrated by the task's ``expert_episode``
      (one multi-turn row per problem);
    * ``agent`` (ALFWorld, WebShop): ``agent.expert_samples(tokenizer, num_examples, seed)``, the expert's
      episodes on ``num_examples`` training tasks, one row per step, prompts rendered exactly as in rollouts
      (:meth:`spear_lit.agents.EnvAgent.expert_samples`). The agent's environments are closed once the rows
      are built.

    Args:
        task: a task with ``train_problems``, ``expert_episode`` and ``system_prompt``; ``None`` with ``agent``.
        agent: an agent with ``expert_samples``; ``None`` with ``task``.
        num_examples: demonstrations (problems or episodes) generated once at setup.
        batch_size: rows per optimizer step.
        seed: seeds problem/task draws and expert choices.
    """

    def __init__(
        self, task=None, *, agent=None, num_examples: int = 20000, batch_size: int = 32, seed: int = 0
    ):
        super().__init__()
        if (task is None) == (agent is None):
            raise ValueError(
                "data: give exactly one of `task` (math expert traces) and `agent` (environment "
                "expert episodes); set the other to null"
            )
        self.task, self.agent = task, agent
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.rows: list[dict] | None = None
        self.tokenizer = None

    def connect(self, learner) -> None:
        self.tokenizer = learner.policy_source.tokenizer()

    def setup(self, stage: str) -> None:
        if self.rows is not None:
            return
        self.rows = self._agent_rows() if self.agent is not None else self._task_rows()
        if not self.rows:
            raise ValueError("the expert produced no demonstration rows")

    def _task_rows(self) -> list[dict]:
        rng = random.Random(self.seed)
        system = getattr(self.task, "system_prompt", None)
        problems = self.task.train_problems(self.num_examples, rng)
        return [
            encode_episode(self.tokenizer, p.prompt, self.task.expert_episode(p, rng), system)
            for p in problems
        ]

    def _agent_rows(self) -> list[dict]:
        try:
            return self.agent.expert_samples(self.tokenizer, self.num_examples, self.seed)
        finally:
            close = getattr(self.agent, "close", None)
            if close:  # ALFWorld engines are worker processes: not kept through training
                close()

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        pad = self.tokenizer.pad_token_id
        return DataLoader(
            self.rows,
            batch_size=self.batch_size,
            shuffle=True,
            generator=g,
            drop_last=True,
            collate_fn=lambda rows: TokenBatch.from_rows(rows, pad),
        )
