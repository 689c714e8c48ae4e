"""Nothing a model writes can crash the run: every parser of model output, fuzzed with hypothesis.

Each outcome must be a parsed call/action or "nothing parsed" (an observation for the policy), never an
exception. The linear-time rewrites of ``parse_tool_calls`` and ``has_final_answer`` are also checked
against the straightforward (quadratic) definitions they replaced.
"""

import json
import re
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spear_lit.agents.env_prompts import AlfWorldPrompt, WebShopPrompt
from spear_lit.rollout.env_loop import match_admissible, parse_env_action
from spear_lit.tasks.toolcall import format_tool_call, has_final_answer, parse_tool_calls

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TAGS = [
    "<tool_call>",
    "</tool_call>",
    "{",
    "}",
    "\\boxed{",
    '"name"',
    '"arguments"',
    "<action>",
    "</action>",
    "<think>",
    "</think>",
    '"code_interpreter"',
    "\ud800",
    "NaN",
    "1" * 5000,
]
# Text made of fragments that matter to the parsers, mixed with arbitrary unicode (lone surrogates too).
texty = st.lists(st.one_of(st.sampled_from(TAGS), st.text(max_size=20)), max_size=30).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def _reference_blocks(text):
    """The regex definition that parse_tool_calls replaced: lazy blocks + unclosed-tag check."""
    blocks = re.findall(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL)
    tail = text[text.rfind("</tool_call>") + len("</tool_call>") :] if "</tool_call>" in text else text
    return [b.strip() for b in blocks], "<tool_call>" in tail


def _reference_has_final_answer(text):
    start = text.find("\\boxed{")
    while start != -1:
        depth = 0
        for ch in text[start + len("\\boxed") :]:
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                return True
        start = text.find("\\boxed{", start + 1)
    return False


def _check_calls(text):
    calls, malformed = parse_tool_calls(text)
    assert isinstance(malformed, bool)
    for c in calls:
        assert c["name"] == "code_interpreter" and isinstance(c["arguments"]["code"], str)
    blocks, unclosed = _reference_blocks(text)
    assert len(calls) <= len(blocks)
    assert malformed == (unclosed or len(calls) < len(blocks))
    return calls


@FUZZ
@given(texty)
def test_tool_call_parser_on_arbitrary_text(text):
    _check_calls(text)
    assert has_final_answer(text) == _reference_has_final_answer(text)


@FUZZ
@given(json_values)
def test_tool_call_parser_on_arbitrary_json_in_tags(value):
    payload = json.dumps(value)
    _check_calls(f"<tool_call>{payload}</tool_call>")
    call = {"name": "code_interpreter", "arguments": {"code": "print(1)", "extra": value}}
    calls = _check_calls(f"<tool_call>{json.dumps(call)}</tool_call>")
    assert len(calls) == 1 and calls[0]["arguments"]["extra"] == value or value != value or _has_nan(value)


def _has_nan(v):
    if isinstance(v, float):
        return v != v
    if isinstance(v, list):
        return any(map(_has_nan, v))
    if isinstance(v, dict):
        return any(map(_has_nan, v.values()))
    return False


def test_hostile_json_is_a_malformed_call_not_a_crash():
    huge = "9" * 5000  # int() refuses > 4300 digits: json.loads raises ValueError (not JSONDecodeError)
    deep = "[" * (sys.getrecursionlimit() * 4) + "]" * (sys.getrecursionlimit() * 4)
    for payload in (
        '{"name": "code_interpreter", "arguments": {"code": "x", "n": ' + huge + "}}",
        '{"name": "code_interpreter", "arguments": ' + deep + "}",
        '{"name": "code_interpreter", "arguments": {"code": NaN}}',
        '{"name": "code_interpreter", "arguments": {"code": "\\ud800"}}',  # a lone surrogate is still a str
        '{"name": ["code_interpreter"], "arguments": {"code": "x"}}',  # unhashable name
    ):
        calls, malformed = parse_tool_calls(f"<tool_call>{payload}</tool_call>")
        assert len(calls) + malformed == 1
    calls, _ = parse_tool_calls(format_tool_call("print('\\ud800')"))
    assert calls[0]["arguments"]["code"] == "print('\\ud800')"


def test_many_unclosed_tags_parse_in_linear_time():
    text = "<tool_call>" * 20000 + "\\boxed{" * 20000  # quadratic parsers take minutes on this
    assert parse_tool_calls(text) == ([], True)
    assert not has_final_answer(text)
    assert has_final_answer(text + "}")


@FUZZ
@given(texty, st.lists(st.text(max_size=12), max_size=6), st.booleans())
def test_env_action_parsers_on_arbitrary_text(text, admissible, require_think):
    action = parse_env_action(text, require_think=require_think)
    assert action is None or (isinstance(action, str) and action == action.strip() and action)
    for candidate in filter(None, [action, text]):
        sent = match_admissible(candidate, admissible)
        assert sent is None or isinstance(sent, str)


@FUZZ
@given(
    st.one_of(texty, st.sampled_from(["²", "1" * 5000, "٣", " 12 ", "0", "-1", "+1"])),
    st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=6),
)
def test_numbered_action_commands_never_raise(action, admissible):
    for prompt in (AlfWorldPrompt(numbered=True), WebShopPrompt(numbered=True)):
        cmd = prompt.command(action, admissible)
        assert cmd is None or isinstance(cmd, str)
