"""Hermes-style tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Shared by the expert-trace generator (which writes calls) and the agent loops (which parse the
policy's calls; SPEAR_SPEC §9: malformed calls are never executed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

TOOL_NAME = "code_interpreter"
# tool name -> argument names that must be present and be strings
DEFAULT_TOOLS: Mapping[str, Sequence[str]] = {TOOL_NAME: ("code",)}

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


def format_tool_call(code: str, name: str = TOOL_NAME) -> str:
    """The exact text of one call, e.g. ``<tool_call>\\n{"name": "code_interpreter", "arguments":
    {"code": "print(1+1)"}}\\n</tool_call>`` (``json.dumps`` default separators)."""
    return f"{_OPEN}\n{json.dumps({'name': name, 'arguments': {'code': code}})}\n{_CLOSE}"


def _validate(payload: str, tools: Mapping[str, Sequence[str]]) -> dict | None:
    """The call as ``{"name", "arguments"}`` if ``payload`` is a well-formed call of a known tool."""
    try:
        call = json.loads(payload)
    except (ValueError, RecursionError):  # bad JSON, an int of > 4300 digits, nesting deeper than the stack
        return None
    if not isinstance(call, dict):
        return None
    name, args = call.get("name"), call.get("arguments")
    if not isinstance(name, str) or name not in tools or not isinstance(args, dict):
        return None
    if not all(isinstance(args.get(key), str) for key in tools[name]):
        return None
    return {"name": name, "arguments": args}


def parse_tool_calls(
    text: str, tools: Mapping[str, Sequence[str]] = DEFAULT_TOOLS
) -> tuple[list[dict], bool]:
    """Parse every ``<tool_call>…</tool_call>`` block of one assistant turn.

    Args:
        text: decoded assistant turn.
        tools: known tools, each with the argument names that must be strings.

    Returns:
        ``(calls, malformed)``: the valid calls in order, each ``{"name": str, "arguments": dict}``,
        and whether any block was malformed (bad JSON, not an object, missing/non-string name, unknown
        tool, missing/non-dict arguments, a required argument missing or not a string) or an opening
        tag was left unclosed. Malformed blocks are dropped, never executed.
    """
    calls, malformed, pos = [], False, 0
    # One left-to-right scan (a regex with a lazy group is quadratic on many unclosed tags): each block
    # runs from an opening tag to the next closing tag, as a non-greedy match would.
    while (start := text.find(_OPEN, pos)) != -1:
        end = text.find(_CLOSE, start + len(_OPEN))
        if end == -1:
            malformed = True  # an opening tag never closed (e.g. cut off by the length limit)
            break
        call = _validate(text[start + len(_OPEN) : end].strip(), tools)
        if call is None:
            malformed = True
        else:
            calls.append(call)
        pos = end + len(_CLOSE)
    return calls, malformed


def has_final_answer(text: str) -> bool:
    """Whether ``text`` contains a ``\\boxed{`` whose braces balance (a parseable final answer).

    Linear time (the model writes it; a nested loop would be quadratic in the number of boxes): a box
    opened at brace depth ``b`` closes once the depth after it falls back to ``b``; depth moves by one, so
    the first box to close is the one opened at the highest depth, and one scan tracking it decides.
    """
    first = text.find("\\boxed{")
    if first == -1:
        return False
    opens = set()
    start = first
    while start != -1:
        opens.add(start + len("\\boxed"))
        start = text.find("\\boxed{", start + 1)
    depth, highest = 0, None
    for i in range(first + len("\\boxed"), len(text)):
        if i in opens:
            highest = depth if highest is None else max(highest, depth)
        depth += (text[i] == "{") - (text[i] == "}")
        if highest is not None and depth <= highest:
            return True
    return False
