"""Scorers: strict box vs math-verify, never substituted for each other; a task takes one as a callable."""

import threading
from pathlib import Path

import pytest

from spear_lit.tasks import ArithmeticToolTask, FileMathTask, Problem, math_verify_score, strict_box


def test_strict_and_math_verify_disagree_on_equivalent_forms():
    response = "The answer is \\boxed{\\frac{1}{2}}."
    assert math_verify_score(response, "0.5")[0] == 1.0
    assert strict_box(response, "0.5") == (-1.0, "\\frac{1}{2}")
    p = Problem("u", "q", "0.5")
    assert ArithmeticToolTask(scorer=math_verify_score).score(response, p)[0] == 1.0
    assert ArithmeticToolTask(scorer=strict_box).score(response, p)[0] == -1.0
    assert ArithmeticToolTask().score(response, p)[0] == -1.0  # strict box by default (SPEAR_SPEC §6.1)


def test_math_verify_wrong_and_missing_answers_score_minus_one():
    assert math_verify_score("The answer is \\boxed{3}.", "4")[0] == -1.0
    assert math_verify_score("I do not know.", "4") == (-1.0, None)


def test_math_verify_works_off_the_main_thread():
    # math-verify's default time-outs use signal.alarm, which raises outside the main thread
    out = []
    t = threading.Thread(target=lambda: out.append(math_verify_score("\\boxed{\\frac{1}{2}}", "0.5")))
    t.start()
    t.join(30)
    assert out and out[0][0] == 1.0


@pytest.mark.parametrize("task", [ArithmeticToolTask, FileMathTask])
def test_a_scorer_given_by_name_says_how_to_select_one(task):
    with pytest.raises(
        ValueError,
        match=r"scorer='math_verify' must be a callable.*_target_: spear_lit\.tasks\."
        r"scoring\.strict_box",
    ):
        task(scorer="math_verify")


def test_the_task_configs_select_their_scorer_by_target():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "conf" / "task"
    scorer = instantiate(OmegaConf.load(conf / "arithmetic.yaml").scorer)
    assert scorer("\\boxed{4}", "4") == (1.0, "4") and scorer("\\boxed{04}", "4")[0] == -1.0
    picked = instantiate(
        OmegaConf.create({"_target_": "spear_lit.tasks.scoring.math_verify_score", "_partial_": True})
    )
    assert picked("\\boxed{\\frac{1}{2}}", "0.5")[0] == 1.0
