"""The ReTool-style multi-turn loop (SPEAR_SPEC §9): policy turns interleaved with tool observations.

All active episodes of an iteration generate together (one batched ``generate`` per turn) and all their
tool calls of a turn run together (the tool's worker pool), so a turn costs one model call and one
parallel tool round, whatever the batch size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from spear_lit.batch import Episode
from spear_lit.rollout.chat import observation_ids
from spear_lit.rollout.hf_engine import RolloutEngine
from spear_lit.tasks.toolcall import parse_tool_calls

log = logging.getLogger(__name__)
MALFORMED_NOTICE = (
    'Error: the tool call could not be parsed (expected JSON with "name" and "arguments": {"code": ...}).'
)


def run_tool_episodes(
    engine: RolloutEngine,
    tokenizer,
    prompts: list[list[int]],
    tool: Callable[[list[str]], list[str]],
    *,
    max_turns: int = 8,
    max_response_len: int = 512,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    sync: Callable[[bool], bool] | None = None,
) -> list[Episode]:
    """Roll out one episode per prompt.

    An episode stops at a turn without a valid tool call (its final answer), after ``max_turns``
    assistant turns, or when its response reaches ``max_response_len`` tokens; an observation that
    would cross that length is not appended (the episode ends instead). Nor does prompt + response ever
    reach the engine's ``context_len`` (vLLM's ``max_model_len``: a longer request would crash the replica):
    turns are budgeted to fit, and an episode left without room ends, marked ``truncated``. Malformed tool-call blocks are
    never executed: beside valid calls they get an error observation; alone, the turn counts as the
    final answer.

    Args:
        tool: runs a batch of code strings, returns one observation text per string, never raises.
        sync: under sharded training, ``sync(local_has_work) -> any rank has work``; ranks keep
            calling ``generate`` (on a dummy prompt) until all are done, so collectives stay matched.
    """
    episodes = [Episode(prompt_ids=list(p)) for p in prompts]
    context = getattr(engine, "context_len", None) or float("inf")
    for turn in range(max_turns):
        for e in episodes:
            if e.active and _room(e, context) < 1:
                e.active, e.truncated = False, True
        active = [e for e in episodes if e.active]
        if sync is not None and not sync(bool(active)):
            break
        if not active and sync is None:
            break
        run = active or [Episode(prompt_ids=prompts[0] if prompts else [tokenizer.eos_token_id])]
        budgets = [max(1, min(max_response_len - len(e.response_ids), _room(e, context))) for e in run]
        outs = engine.generate(
            [e.prompt_ids + e.response_ids for e in run],
            max_new_tokens=budgets,
            temperature=temperature,
            top_p=top_p,
            greedy=greedy,
        )
        if not active:
            continue
        _step(active, outs, tokenizer, tool, max_response_len, last_turn=turn == max_turns - 1)
        for e in active:  # cut off mid-turn (or with no room left) by the context length, not by L
            if not e.finished and _room(e, context) < 1:
                e.active, e.truncated = False, True
    for e in episodes:
        e.active = False
    return episodes


def _step(
    active: list[Episode], outs: list[list[int]], tokenizer, tool, max_response_len: int, last_turn: bool
) -> None:
    """Append one generated turn to each active episode and run the tool calls it made."""
    pending: list[tuple[Episode, list[str | None]]] = []
    for e, ids in zip(active, outs):
        e.append(ids, generated=True, logp=getattr(ids, "logprobs", None))
        e.num_turns += 1
        e.last_turn_text = tokenizer.decode(ids, skip_special_tokens=True)
        ended_turn = bool(ids) and ids[-1] == tokenizer.eos_token_id
        calls, malformed = parse_tool_calls(e.last_turn_text)
        if not ended_turn or len(e.response_ids) >= max_response_len:
            e.active = False  # cut off mid-turn: overlong
            continue
        if not calls:
            e.active, e.finished = False, True  # no valid call: this turn is the final answer
            continue
        e.num_tool_calls += 1
        if last_turn:
            e.active = False  # turn limit: no observation would ever be read
            continue
        codes: list[str | None] = [c["arguments"]["code"] for c in calls] + ([None] if malformed else [])
        pending.append((e, codes))
    flat = [c for _, codes in pending for c in codes if c is not None]
    results = iter(_run_tool(tool, flat))
    for e, codes in pending:
        texts = [next(results) if c is not None else MALFORMED_NOTICE for c in codes]
        obs = observation_ids(tokenizer, texts)
        if len(e.response_ids) + len(obs) >= max_response_len:
            e.active = False  # SPEAR_SPEC §9: an observation that would exceed L is not appended
            continue
        e.append(obs, generated=False)


def _room(e: Episode, context: float) -> float:
    """Tokens the engine may still generate for ``e`` within its context length."""
    return context - len(e.prompt_ids) - len(e.response_ids)


def _run_tool(tool, codes: list[str]) -> list[str]:
    """The tool's observations; a crash of the tool itself becomes an observation, never a dead run."""
    if not codes:
        return []
    try:
        out = list(tool(codes))
        if len(out) != len(codes):
            raise RuntimeError(f"tool returned {len(out)} observations for {len(codes)} calls")
        return out
    except Exception as e:  # noqa: BLE001 - any tool failure is reported to the policy
        log.warning("tool failed on a batch of %d calls: %r", len(codes), e)
        return [f"Error: the tool failed ({type(e).__name__}: {e})."] * len(codes)
