"""The step-wise environment loop (verl-agent style, SPEAR_SPEC §9, §2.2, §3.4): one training row per step.

Each step's prompt is rebuilt from scratch (task, a window of recent history, the current observation and
the admissible actions), so prompts do not grow with the episode. All active environments of a call
generate together (one batched ``generate`` per step) and step together (a pool of threads: ALFWorld's
engines are worker processes, so their steps overlap). An action that cannot be parsed or is not
admissible is never sent: the state stays as it was and the row is marked invalid (penalised later).
An environment that raises, or outlives its time-out, ends its own episode as failed (``error`` set);
the other episodes go on and nothing is raised out of the loop.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from spear_lit.algos import discounted_returns
from spear_lit.batch import Sample
from spear_lit.envs.base import StepResult, TextEnv
from spear_lit.rollout.chat import prompt_ids as chat_prompt_ids
from spear_lit.rollout.hf_engine import RolloutEngine

log = logging.getLogger(__name__)

_ACTION = re.compile(r"<action>(.*?)</action>", re.DOTALL | re.IGNORECASE)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
PLACEHOLDER = re.compile(r"<[^<>\s]+>")  # ``search[<query>]``: any non-blank text fills ``<query>``


class HistoryItem(NamedTuple):
    """One past step as the prompt shows it: the observation the action was taken in, the action text
    (``""`` if none could be parsed) and whether it was executed."""

    observation: str
    action: str
    valid: bool


class StepPrompt(Protocol):
    """Renders one step's user message (see :mod:`spear_lit.agents.env_prompts`)."""

    system: str | None
    history_len: int  # k: how many past steps the prompt shows

    def task(self, first: StepResult) -> str:
        """The task description, read once from the reset result."""

    def __call__(
        self,
        task: str,
        history: Sequence[HistoryItem],
        observation: str,
        admissible_actions: Sequence[str],
        *,
        step: int,
    ) -> str:
        """The user message for step ``step`` (0-based); ``history`` is the last ``history_len`` steps."""

    def command(self, action: str, admissible: Sequence[str]) -> str | None:
        """The command to send for a parsed ``action`` (:func:`match_admissible`), ``None`` if not admissible."""

    def response(self, action: str, admissible: Sequence[str] = (), think: str = "") -> str:
        """The response text that takes ``action`` among ``admissible`` (expert demonstrations)."""


@dataclass
class StepRecord:
    """One environment step as generated and executed.

    Attributes:
        prompt_ids, response_ids: the row's tokens (the whole response is policy-generated).
        sampler_logp: the engine's sampling log-prob of each response token (``None``: not reported).
        text: decoded response. action: the parsed ``<action>`` text, ``None`` if unparseable/empty.
        anchor: the observation the action was taken in (GiGPO's anchor state).
        reward: environment reward of the step (0 when not executed). valid: executed and accepted.
        done: the episode ended at this step. info: the environment's info (``error`` on a failure).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    action: str | None
    anchor: str
    reward: float = 0.0
    valid: bool = False
    done: bool = False
    info: dict = field(default_factory=dict)
    sampler_logp: list[float] | None = None


@dataclass
class EnvEpisode:
    """One environment's episode: its steps, whether it was won, and the failure that ended it, if any."""

    task_id: int
    steps: list[StepRecord] = field(default_factory=list)
    won: bool = False
    error: str | None = None
    env_failed: bool = False  # the loop itself saw the env raise or time out (the env may be unusable)
    num_env_steps: int = 0  # actions actually sent to the environment

    @property
    def total_reward(self) -> float:
        """Sum of the environment rewards of the episode (no penalties)."""
        return sum(s.reward for s in self.steps)


def parse_env_action(text: str, *, require_think: bool = True) -> str | None:
    """The stripped text of the *last* ``<action>…</action>`` block; ``None`` if there is none, it is empty,
    or (``require_think``, as verl-agent's projection) the response has no ``<think>…</think>`` block."""
    found = _ACTION.findall(text or "")
    if not found or (require_think and not _THINK.search(text)):
        return None
    return found[-1].strip() or None


def match_admissible(action: str, admissible: Sequence[str]) -> str | None:
    """The command to send for ``action``, or ``None`` if it is not admissible.

    An empty list admits anything. An entry matches ignoring case and is sent in its own spelling; an
    entry with a ``<placeholder>`` (WebShop's ``search[<query>]``) matches any non-blank filler and the
    action is sent as written.
    """
    if not admissible:
        return action
    low = action.lower()
    for entry in admissible:
        if entry.lower() == low:
            return entry
    for entry in admissible:
        if PLACEHOLDER.search(entry):
            pattern = r"\S.*?".join(re.escape(part) for part in PLACEHOLDER.split(entry))
            if re.fullmatch(pattern, action, re.DOTALL | re.IGNORECASE):
                return action
    return None


