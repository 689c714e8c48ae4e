"""The ReTool loop (SPEAR_SPEC §9) with a scripted generator: stop rules, observations, failures."""

from __future__ import annotations

from spear_lit.policy import byte_chat_tokenizer
from spear_lit.rollout.chat import observation_ids, prompt_ids
from spear_lit.rollout.tool_loop import MALFORMED_NOTICE, run_tool_episodes
from spear_lit.tasks import format_tool_call

TOK = byte_chat_tokenizer()


class ScriptedEngine:
    """Replays fixed assistant turns (a test double for the policy, so the loop's rules are checkable)."""

    def __init__(self, turns: list[str]):
        self.turns, self.calls = turns, []

    def generate(self, prompts, *, max_new_tokens, **kw):
        self.calls.append(list(max_new_tokens))
        out = []
        for p, budget in zip(prompts, max_new_tokens):
            k = (
                sum(1 for t in p if t == TOK.convert_tokens_to_ids("<|im_start|>")) - 2
            )  # assistant turns so far
            ids = TOK(self.turns[min(k, len(self.turns) - 1)], add_special_tokens=False)["input_ids"] + [
                TOK.eos_token_id
            ]
            out.append(ids[:budget])
        return out


def echo_tool(codes):
    return [f"ran {len(c)} chars" for c in codes]


def run(turns, tool=echo_tool, **kw):
    engine = ScriptedEngine(turns)
    prompt = prompt_ids(TOK, "Compute 2*3.")
    (ep,) = run_tool_episodes(engine, TOK, [prompt], tool, **{"max_turns": 8, "max_response_len": 400, **kw})
    return ep, engine


def test_tool_call_then_answer_appends_the_observation_with_mask_zero():
    call = format_tool_call("print(2*3)")
    ep, _ = run([call, "The answer is \\boxed{6}."])
    first = TOK(call, add_special_tokens=False)["input_ids"] + [TOK.eos_token_id]
    obs = observation_ids(TOK, ["ran 10 chars"])
    assert ep.response_ids[: len(first) + len(obs)] == first + obs
    assert ep.response_mask[: len(first)] == [1] * len(first)
    assert ep.response_mask[len(first) : len(first) + len(obs)] == [0] * len(obs)
    assert (ep.num_turns, ep.num_tool_calls, ep.finished) == (2, 1, True)
    assert ep.last_turn_text == "The answer is \\boxed{6}."


def test_turn_limit_and_length_limit_stop_the_episode():
    ep, _ = run([format_tool_call("print(1)")], max_turns=3)
    assert (ep.num_turns, ep.finished) == (3, False)
    ep, engine = run([format_tool_call("print(1)")], max_response_len=150)
    assert len(ep.response_ids) <= 150 and not ep.finished
    assert all(b >= 1 for call in engine.calls for b in call)


def test_malformed_call_alone_is_the_final_answer_and_beside_a_valid_one_an_error_observation():
    bad = "<tool_call>\n{not json}\n</tool_call>"
    ep, _ = run([bad])
    assert ep.finished and ep.num_tool_calls == 0 and ep.num_turns == 1
    ep, _ = run([format_tool_call("print(1)") + bad, "done"])
    text = TOK.decode(ep.response_ids)
    assert MALFORMED_NOTICE in text and "ran 8 chars" in text and ep.finished


def test_a_crashing_tool_becomes_an_observation_not_a_dead_run():
    def broken(codes):
        raise OSError("sandbox exploded")

    ep, _ = run([format_tool_call("print(1)"), "The answer is \\boxed{1}."], tool=broken)
    assert "Error: the tool failed (OSError: sandbox exploded)." in TOK.decode(ep.response_ids)
    assert ep.finished and ep.num_turns == 2
