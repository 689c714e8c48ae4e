"""The built-in synthetic task: integer arithmetic that a tiny policy can only solve with the tool.

Problems are short (the tiny policy's byte tokenizer pays one token per character): the user message
is just ``"Compute 4821*37-912."``. A 1M-parameter model cannot multiply 4-digit numbers in its head,
but it can learn to copy the expression into a ``code_interpreter`` call and copy the printed result
into ``\\boxed{}`` (FACTS.md: "A tiny policy can learn the math-with-tool task on CPU").
"""

from __future__ import annotations

import hashlib
import random
import re

from spear_lit.tasks.base import Problem
from spear_lit.tasks.prompts import resolve_system_prompt
from spear_lit.tasks.scoring import Scorer, check_scorer, strict_box
from spear_lit.tasks.toolcall import format_tool_call

TEMPLATES = ("product", "sum", "chain", "mod")
OPS = ("+", "-", "*")
_SAFE_EXPR = re.compile(r"[0-9+\-*%()]+")


def evaluate(expr: str) -> int:
    """Python's value of a generated expression (trusted text: digits, ``+ - * %`` and parentheses).

    This is what ``print(expr)`` shows in the sandbox, so expert traces need no sandbox.
    """
    if not _SAFE_EXPR.fullmatch(expr):
        raise ValueError(f"not a generated arithmetic expression: {expr!r}")
    return eval(expr, {"__builtins__": {}}, {})  # noqa: S307 - charset checked above


def in_val_half(expr: str) -> bool:
    """Deterministic train/val split of the problem space: a hash bit of the expression text."""
    return hashlib.sha256(expr.encode()).digest()[0] & 1 == 1


class DrawnProblems:
    """Training and validation problems drawn by the task's ``_draw(rng, val)`` from two disjoint halves of
    the problem space, scored by its ``_scorer``; shared by the generated math tasks."""

    def _setup(
        self,
        name: str,
        digits: tuple[int, int],
        val_size: int,
        val_seed: int,
        scorer: Scorer,
        system_prompt: str | None,
    ) -> None:
        """The settings every generated task has (operand sizes, validation set, scorer, system prompt)."""
        if not 1 <= digits[0] <= digits[1]:
            raise ValueError(f"digits must satisfy 1 <= min <= max, got {digits}")
        self.name, self.digits = name, tuple(digits)
        self.val_size, self.val_seed = val_size, val_seed
        self._scorer = check_scorer(scorer)
        self.system_prompt = resolve_system_prompt(system_prompt)
        self._val: list[Problem] | None = None

    def _operand(self, rng: random.Random) -> str:
        d = rng.randint(*self.digits)
        return str(rng.randint(10 ** (d - 1), 10**d - 1))

    def train_problems(self, n: int, rng: random.Random) -> list[Problem]:
        """``n`` independent training draws (never in the validation half; repeats possible)."""
        return [self._draw(rng, val=False) for _ in range(n)]

    def val_problems(self) -> list[Problem]:
        """The fixed validation set: ``val_size`` distinct val-half problems (cached)."""
        if self._val is None:
            rng, seen, out = random.Random(self.val_seed), set(), []
            for _ in range(100 * self.val_size + 100):
                if len(out) == self.val_size:
                    break
                p = self._draw(rng, val=True)
                if p.prompt not in seen:
                    seen.add(p.prompt)
                    out.append(p)
            if len(out) < self.val_size:
                raise ValueError(f"only {len(out)} distinct validation problems exist; lower val_size")
            self._val = out
        return list(self._val)

    def score(self, response: str, problem: Problem) -> tuple[float, str | None]:
        """``(+1 | -1, prediction)`` with the configured scorer."""
        return self._scorer(response, problem.answer)


