"""A built-in task where exploration decides: two *dependent* tool calls, rarely demonstrated.

A problem names an intermediate value and asks for something computed from it::

    Let x=482*37. Compute x*59.

The winning episode makes two calls, the second built from the first one's output (the policy has to
copy ``17834`` from the tool message into new code, which a 1M-parameter byte-level model can learn)::

    assistant: <tool_call>{... "print(482*37)" ...}</tool_call>
    tool:      17834
    assistant: <tool_call>{... "print(17834*59)" ...}</tool_call>
    tool:      1052206
    assistant: The answer is \\boxed{1052206}.

The expert traces for cold-start SFT have a deliberate gap: with probability ``1 - p_second_call`` the
expert stops one step early and boxes the intermediate value (a premature answer, the classic agent
failure). The SFT policy imitates that mixture, so it reaches the answer only in the rare episodes where it
samples the second call *and* copies both numbers right (about 5-15 % at T = 1, ~0 % greedy). More SFT on the
same traces keeps reproducing the gap; RL has to find the rare wins and repeat them, which is what SPEAR's
self-imitation replay is meant for. (Writing ``print(482*37*59)`` in one call would also win; the experts
never show it.)
"""

from __future__ import annotations

import hashlib
import random

from spear_lit.tasks.base import Problem
from spear_lit.tasks.math_tool import DrawnProblems, evaluate, in_val_half
from spear_lit.tasks.scoring import Scorer, strict_box
from spear_lit.tasks.toolcall import format_tool_call

OPS = ("+", "-", "*")


class TwoStepToolTask(DrawnProblems):
    """``Let x=a*b. Compute x∘c.``: answerable by a tiny policy only with two dependent tool calls.

    The full expression ``a*b∘c`` decides the train/validation half (:func:`~spear_lit.tasks.math_tool.
    in_val_half`), so the halves never share a problem; the validation set is the first ``val_size``
    distinct val-half problems drawn with ``random.Random(val_seed)``.

    Args:
        name: metric name (``val/<name>/accuracy``).
        digits: inclusive ``(min, max)`` digit count of ``a``, ``b`` and ``c``.
        ops: the operators ``∘`` of the second step, a subset of ``("+", "-", "*")``.
        val_size: number of validation problems.
        val_seed: seed of the validation set.
        p_second_call: probability that an expert trace makes the second call (else it boxes ``x``).
        scorer: ``(response, ground_truth) -> (reward, prediction)``: :func:`~spear_lit.tasks.scoring.strict_box`
            (SPEAR_SPEC §6.1) or :func:`~spear_lit.tasks.scoring.math_verify_score`.
        system_prompt: ``None`` (the tiny policy pays per character), a preset name or literal text.
    """

    def __init__(
        self,
        *,
        name: str = "twostep",
        digits: tuple[int, int] = (2, 3),
        ops: tuple[str, ...] = OPS,
        val_size: int = 256,
        val_seed: int = 1234,
        p_second_call: float = 0.15,
        scorer: Scorer = strict_box,
        system_prompt: str | None = None,
    ):
        ops = tuple(ops)
        if not ops or not set(ops) <= set(OPS):
            raise ValueError(f"ops must be a non-empty subset of {OPS}, got {ops}")
        self._setup(name, digits, val_size, val_seed, scorer, system_prompt)
        if not 0.0 <= p_second_call <= 1.0:
            raise ValueError(f"p_second_call must be in [0, 1], got {p_second_call}")
        self.ops, self.p_second_call = ops, p_second_call

    # -- generation -------------------------------------------------------------------------------
    def make_problem(self, first: str, op: str, c: str) -> Problem:
        """``Let x=<first>. Compute x<op><c>.`` (``meta``: ``first``, ``second`` = ``"<op><c>"``, ``expr``).

        ``first`` is a product, so substituting it for ``x`` keeps Python's precedence: ``expr`` is the
        full expression and the answer is its value.
        """
        expr = f"{first}{op}{c}"
        uid = f"{self.name}-{hashlib.sha256(expr.encode()).hexdigest()[:12]}"
        meta = {"first": first, "second": f"{op}{c}", "expr": expr}
        return Problem(
            uid=uid, prompt=f"Let x={first}. Compute x{op}{c}.", answer=str(evaluate(expr)), meta=meta
        )

    def _draw(self, rng: random.Random, val: bool) -> Problem:
        for _ in range(10_000):
            first = f"{self._operand(rng)}*{self._operand(rng)}"
            op, c = rng.choice(self.ops), self._operand(rng)
            if in_val_half(first + op + c) == val:
                return self.make_problem(first, op, c)
        raise RuntimeError("could not draw a problem from the requested half; widen digits")

    # -- scoring and expert traces ----------------------------------------------------------------
    def expert_episode(self, problem: Problem, rng: random.Random) -> list[dict]:
        """The assistant/tool turns of an expert episode: the first call always; then, with probability
        ``p_second_call``, the second call on the printed ``x`` and the right answer, else ``x`` boxed
        (wrong: the deliberate gap, see the module docstring)."""
        x = str(evaluate(problem.meta["first"]))
        turns = [
            {"role": "assistant", "content": format_tool_call(f"print({problem.meta['first']})")},
            {"role": "tool", "content": x},
        ]
        if rng.random() >= self.p_second_call:
            return [*turns, {"role": "assistant", "content": f"The answer is \\boxed{{{x}}}."}]
        second = f"{x}{problem.meta['second']}"
        y = str(evaluate(second))
        return [
            *turns,
            {"role": "assistant", "content": format_tool_call(f"print({second})")},
            {"role": "tool", "content": y},
            {"role": "assistant", "content": f"The answer is \\boxed{{{y}}}."},
        ]
