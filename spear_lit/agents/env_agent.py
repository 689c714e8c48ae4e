"""The step-wise environment agent (ALFWorld, WebShop; verl-agent style): one training row per step."""

from __future__ import annotations

import json
import logging
import math
import random
import subprocess
import threading
import weakref
from collections.abc import Callable

from spear_lit.batch import Sample
from spear_lit.envs.base import TextEnv
from spear_lit.rollout.env_loop import (
    EnvEpisode,
    HistoryItem,
    StepPrompt,
    call_all,
    episodes_to_samples,
    run_env_episodes,
    step_prompt_ids,
)
from spear_lit.rollout.protocol import shard_range

log = logging.getLogger(__name__)


class EnvAgent:
    """Groups of ``group_size`` environments started from the same task (SPEAR_SPEC §9, §2.2, §6.2, §7).

    Environments are expensive (an ALFWorld engine is a worker process), so the agent keeps a pool of
    them alive across iterations: ``num_groups × group_size`` for training, ``eval_envs`` for validation.
    ``close()`` ends them all; it also runs at interpreter exit and is safe to call twice.

    Args:
        env: environment factory, called as ``env(split=...)`` once per pool slot (Hydra:
            ``_target_: spear_lit.envs.webshop.WebShopEnv`` with ``_partial_: true``).
        prompt: renders each step's prompt (:mod:`spear_lit.agents.env_prompts`).
        name: metric name (``val/<name>/accuracy``).
        max_steps: rows (policy actions, invalid ones included) per episode: 50 ALFWorld, 15 WebShop.
        train_split, val_split: the ``split`` given to ``env`` (ALFWorld: ``train`` / ``valid_seen``).
        eval_envs: validation environments stepped together.
        invalid_penalty: subtracted from the score and step return of an invalid row (SPEAR_SPEC §3.4).
        gamma: discount of GiGPO's step returns.
        step_workers: environments reset/stepped at once.
        step_timeout_s, reset_timeout_s: a longer call fails its episode; the environment is replaced.
        require_think: an action counts only in a response that also has ``<think>…</think>``.
        train_tasks: draw training tasks from the split's first ``train_tasks`` only (``None``: all). A
            tiny policy cannot generalise over a thousand WebShop goals; on a fixed few, RL can be seen
            to learn (``webshop_tiny_*``).
    """

    def __init__(
        self,
        env: Callable[..., TextEnv],
        prompt: StepPrompt,
        *,
        name: str = "env",
        max_steps: int = 15,
        train_split: str = "train",
        val_split: str = "val",
        eval_envs: int = 32,
        invalid_penalty: float = 0.1,
        gamma: float = 0.95,
        step_workers: int = 8,
        step_timeout_s: float | None = 120.0,
        reset_timeout_s: float | None = 300.0,
        require_think: bool = True,
        train_tasks: int | None = None,
    ):
        if max_steps < 1 or eval_envs < 1:
            raise ValueError("max_steps and eval_envs must be >= 1")
        if train_tasks is not None and train_tasks < 1:
            raise ValueError(f"train_tasks must be >= 1 or None, got {train_tasks}")
        self.env_factory, self.prompt, self.name = env, prompt, name
        self.max_steps, self.eval_envs = max_steps, eval_envs
        self.train_split, self.val_split = train_split, val_split
        self.invalid_penalty, self.gamma = invalid_penalty, gamma
        self.train_tasks = train_tasks
        # the shortest reply that can act (a start-up size check of max_response_len)
        self.min_reply = ("<think></think>" if require_think else "") + "<action>1</action>"
        self.loop_kw = dict(
            step_workers=step_workers,
            step_timeout_s=step_timeout_s,
            reset_timeout_s=reset_timeout_s,
            require_think=require_think,
        )
        self._pools: dict[str, list[TextEnv]] = {}
        self._finalizer = weakref.finalize(self, _close_pools, self._pools)  # also at interpreter exit
        self.last_stats: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ pools

    def _envs(self, split: str, n: int) -> list[TextEnv]:
        """The first ``n`` environments of the ``split`` pool (grown on demand, never shrunk)."""
        if not self._finalizer.alive:  # closed, then used again
            self._finalizer = weakref.finalize(self, _close_pools, self._pools)
        pool = self._pools.setdefault(split, [])
        while len(pool) < n:
            pool.append(self.env_factory(split=split))
        return pool[:n]

    def _num_tasks(self, split: str) -> int | None:
        env = self._envs(split, 1)[0]
        n = getattr(env, "num_tasks", None) or getattr(env, "num_games", None)
        return int(n) if n else None

    def _replace_failed(self, split: str, episodes: list[EnvEpisode]) -> None:
        """An environment that raised or hung may be mid-call: drop it (closed in the background), make anew."""
        pool = self._pools[split]
        for k, ep in enumerate(episodes):
            if ep.env_failed:
                old, pool[k] = pool[k], self.env_factory(split=split)
                threading.Thread(target=_close_quietly, args=(old,), daemon=True).start()

    def draw_tasks(self, seed: int, n: int) -> list[int]:
        """``n`` training task ids drawn from ``seed`` (distinct while the split has enough tasks)."""
        total = self._num_tasks(self.train_split)
        if self.train_tasks is not None:
            total = min(total, self.train_tasks) if total else self.train_tasks
        rng = random.Random(seed)
        if total is not None and n <= total:
            return rng.sample(range(total), n)
        return [rng.randrange(total or 2**31) for _ in range(n)]

    def close(self) -> None:
        """Close every environment (and their worker processes). Idempotent."""
        self._finalizer()

    # ------------------------------------------------------------------------------------------ Agent

    def _run(self, engine, tokenizer, split: str, task_ids: list[int], **kw) -> list[EnvEpisode]:
        envs = self._envs(split, len(task_ids))
        episodes = run_env_episodes(
            engine,
            tokenizer,
            envs,
            task_ids,
            prompt=self.prompt,
            max_steps=self.max_steps,
            **self.loop_kw,
            **kw,
        )
        self._replace_failed(split, episodes)
        return episodes

    def collect(
        self,
        engine,
        tokenizer,
        *,
        t: int,
        seed: int,
        num_groups: int,
        group_size: int,
        max_response_len: int,
        temperature: float,
        top_p: float,
        greedy: bool = False,
        sync=None,
        shard: tuple[int, int] = (0, 1),
    ) -> list[Sample]:
        """One row per step of this rank's share of ``num_groups × group_size`` episodes (tasks drawn once
        for all ranks from ``seed``, then sharded); a group's episodes share a task id."""
        lo, hi = shard_range(num_groups, shard)
        tasks = self.draw_tasks(seed, num_groups)[lo:hi]
        task_ids = [task for task in tasks for _ in range(group_size)]
        episodes = self._run(
            engine,
            tokenizer,
            self.train_split,
            task_ids,
            max_response_len=max_response_len,
            temperature=temperature,
            top_p=top_p,
            greedy=greedy,
            sync=sync,
        )
        groups = [lo + k // group_size for k in range(len(task_ids))]
        samples = episodes_to_samples(
            episodes, groups, invalid_penalty=self.invalid_penalty, gamma=self.gamma
        )
        self.last_stats = {
            "episodes": len(episodes),
            "failed": sum(e.error is not None for e in episodes),
            "won": sum(e.won for e in episodes),
            "env_steps": sum(e.num_env_steps for e in episodes),
            "rows": len(samples),
            "invalid": sum(not s.info["valid"] for s in samples),
        }
        return samples

    def evaluate(
        self,
        engine,
        tokenizer,
        *,
        shard: tuple[int, int],
        limit: int | None,
        max_response_len: int,
        temperature: float,
        top_p: float,
        greedy: bool,
        sync=None,
        samples: int = 1,
    ) -> tuple[int, int]:
        """``samples`` episodes of each validation task ``0..N-1`` (``[:limit]``): the ``N·k`` (task, sample)
        pairs are dealt ``[rank::world]`` and run ``eval_envs`` at a time, so summed over ranks
        ``wins / episodes`` is avg@k. Greedy always uses one sample. Every rank runs the same number of
        chunks so ``sync`` stays matched. Failed episodes count as lost."""
        rank, world = shard
        k = 1 if greedy else samples
        if k < 1:
            raise ValueError(f"data.val_group_size={samples}: must be >= 1")
        total = self._num_tasks(self.val_split)
        if total is None and limit is None:
            raise ValueError(f"{self.name}: the validation environment has no task count; give a limit")
        items = [
            task for task in list(range(total if total is not None else limit))[:limit] for _ in range(k)
        ]
        mine = items[rank::world]
        chunks = math.ceil(math.ceil(len(items) / world) / self.eval_envs)
        wins = 0
        for c in range(chunks):
            ids = mine[c * self.eval_envs : (c + 1) * self.eval_envs]
            if not ids and sync is None:
                continue
            episodes = self._run(
                engine,
                tokenizer,
                self.val_split,
                ids,
                max_response_len=max_response_len,
                temperature=temperature,
                top_p=top_p,
                greedy=greedy,
                sync=sync,
            )
            wins += sum(e.won for e in episodes)
        return wins, len(mine)

    # ---------------------------------------------------------------------------------- expert SFT data

    def expert_samples(self, tokenizer, num_episodes: int, seed: int, *, only_won: bool = True) -> list[dict]:
        """Cold-start SFT rows ``{"prompt_ids", "response_ids", "response_mask"}``, one per expert step.

        Training tasks are drawn as :meth:`collect` draws them (same ``seed`` → same tasks); the expert is
        the environment's (WebShop ``oracle_actions()``, ALFWorld's planner). Prompts are rendered exactly
        as in rollouts, and the response is ``prompt.response(action, admissible)`` + EOS, so SFT data and rollouts
        share one format. Episodes the expert does not win are left out (``only_won``).
        """
        env = self._envs(self.train_split, 1)[0]
        task_ids = self.draw_tasks(seed, num_episodes)
        plans = _alfworld_plans(env, task_ids) if hasattr(env, "games") else None
        rows: list[dict] = []
        for k, task_id in enumerate(task_ids):
            result = env.reset(task_id)
            actions = plans[k] if plans is not None else env.oracle_actions()
            task, history, episode, won = self.prompt.task(result), [], [], False
            for step, action in enumerate(actions[: self.max_steps]):
                p_ids = step_prompt_ids(tokenizer, self.prompt, task, history, result, step)
                reply = self.prompt.response(action, result.admissible_actions)
                r_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
                r_ids = r_ids + [tokenizer.eos_token_id]
                episode.append(
                    {"prompt_ids": p_ids, "response_ids": r_ids, "response_mask": [1] * len(r_ids)}
                )
                nxt = env.step(action)
                history.append(HistoryItem(result.observation, action, nxt.valid))
                result, won = (nxt if nxt.valid else result), nxt.won
                if nxt.done:
                    break
            if won or not only_won:
                rows += episode
            else:
                log.warning(
                    "%s: the expert did not win task %d; its %d steps are left out",
                    self.name,
                    task_id,
                    len(episode),
                )
        return rows


def _close_quietly(env) -> None:
    try:
        env.close()
    except Exception as e:  # noqa: BLE001 - closing must not stop closing the others
        log.warning("closing an environment failed: %r", e)


def _close_pools(pools: dict[str, list]) -> None:
    envs = [env for pool in pools.values() for env in pool]
    pools.clear()
    try:  # in parallel: an ALFWorld worker may take a moment to exit
        call_all([lambda env=env: _close_quietly(env) for env in envs], timeout_s=30.0, workers=16)
    except RuntimeError:  # no new threads at interpreter shutdown (Python >= 3.12): one by one
        for env in envs:
            _close_quietly(env)


_PLAN_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from engine import planner_plan
print(json.dumps([planner_plan(g) for g in json.loads(sys.stdin.read())]))
"""


def _alfworld_plans(env, task_ids: list[int]) -> list[list[str]]:
    """The planner's actions for each task's game, computed in the environment's worker interpreter (which
    has the ``alfworld`` extra even where this process does not)."""
    from spear_lit.envs.alfworld.env import WORKER

    games = [env.games[t % len(env.games)] for t in task_ids]
    out = subprocess.run(
        [env.python, "-c", _PLAN_SCRIPT, str(WORKER.parent)],
        input=json.dumps(games),
        capture_output=True,
        text=True,
        timeout=60 + 10 * len(games),
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
