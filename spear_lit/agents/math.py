"""The episode-level tool agent: one training row per multi-turn ReTool episode (math with Python)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from spear_lit.batch import Episode, Sample
from spear_lit.rollout.chat import prompt_ids
from spear_lit.rollout.protocol import shard_range
from spear_lit.rollout.tool_loop import run_tool_episodes
from spear_lit.tasks.toolcall import has_final_answer


class ToolAgent:
    """Math problems solved with a sandboxed code interpreter (SPEAR_SPEC §9, ReTool style).

    Args:
        task: prompts, held-out problems and the scorer (:class:`spear_lit.tasks.base.Task`).
        tool: ``codes -> observations`` (the sandboxed :class:`spear_lit.tools.CodeInterpreter`).
        max_turns: assistant turns per episode (8 in the paper).
        max_prompt_len: prompts of more tokens (chat template included) are never sent: dropped from
            training (their groups are not rolled out) and failed in validation, counted in
            ``rollout/prompts_dropped``. ``None``: no cap but the engine's context length (a prompt that
            reaches it is dropped all the same). 2048 in the paper's recipes.
    """

    def __init__(
        self,
        task,
        tool: Callable[[list[str]], list[str]],
        *,
        max_turns: int = 8,
        max_prompt_len: int | None = None,
    ):
        if max_turns < 1:
            raise ValueError(f"data.agent.max_turns={max_turns}: must be >= 1")
        if max_prompt_len is not None and max_prompt_len < 1:
            raise ValueError(f"data.agent.max_prompt_len={max_prompt_len}: must be >= 1 (or null)")
        self.task, self.tool, self.max_turns, self.max_prompt_len = task, tool, max_turns, max_prompt_len
        self._dropped = self._truncated = 0
        self.name = getattr(task, "name", "math")
        self.min_reply = r"\boxed{0}"  # the shortest reply that can earn a reward (a start-up size check)
        self._tool_s = 0.0

    def _call_tool(self, codes: list[str]) -> list[str]:
        start = time.perf_counter()
        try:
            return self.tool(codes)
        finally:
            self._tool_s += time.perf_counter() - start

    def pop_stats(self) -> dict[str, float]:
        """Since the last call: seconds inside the tool, and the tool's calls and infrastructure errors
        (a tool without ``pop_stats`` reports none)."""
        stats = {"tool_s": self._tool_s, **(self.tool.pop_stats() if hasattr(self.tool, "pop_stats") else {})}
        stats.update(prompts_dropped=self._dropped, context_truncated=self._truncated)
        self._tool_s, self._dropped, self._truncated = 0.0, 0, 0
        return stats

    def _fits(self, ids: list[int], engine) -> bool:
        context = getattr(engine, "context_len", None)
        return (self.max_prompt_len is None or len(ids) <= self.max_prompt_len) and (
            context is None or len(ids) < context
        )

    def _episodes(self, engine, tokenizer, problems, **kw):
        system = getattr(self.task, "system_prompt", None)
        # each distinct prompt rendered once (a group's episodes share one; run_tool_episodes copies the lists)
        rendered = {q: prompt_ids(tokenizer, q, system) for q in dict.fromkeys(p.prompt for p in problems)}
        fits = [self._fits(rendered[p.prompt], engine) for p in problems]
        self._dropped += sum(not f for f in fits)
        sent = iter(
            run_tool_episodes(
                engine,
                tokenizer,
                [rendered[p.prompt] for p, f in zip(problems, fits) if f],
                self._call_tool,
                max_turns=self.max_turns,
                **kw,
            )
        )  # a prompt that does not fit is never sent: an empty, unfinished episode (reward -1 in validation)
        episodes = [
            next(sent) if f else Episode(rendered[p.prompt], active=False) for p, f in zip(problems, fits)
        ]
        self._truncated += sum(e.truncated for e in episodes)
        texts = [tokenizer.decode(e.response_ids, skip_special_tokens=True) for e in episodes]
        scores = [self.task.score(x, p)[0] for x, p in zip(texts, problems)]
        return episodes, texts, scores

    def collect(
        self,
        engine,
        tokenizer,
        *,
        t,
        seed,
        num_groups,
        group_size,
        max_response_len,
        temperature,
        top_p,
        greedy=False,
        sync=None,
        shard=(0, 1),
    ) -> list[Sample]:
        lo, hi = shard_range(num_groups, shard)
        problems = self.task.train_problems(num_groups, random.Random(seed))[lo:hi]
        system = getattr(self.task, "system_prompt", None)
        keep = [self._fits(prompt_ids(tokenizer, p.prompt, system), engine) for p in problems]
        self._dropped += sum(not k for k in keep) * group_size  # episodes never rolled out
        groups = [lo + i for i, k in enumerate(keep) if k]  # their group indices stay those of the draw
        problems = [p for p, k in zip(problems, keep) if k]
        repeated = [p for p in problems for _ in range(group_size)]
        episodes, texts, scores = self._episodes(
            engine,
            tokenizer,
            repeated,
            max_response_len=max_response_len,
            temperature=temperature,
            top_p=top_p,
            greedy=greedy,
            sync=sync,
        )
        return [
            Sample(
                prompt_ids=e.prompt_ids,
                response_ids=e.response_ids,
                response_mask=e.response_mask,
                group=groups[i // group_size],
                episode=i,
                score=s,
                success=s > 0,
                num_tool_calls=e.num_tool_calls,
                incomplete=not e.finished or not e.response_ids or not has_final_answer(e.last_turn_text),
                text=x,
                turns=e.num_turns,
                sampler_logp=e.sampler_logp,
            )
            for i, (e, x, s) in enumerate(zip(episodes, texts, scores))
        ]

    def evaluate(
        self,
        engine,
        tokenizer,
        *,
        shard,
        limit,
        max_response_len,
        temperature,
        top_p,
        greedy,
        sync=None,
        samples: int = 1,
        by_source: dict | None = None,
    ) -> tuple[int, int]:
        """This rank's share of ``samples`` episodes of each validation problem ``[:limit]``.

        The ``P·k`` (problem, sample) pairs are dealt round-robin over ranks, so summed over ranks
        ``successes / episodes`` is avg@k (every problem counted exactly ``k`` times), and 128 ranks stay busy
        even on AIME's 30 problems. Greedy decoding is deterministic: it always uses one sample.
        ``by_source`` (optional) is filled with ``{source file: [successes, episodes]}`` for every source of
        the validation set (zeros where this rank had none, so every rank holds the same keys).
        """
        rank, world = shard
        k = 1 if greedy else samples
        if k < 1:
            raise ValueError(f"data.val_group_size={samples}: must be >= 1")
        problems = self.task.val_problems()[:limit]
        mine = [p for p in problems for _ in range(k)][rank::world]
        _, _, scores = self._episodes(
            engine,
            tokenizer,
            mine,
            max_response_len=max_response_len,
            temperature=temperature,
            top_p=top_p,
            greedy=greedy,
            sync=sync,
        )
        if by_source is not None:
            for p in problems:
                by_source.setdefault(_source(p), [0, 0])
            for p, s in zip(mine, scores):
                by_source[_source(p)][0] += int(s > 0)
                by_source[_source(p)][1] += 1
        return sum(s > 0 for s in scores), len(mine)

    def close(self) -> None:
        close = getattr(self.tool, "close", None)
        if close:
            close()


def _source(problem) -> str:
    """The validation subset a problem belongs to (its file, for file tasks; else the whole set)."""
    return str(problem.meta.get("source", "all")) if isinstance(problem.meta, dict) else "all"
