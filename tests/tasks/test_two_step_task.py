"""TwoStepToolTask: problems, split, and expert traces whose gap (a premature answer) scores -1."""

import random

import pytest

from spear_lit.tasks import parse_tool_calls
from spear_lit.tasks.math_tool import in_val_half
from spear_lit.tasks.two_step import TwoStepToolTask


def test_make_problem_and_both_expert_branches_hand_worked():
    task = TwoStepToolTask(p_second_call=1.0)
    p = task.make_problem("482*37", "*", "59")
    # x = 482*37 = 17834; x*59 = 1052206
    assert p.prompt == "Let x=482*37. Compute x*59." and p.answer == "1052206"
    assert p.meta == {"first": "482*37", "second": "*59", "expr": "482*37*59"}
    win = task.expert_episode(p, random.Random(0))
    assert [m["role"] for m in win] == ["assistant", "tool", "assistant", "tool", "assistant"]
    codes = [parse_tool_calls(win[i]["content"])[0][0]["arguments"]["code"] for i in (0, 2)]
    assert codes == ["print(482*37)", "print(17834*59)"]  # the second call is built from the first's output
    assert [win[1]["content"], win[3]["content"]] == ["17834", "1052206"]
    assert task.score(win[-1]["content"], p) == (1.0, "1052206")
    premature = TwoStepToolTask(p_second_call=0.0).expert_episode(p, random.Random(0))
    assert premature[-1] == {"role": "assistant", "content": "The answer is \\boxed{17834}."}
    assert task.score(premature[-1]["content"], p)[0] == -1.0
    # x - c keeps Python precedence when x is substituted: 12*34-500 = 408 - 500 = -92
    assert task.make_problem("12*34", "-", "500").answer == "-92"


def test_expert_gap_rate_split_and_determinism():
    task = TwoStepToolTask(p_second_call=0.15, val_size=100)
    rng = random.Random(3)
    train = task.train_problems(4000, rng)
    second = sum(len(task.expert_episode(p, rng)) == 5 for p in train) / len(train)
    assert abs(second - 0.15) < 0.02  # binomial std at n=4000: 0.006
    val = task.val_problems()
    assert len({p.prompt for p in val}) == 100 and val == TwoStepToolTask(val_size=100).val_problems()
    assert all(in_val_half(p.meta["expr"]) for p in val) and not any(
        in_val_half(p.meta["expr"]) for p in train
    )
    assert all(p.answer == str(eval(p.meta["expr"])) for p in train[:200] + val)
    assert train[:50] == TwoStepToolTask().train_problems(50, random.Random(3))


@pytest.mark.parametrize("kw", [{"ops": ("/",)}, {"digits": (0, 2)}, {"p_second_call": 1.5}])
def test_bad_settings_refused(kw):
    with pytest.raises(ValueError):
        TwoStepToolTask(**kw)