def step_prompt_ids(
    tokenizer, prompt: StepPrompt, task: str, history: Sequence[HistoryItem], current: StepResult, step: int
) -> list[int]:
    """Token ids of one step's prompt, chat template applied (shared by rollouts and expert SFT data)."""
    window = list(history[-prompt.history_len :]) if prompt.history_len > 0 else []
    text = prompt(task, window, current.observation, current.admissible_actions, step=step)
    return chat_prompt_ids(tokenizer, text, prompt.system)


# ------------------------------------------------------------------------------------------ the loop


def run_env_episodes(
    engine: RolloutEngine,
    tokenizer,
    envs: Sequence[TextEnv],
    task_ids: Sequence[int],
    *,
    prompt: StepPrompt,
    max_steps: int,
    max_response_len: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    sync: Callable[[bool], bool] | None = None,
    step_workers: int = 8,
    step_timeout_s: float | None = None,
    reset_timeout_s: float | None = None,
    require_think: bool = True,
) -> list[EnvEpisode]:
    """Play one episode per environment, ``envs[i]`` on task ``task_ids[i]``.

    Resets run in parallel; then, per step, every live episode's prompt is rendered, all are continued
    by one ``engine.generate`` call, each response is parsed (:func:`parse_env_action`) and checked against
    the admissible actions (``prompt.command``), and the valid actions are stepped in parallel.
    An episode ends when its environment says ``done``, when it fails, or after ``max_steps`` rows.

    Args:
        prompt: renders the user message of a step (:class:`StepPrompt`).
        max_response_len: token budget of each step's response.
        sync: under sharded training, ``sync(local_has_work) -> any rank has work``; a rank without live
            episodes keeps calling ``generate`` (one dummy token) until all ranks are done.
        step_workers: environments stepped (and reset) at once.
        step_timeout_s, reset_timeout_s: a call that runs longer fails its episode (``None``: no limit).
            The stuck call is abandoned on a daemon thread: the environment should not be reused.
    """
    if len(envs) != len(task_ids):
        raise ValueError(f"{len(envs)} environments for {len(task_ids)} task ids")
    episodes = [EnvEpisode(task_id=int(t)) for t in task_ids]
    current: dict[int, StepResult] = {}
    tasks: dict[int, str] = {}
    history: dict[int, list[HistoryItem]] = {}
    resets = call_all(
        [functools.partial(env.reset, int(t)) for env, t in zip(envs, task_ids)],
        timeout_s=reset_timeout_s,
        workers=step_workers,
    )
    for i, (status, res) in enumerate(resets):
        if status != "ok" or res.info.get("error") or res.done:
            _fail(
                episodes[i],
                res if status != "ok" else res.info.get("error", "episode done at reset"),
                loop_saw_it=status != "ok",
            )
            continue
        current[i], tasks[i], history[i] = res, prompt.task(res), []
    for step in range(max_steps):
        live = sorted(current)
        if sync is not None and not sync(bool(live)):
            break
        if not live and sync is None:
            break
        prompts = [step_prompt_ids(tokenizer, prompt, tasks[i], history[i], current[i], step) for i in live]
        outs = engine.generate(
            prompts or [[tokenizer.eos_token_id]],
            max_new_tokens=[max_response_len] * len(prompts) if prompts else [1],
            temperature=temperature,
            top_p=top_p,
            greedy=greedy,
        )
        if not live:
            continue
        pending = []
        for i, p_ids, r_ids in zip(live, prompts, outs):
            text = tokenizer.decode(r_ids, skip_special_tokens=True)
            action = parse_env_action(text, require_think=require_think)
            command = prompt.command(action, current[i].admissible_actions) if action is not None else None
            rec = StepRecord(list(p_ids), list(r_ids), text, action, anchor=current[i].observation)
            rec.sampler_logp = getattr(r_ids, "logprobs", None)
            episodes[i].steps.append(rec)
            if command is None:  # never sent: the state is unchanged
                history[i].append(HistoryItem(current[i].observation, action or "", False))
            else:
                pending.append((i, command, rec))
        results = call_all(
            [functools.partial(envs[i].step, c) for i, c, _ in pending],
            timeout_s=step_timeout_s,
            workers=step_workers,
        )
        for (i, command, rec), (status, res) in zip(pending, results):
            _apply(i, episodes[i], rec, command, status, res, current, history)
    return episodes


def _apply(
    i: int, ep: EnvEpisode, rec: StepRecord, command: str, status: str, res, current: dict, history: dict
) -> None:
    """Record one executed step of episode ``i``; the episode ends on ``done`` or on a failure."""
    ep.num_env_steps += 1
    if status != "ok" or res.info.get("error"):
        rec.valid, rec.done = True, True  # an admissible action: the failure is the environment's
        rec.info = {"error": res} if status != "ok" else dict(res.info)
        _fail(ep, rec.info["error"], loop_saw_it=status != "ok")
        del current[i]
        return
    rec.reward, rec.valid, rec.done, rec.info = (
        float(res.reward),
        bool(res.valid),
        bool(res.done),
        dict(res.info),
    )
    history[i].append(HistoryItem(current[i].observation, command, rec.valid))
    if res.done:
        ep.won = bool(res.won)
        del current[i]
    elif rec.valid:  # an action the environment refused leaves the state (and its actions) as they were
        current[i] = res