class ArithmeticToolTask(DrawnProblems):
    """Integer arithmetic problems with a code tool, and ReTool-style expert traces for cold-start SFT.

    Templates (operands have ``digits[0]..digits[1]`` digits, chosen per operand):
      * ``product``: ``a*b``
      * ``sum``: ``a+b+…`` with ``num_terms[0]..num_terms[1]`` operands
      * ``chain``: ``a∘b∘…`` with ``num_terms`` operands, each ``∘`` drawn from ``ops`` (Python precedence)
      * ``mod``: ``(a*b)%m``

    Training draws and validation problems come from the two halves of a hash split of the expression
    text (:func:`in_val_half`), so they never overlap; the validation set is the first ``val_size``
    distinct val-half problems drawn with ``random.Random(val_seed)``.

    Expert traces (:meth:`expert_episode`) contain a deliberate gap: with probability ``p_no_tool`` the
    expert answers directly, ``The answer is \\boxed{N}.`` with the correct ``N``, as if it had done the
    arithmetic in its head. A tiny policy cannot imitate mental arithmetic, so after SFT it answers
    wrongly whenever it skips the tool; RL (and SPEAR's tool-call reward) has something to fix that
    more SFT on the same traces would keep reproducing.

    Args:
        name: metric name (``val/<name>/accuracy``).
        templates: subset of ``TEMPLATES`` to draw from (uniformly).
        digits: inclusive ``(min, max)`` digit count of each operand.
        num_terms: inclusive ``(min, max)`` operand count of ``sum`` and ``chain`` (min >= 2).
        ops: operators of ``chain``, a subset of ``("+", "-", "*")``.
        val_size: number of validation problems.
        val_seed: seed of the validation set.
        p_no_tool: probability that an expert trace answers without the tool.
        scorer: ``(response, ground_truth) -> (reward, prediction)``: :func:`~spear_lit.tasks.scoring.strict_box`
            (SPEAR_SPEC §6.1) or :func:`~spear_lit.tasks.scoring.math_verify_score`.
        system_prompt: ``None`` (default: the tiny policy pays per character), a preset name
            (``"retool"``) or literal text.
    """

    def __init__(
        self,
        *,
        name: str = "arith",
        templates: tuple[str, ...] = TEMPLATES,
        digits: tuple[int, int] = (2, 4),
        num_terms: tuple[int, int] = (3, 4),
        ops: tuple[str, ...] = OPS,
        val_size: int = 256,
        val_seed: int = 1234,
        p_no_tool: float = 0.3,
        scorer: Scorer = strict_box,
        system_prompt: str | None = None,
    ):
        templates, ops = tuple(templates), tuple(ops)
        if not templates or not set(templates) <= set(TEMPLATES):
            raise ValueError(f"templates must be a non-empty subset of {TEMPLATES}, got {templates}")
        if not ops or not set(ops) <= set(OPS):
            raise ValueError(f"ops must be a non-empty subset of {OPS}, got {ops}")
        self._setup(name, digits, val_size, val_seed, scorer, system_prompt)
        if not 2 <= num_terms[0] <= num_terms[1]:
            raise ValueError(f"num_terms must satisfy 2 <= min <= max, got {num_terms}")
        if not 0.0 <= p_no_tool <= 1.0:
            raise ValueError(f"p_no_tool must be in [0, 1], got {p_no_tool}")
        self.templates, self.ops = templates, ops
        self.num_terms, self.p_no_tool = tuple(num_terms), p_no_tool

    # -- generation -------------------------------------------------------------------------------
    def _expression(self, rng: random.Random) -> tuple[str, str]:
        """One random ``(template, expression)``."""
        template = rng.choice(self.templates)
        if template == "product":
            return template, f"{self._operand(rng)}*{self._operand(rng)}"
        if template == "mod":
            return template, f"({self._operand(rng)}*{self._operand(rng)})%{self._operand(rng)}"
        n = rng.randint(*self.num_terms)
        expr = self._operand(rng)
        for _ in range(n - 1):
            op = "+" if template == "sum" else rng.choice(self.ops)
            expr += op + self._operand(rng)
        return template, expr

    def make_problem(self, expr: str, template: str = "custom") -> Problem:
        """The problem ``Compute <expr>.`` with its answer (``meta``: ``expr``, ``template``)."""
        uid = f"{self.name}-{hashlib.sha256(expr.encode()).hexdigest()[:12]}"
        meta = {"expr": expr, "template": template}
        return Problem(uid=uid, prompt=f"Compute {expr}.", answer=str(evaluate(expr)), meta=meta)

    def _draw(self, rng: random.Random, val: bool) -> Problem:
        for _ in range(10_000):
            template, expr = self._expression(rng)
            if in_val_half(expr) == val:
                return self.make_problem(expr, template)
        raise RuntimeError("could not draw a problem from the requested half; widen digits/num_terms")

    # -- scoring and expert traces ----------------------------------------------------------------
    def expert_episode(self, problem: Problem, rng: random.Random) -> list[dict]:
        """The assistant/tool turns of an expert episode, as chat messages.

        With the tool (probability ``1 - p_no_tool``)::

            assistant: <tool_call>\\n{"name": "code_interpreter", "arguments": {"code": "print(E)"}}\\n</tool_call>
            tool:      <what print(E) shows>
            assistant: The answer is \\boxed{<value>}.

        Without the tool: only the final assistant turn (see the class docstring for why).
        """
        expr = problem.meta["expr"]
        value = str(evaluate(expr))
        final = {"role": "assistant", "content": f"The answer is \\boxed{{{value}}}."}
        if rng.random() < self.p_no_tool:
            return [final]
        call = {"role": "assistant", "content": format_tool_call(f"print({expr})")}
        return [call, {"role": "tool", "content": value}, final]
