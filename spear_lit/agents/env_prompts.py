"""Step prompts for the environment agents, after verl-agent's ALFWorld and WebShop templates (paraphrased).

A step's user message holds the task, the last ``history_len`` steps (observation and action), the current
observation and the admissible actions, and asks for ``<think>…</think><action>…</action>``. ``compact=True``
is a short form for tiny byte-level policies (one token per character): actions only in the history, a
truncated observation, terse labels. ``numbered=True`` lists the actions with numbers and accepts a number as
the reply (also a tiny-policy aid: choosing ``7`` replaces copying ``click[b7x2k9qz]`` character by
character). Choose one per environment with ``_target_``.
"""

from __future__ import annotations

from collections.abc import Sequence

from spear_lit.envs.base import StepResult
from spear_lit.rollout.env_loop import PLACEHOLDER, HistoryItem, match_admissible

SEP = " [SEP] "
ALFWORLD_TASK = "Your task is to: "


class StepPromptBase:
    """What the ALFWorld and WebShop prompts share; subclasses set the wording and read the task.

    Args:
        history_len: past steps shown (k; verl-agent uses 2 for both environments).
        compact: the short form for tiny policies.
        max_obs_chars: observations longer than this are cut (``None``: never; compact default 300).
        numbered: list the admissible actions as ``1: …``, ``2: …`` and accept a reply that is just such a
            number (the action sent and shown in the history is the listed text). Written-out actions
            are accepted too; a placeholder action (``search[<query>]``) must be written out.
        system: optional system message.
    """

    agent_intro = "You are an expert agent."
    goal_hint = "which admissible action best advances the task"

    def __init__(
        self,
        *,
        history_len: int = 2,
        compact: bool = False,
        max_obs_chars: int | None = None,
        numbered: bool = False,
        system: str | None = None,
    ):
        if history_len < 0:
            raise ValueError(f"history_len={history_len}: must be >= 0")
        self.history_len, self.compact, self.numbered, self.system = history_len, compact, numbered, system
        self.max_obs_chars = max_obs_chars if max_obs_chars is not None or not compact else 300

    # -- environment-specific hooks
    def task(self, first: StepResult) -> str:
        """The task text, read from the reset result."""
        return str(first.info.get("task", ""))

    def observation(self, text: str, task: str) -> str:
        """The observation as the prompt shows it (task text removed where the environment repeats it)."""
        return text.strip()

    def actions(self, admissible: Sequence[str]) -> list[str]:
        """The admissible actions as listed in the prompt."""
        return list(admissible)

    # -- rendering
    def _obs(self, text: str, task: str) -> str:
        obs = self.observation(text, task)
        if self.max_obs_chars is not None and len(obs) > self.max_obs_chars:
            obs = obs[: self.max_obs_chars] + "..."
        return obs

    def __call__(
        self,
        task: str,
        history: Sequence[HistoryItem],
        observation: str,
        admissible_actions: Sequence[str],
        *,
        step: int,
    ) -> str:
        """The user message of step ``step`` (0-based), ``history`` being the last ``history_len`` steps."""
        acts = self.actions(admissible_actions)
        if self.numbered:
            acts = [f"{k}: {a}" for k, a in enumerate(acts, 1)]
        obs = self._obs(observation, task)
        if self.compact:
            past = " > ".join(h.action + ("" if h.valid else " (invalid)") for h in history)
            return (
                f"Task: {task}\n" + (f"Past: {past}\n" if history else "") + f"Obs: {obs}\n"
                f"Actions: {' | '.join(acts)}\nReply <think>...</think><action>...</action>"
            )
        lines = [f"{self.agent_intro} Your task is to: {task}"]
        if history:
            first = step - len(history) + 1
            past = "\n".join(
                f"[Observation {first + j}: '{self._obs(h.observation, task)}', Action {first + j}: "
                f"'{h.action}'{'' if h.valid else ' (invalid: nothing happened)'}]"
                for j, h in enumerate(history)
            )
            lines.append(
                f"So far you have taken {step} step(s). The latest {len(history)} observation(s) "
                f"and the action you took after each:\n{past}"
            )
        lines.append(f"This is step {step + 1}. Current observation: {obs}")
        lines.append("Admissible actions now: [\n" + "\n".join(f"'{a}'," for a in acts) + "\n]")
        lines.append(
            f"Your turn. First think step by step about the situation and {self.goal_hint}; put this "
            "reasoning inside <think> </think>. Then give exactly one admissible action"
            + (" (or its number)" if self.numbered else "")
            + " inside <action> </action>."
        )
        return "\n".join(lines)

    def command(self, action: str, admissible: Sequence[str]) -> str | None:
        """The command to send for the parsed ``action``; ``None`` if it is not admissible."""
        number = action.strip()
        # ASCII digits only: str.isdigit() also accepts e.g. "²", which int() refuses; and a short number,
        # since int() refuses strings of more than 4300 digits.
        if self.numbered and admissible and number.isascii() and number.isdigit() and len(number) <= 9:
            listed = self.actions(admissible)
            k = int(number)
            ok = 1 <= k <= len(listed) and not PLACEHOLDER.search(listed[k - 1])
            return listed[k - 1] if ok else None
        return match_admissible(action, admissible)

    def response(self, action: str, admissible: Sequence[str] = (), think: str = "") -> str:
        """The response that takes ``action`` among ``admissible`` (expert demonstrations for cold-start SFT):
        numbered, a listed action is given by its number."""
        if self.numbered:
            listed = [a.lower() for a in self.actions(admissible)]
            if action.lower() in listed:
                action = str(listed.index(action.lower()) + 1)
        return f"<think>{think}</think><action>{action}</action>"


class WebShopPrompt(StepPromptBase):
    """WebShop: the instruction is read from the page text, which repeats it on every page."""

    agent_intro = "You are an expert shopping agent in the WebShop online store."
    goal_hint = "which admissible action brings you closest to buying what the instruction asks for"

    def task(self, first: StepResult) -> str:
        parts = first.observation.split(SEP)
        if "Instruction:" in parts and parts.index("Instruction:") + 1 < len(parts):
            return parts[parts.index("Instruction:") + 1].strip()
        return str(first.info.get("task", ""))

    def observation(self, text: str, task: str) -> str:
        parts = text.split(SEP)
        if task in parts:
            parts = parts[parts.index(task) + 1 :]
        return (" | " if self.compact else SEP).join(p.strip() for p in parts)


class AlfWorldPrompt(StepPromptBase):
    """ALFWorld: the task sentence is the end of the first observation; ``help`` is not offered."""

    agent_intro = "You are an expert agent in the ALFRED household environment (ALFWorld)."
    goal_hint = "which admissible action moves you toward completing the task"

    def task(self, first: StepResult) -> str:
        if first.info.get("task"):
            return str(first.info["task"])
        text = first.observation
        return text.split(ALFWORLD_TASK, 1)[1].strip() if ALFWORLD_TASK in text else ""

    def observation(self, text: str, task: str) -> str:
        text = text.replace("-= Welcome to TextWorld, ALFRED! =-", "")
        if self.compact and ALFWORLD_TASK in text:
            text = text.split(ALFWORLD_TASK, 1)[0]
        return " ".join(text.split())

    def actions(self, admissible: Sequence[str]) -> list[str]:
        return [a for a in admissible if a != "help"]