def _fail(ep: EnvEpisode, error, *, loop_saw_it: bool) -> None:
    ep.error, ep.won, ep.env_failed = str(error), False, loop_saw_it
    log.warning("environment episode (task %d) failed after %d steps: %s", ep.task_id, len(ep.steps), error)


# ------------------------------------------------------------------------------------- rows (Samples)


def episodes_to_samples(
    episodes: Sequence[EnvEpisode],
    groups: Sequence[int],
    *,
    invalid_penalty: float = 0.1,
    gamma: float = 0.95,
    first_episode: int = 0,
) -> list[Sample]:
    """One :class:`Sample` per step (SPEAR_SPEC §2.2, §3.4, §6.2, §7).

    * ``score`` = the episode's total environment reward, minus ``invalid_penalty`` on an invalid row;
    * ``step_return`` = ``G_t = Σ_{s≥t} γ^(s-t) r_s`` over environment rewards, minus ``invalid_penalty``
      if this row is invalid;
    * ``num_tool_calls`` = actions sent to the environment in the episode; ``turns`` = its rows;
    * ``incomplete`` = this row has no parseable action; ``anchor`` = the observation it acted in.

    Args:
        groups: the group index of each episode (same initial state → same group).
        first_episode: index of ``episodes[0]`` in :attr:`Sample.episode`.
    """
    out: list[Sample] = []
    for k, (ep, group) in enumerate(zip(episodes, groups, strict=True)):
        if not ep.steps:
            continue
        rewards = torch.tensor([s.reward for s in ep.steps], dtype=torch.float64)
        returns = discounted_returns(rewards, gamma).tolist()
        total = float(rewards.sum())
        for t, (s, g) in enumerate(zip(ep.steps, returns)):
            penalty = 0.0 if s.valid else invalid_penalty
            info = {
                "task_id": ep.task_id,
                "step": t,
                "action": s.action,
                "valid": s.valid,
                "reward": s.reward,
            }
            if ep.error is not None:
                info["error"] = ep.error
            out.append(
                Sample(
                    prompt_ids=s.prompt_ids,
                    response_ids=s.response_ids,
                    response_mask=[1] * len(s.response_ids),
                    group=int(group),
                    episode=first_episode + k,
                    score=total - penalty,
                    success=ep.won,
                    num_tool_calls=ep.num_env_steps,
                    incomplete=s.action is None,
                    text=s.text,
                    step_return=g - penalty,
                    anchor=s.anchor,
                    turns=len(ep.steps),
                    episode_score=total,
                    info=info,
                    sampler_logp=s.sampler_logp,
                )
            )
    return out


# ------------------------------------------------------------------------ calls with time-outs, in parallel


def call_all(
    fns: Sequence[Callable[[], object]], *, timeout_s: float | None, workers: int
) -> list[tuple[str, object]]:
    """Run ``fns`` on at most ``workers`` daemon threads; ``("ok", value)`` or ``("error", message)`` each.

    A call that raises gives its error; one still running ``timeout_s`` after it *started* is abandoned
    (its daemon thread keeps it, and cannot block interpreter exit) and gives a time-out error.
    """
    n = len(fns)
    out: list[tuple[str, object] | None] = [None] * n
    started: list[float | None] = [None] * n
    cond = threading.Condition()
    slots = threading.Semaphore(max(1, workers))

    def work(k: int) -> None:
        slots.acquire()
        with cond:
            started[k] = time.monotonic()
            cond.notify_all()
        try:
            result = ("ok", fns[k]())
        except Exception as e:  # noqa: BLE001 - any environment failure ends only its own episode
            result = ("error", f"{type(e).__name__}: {e}")
        with cond:
            if out[k] is None:
                out[k] = result
                slots.release()
            cond.notify_all()

    for k in range(n):
        threading.Thread(target=work, args=(k,), daemon=True, name=f"env-call-{k}").start()
    with cond:
        while True:
            now = time.monotonic()
            running = [k for k in range(n) if out[k] is None and started[k] is not None]
            if timeout_s is not None:
                for k in running:
                    if now - started[k] >= timeout_s:
                        out[k] = ("error", f"time-out: no answer within {timeout_s:g} s")
                        slots.release()  # the abandoned call keeps its thread, not its slot
            if all(o is not None for o in out):
                return out
            waits = (
                [started[k] + timeout_s - now for k in running if out[k] is None]
                if timeout_s is not None
                else []
            )
            cond.wait(timeout=max(min(waits), 0.0) + 1e-3 if waits else None)  # woken by starts and ends
