"""Math answer scorers: ``(response, ground_truth) -> (reward, prediction)`` (SPEAR_SPEC §6.1).

``strict_box`` is the as-run reward (+1 iff the last ``\\boxed{}`` equals the ground truth exactly,
else -1). ``math_verify_score`` judges mathematical equivalence with the ``math-verify`` package (the
``math`` extra). A task takes one as a callable, selected in its config by ``_target_``
(``scorer: {_target_: spear_lit.tasks.scoring.math_verify_score, _partial_: true}``); an unavailable
scorer is an error, never a silent swap.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

Scorer = Callable[[str, str], tuple[float, "str | None"]]


def strict_box(response: str, ground_truth: str) -> tuple[float, str | None]:
    """SPEAR_SPEC §6.1 strict box: ``+1.0`` iff the last box of the tail equals ``ground_truth``."""
    from spear_lit.algos import strict_box_score  # lazy: keeps tasks importable on their own

    return strict_box_score(response, ground_truth)


def math_verify_score(response: str, ground_truth: str) -> tuple[float, str | None]:
    """``+1.0`` iff ``math-verify`` finds the response's answer equivalent to ``ground_truth``.

    The prediction is math-verify's string form of the extracted answer (``None`` if none).
    """
    from math_verify import parse, verify  # lazy: optional extra

    # math-verify times out with signal.alarm, which only works in the main thread
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse("\\boxed{" + ground_truth + "}", parsing_timeout=timeout)
    pred = parse(response, parsing_timeout=timeout)
    if not gold or not pred:
        return -1.0, None
    ok = verify(gold, pred, timeout_seconds=timeout)
    return (1.0 if ok else -1.0), str(pred[-1])


def check_scorer(scorer: object) -> Scorer:
    """``scorer`` if it is callable; otherwise (e.g. a name, the old form) a ``ValueError`` saying how to
    select one."""
    if not callable(scorer):
        raise ValueError(
            f"scorer={scorer!r} must be a callable (response, ground_truth) -> (reward, prediction), "
            "selected by _target_, e.g. scorer: {_target_: spear_lit.tasks.scoring.strict_box, "
            "_partial_: true} (or spear_lit.tasks.scoring.math_verify_score)"
        )
    return scorer
