"""The step-wise environment agent (SPEAR_SPEC §9, §2.2, §3.4, §6.2, §7): invalid actions, step returns,
groups, failure containment, expert demonstrations, GiGPO anchors, and no stray worker processes.

A scripted engine (a test double for the policy that answers each prompt with a fixed text) checks the
rules exactly; the real WebShopEnv with a tiny random model through HFEngine checks the wiring."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spear_lit.agents import EnvAgent
from spear_lit.agents.env_prompts import AlfWorldPrompt, StepPromptBase, WebShopPrompt
from spear_lit.envs.base import StepResult
from spear_lit.envs.webshop import WebShopEnv
from spear_lit.policy import PolicySource
from spear_lit.rollout import HFEngine
from spear_lit.rollout.env_loop import (
    episodes_to_samples,
    match_admissible,
    parse_env_action,
    run_env_episodes,
)

SRC = PolicySource(
    tiny={
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
)
TOK = SRC.tokenizer()
G = 0.95


def act(a: str) -> str:
    return f"<think>ok</think><action>{a}</action>"


class ScriptedEngine:
    """Answers each prompt with ``respond(prompt_text)`` (a string, or token ids used as they are)."""

    def __init__(self, respond):
        self.respond, self.calls = respond, []

    def generate(self, prompts, *, max_new_tokens, **kw):
        self.calls.append(len(prompts))
        out = []
        for p, budget in zip(prompts, max_new_tokens):
            r = self.respond(TOK.decode(p))
            ids = (
                r
                if isinstance(r, list)
                else TOK(r, add_special_tokens=False)["input_ids"] + [TOK.eos_token_id]
            )
            out.append(list(ids)[:budget])
        return out


class LineEnv:
    """Walk from 0 to ``goal`` with ``left``/``right``; reward 1 on arrival. Can raise or hang at a step."""

    def __init__(
        self,
        name: str,
        *,
        goal: int = 2,
        raise_at: int | None = None,
        hang_at: int | None = None,
        hang_s: float = 3.0,
    ):
        self.name, self.goal, self.raise_at, self.hang_at, self.hang_s = name, goal, raise_at, hang_at, hang_s
        self.calls, self.closed = 0, False

    def _result(self, reward=0.0, done=False):
        return StepResult(
            f"{self.name}@{self.pos}",
            reward,
            done,
            done,
            True,
            ["left", "right"],
            {"task": f"reach {self.goal}"},
        )

    def reset(self, task_id):
        self.pos, self.calls = 0, 0
        return self._result()

    def step(self, action):
        self.calls += 1
        if self.calls == self.raise_at:
            raise RuntimeError("engine exploded")
        if self.calls == self.hang_at:
            time.sleep(self.hang_s)
        self.pos += 1 if action == "right" else -1
        return self._result(1.0 if self.pos == self.goal else 0.0, self.pos == self.goal)

    def close(self):
        self.closed = True


def scripted(scripts: dict[str, list[str]]):
    """Per-environment scripts, picked by the env name in the prompt's ``Obs: NAME@pos`` line."""
    used: dict[str, int] = {}

    def respond(text):
        if "Obs:" not in text:
            return ""  # the dummy prompt of a rank without work
        name = re.search(r"Obs: (\w+)@", text).group(1)
        used[name] = used.get(name, 0) + 1
        return scripts[name][used[name] - 1]

    return ScriptedEngine(respond)


def run(envs, engine, **kw):
    kw = {"prompt": StepPromptBase(compact=True), "max_steps": 6, "max_response_len": 64, **kw}
    return run_env_episodes(engine, TOK, envs, list(range(len(envs))), **kw)


# ------------------------------------------------------------------------------------------- the rules


def test_parse_and_match():
    assert (
        parse_env_action("<think>a</think><action>x</action> then <action> go to shelf 1 </action>")
        == "go to shelf 1"
    )
    assert parse_env_action("<action>go</action>") is None  # no <think> block (verl-agent's rule)
    assert parse_env_action("<action>go</action>", require_think=False) == "go"
    assert (
        parse_env_action("<think></think><action>  </action>") is None and parse_env_action("<think>") is None
    )
    adm = ["search[<query>]", "click[buy now]"]
    assert match_admissible("Click[Buy Now]", adm) == "click[buy now]"
    assert match_admissible("search[red shoes]", adm) == "search[red shoes]"
    assert match_admissible("search[ ]", adm) is None and match_admissible("click[x]", adm) is None
    assert match_admissible("anything", []) == "anything"


def test_numbered_actions_accept_the_number_and_send_the_listed_text():
    p = WebShopPrompt(compact=True, numbered=True)
    adm = ["search[<query>]", "click[back to search]", "click[ab12cd34]"]
    assert "\nActions: 1: search[<query>] | 2: click[back to search] | 3: click[ab12cd34]\n" in p(
        "t", [], "o", adm, step=0
    )
    assert p.command("3", adm) == "click[ab12cd34]" and p.command(" 2 ", adm) == "click[back to search]"
    assert p.command("1", adm) is None  # a placeholder action has to be written out
    assert p.command("0", adm) is None and p.command("4", adm) is None and p.command("3rd", adm) is None
    assert p.command("Click[AB12CD34]", adm) == "click[ab12cd34]"  # written-out actions still work
    assert p.command("search[red shoes]", adm) == "search[red shoes]"
    assert p.response("click[AB12CD34]", adm) == "<think></think><action>3</action>"
    assert p.response("search[red shoes]", adm) == "<think></think><action>search[red shoes]</action>"
    alf = AlfWorldPrompt(compact=True, numbered=True)  # numbers count the listed actions ("help" is not)
    assert alf.command("2", ["help", "look", "go to desk 1"]) == "go to desk 1"
    assert "(or its number)" in AlfWorldPrompt(numbered=True)("t", [], "o", ["look"], step=0)
    plain = WebShopPrompt(compact=True)
    assert plain.command("3", adm) is None and plain.response("click[ab12cd34]", adm).endswith(
        ">click[ab12cd34]</action>"
    )


def test_invalid_actions_leave_the_state_and_are_penalised_with_hand_worked_returns():
    env = LineEnv("A")
    engine = scripted({"A": [act("right"), "no tags at all", act("jump"), act("RIGHT")]})
    (ep,) = run([env], engine)
    assert env.calls == 2 and ep.won and ep.num_env_steps == 2  # the two invalid rows never reached step()
    assert [s.anchor for s in ep.steps] == ["A@0", "A@1", "A@1", "A@1"]  # state unchanged by invalid rows
    assert ep.steps[1].prompt_ids != ep.steps[2].prompt_ids  # the history shows the invalid attempt
    samples = episodes_to_samples([ep], [0])
    # env rewards [0, 0, 0, 1]; G_t = γ^(3-t): [0.857375, 0.9025, 0.95, 1]; rows 1, 2 invalid: -0.1
    assert [s.step_return for s in samples] == pytest.approx([0.857375, 0.8025, 0.85, 1.0])
    assert [s.score for s in samples] == pytest.approx([1.0, 0.9, 0.9, 1.0])  # episode reward 1, minus 0.1
    assert [s.incomplete for s in samples] == [False, True, False, False]
    assert all(s.success and s.num_tool_calls == 2 and s.turns == 4 and s.episode == 0 for s in samples)
    assert all(
        s.response_mask == [1] * len(s.response_ids) and s.response_ids[-1] == TOK.eos_token_id
        for s in samples
    )
    assert engine.calls == [1, 1, 1, 1]


def test_step_limit_and_batched_generation():
    envs = [LineEnv("A"), LineEnv("B")]
    engine = scripted({"A": [act("left")] * 9, "B": [act("right")] * 9})
    a, b = run(envs, engine, max_steps=3)
    assert engine.calls == [2, 2, 1]  # one generate per step for all live episodes; B won at step 2
    assert (len(a.steps), a.won, len(b.steps), b.won) == (3, False, 2, True)
    sa = episodes_to_samples([a, b], [0, 0])
    # A: never rewarded, all valid → returns 0, score 0; B: rewards [0, 1] → G = [0.95, 1]
    assert [s.step_return for s in sa] == pytest.approx([0, 0, 0, 0.95, 1.0])
    assert [s.episode for s in sa] == [0, 0, 0, 1, 1]


def test_an_env_that_raises_or_hangs_fails_its_episode_only():
    envs = [LineEnv("A"), LineEnv("B", raise_at=2), LineEnv("C", hang_at=1, hang_s=60.0)]
    engine = scripted({k: [act("right")] * 5 for k in "ABC"})
    start = time.monotonic()
    a, b, c = run(envs, engine, step_timeout_s=0.5)
    # the hung call was abandoned, not awaited: it hangs 60 s and times out after 0.5 s, and 30 s is far
    # from both, so load alone cannot cross it (its daemon thread sleeps on and cannot block exit)
    assert time.monotonic() - start < 30
    assert a.won and a.error is None
    assert not b.won and "engine exploded" in b.error and b.env_failed and len(b.steps) == 2
    assert not c.won and "time-out" in c.error and len(c.steps) == 1
    rows = episodes_to_samples([a, b, c], [0, 0, 0])
    assert {s.episode for s in rows if "error" in s.info} == {1, 2}
    assert all(not s.success for s in rows if s.episode > 0)


def test_reset_failure_and_sync_keep_generating_for_the_other_ranks():
    class Broken(LineEnv):
        def reset(self, task_id):
            raise OSError("no game")

    votes = []

    def sync(has_work):  # this rank finishes first; another rank still works for 2 more steps
        votes.append(has_work)
        return has_work or votes.count(False) <= 2

    engine = scripted({"A": [act("right")] * 5})
    a, broken = run([LineEnv("A"), Broken("X")], engine, sync=sync, max_steps=6)
    assert a.won and broken.error == "OSError: no game" and not broken.steps
    assert votes == [True, True, False, False, False] and len(engine.calls) == 4  # 2 real + 2 dummy calls


# ----------------------------------------------------------------------------------- WebShop, EnvAgent


def make_webshop_agent(**prompt_kw):
    return EnvAgent(
        functools.partial(WebShopEnv, num_products=200, val_goals=50),
        WebShopPrompt(compact=True, history_len=2, **prompt_kw),
        name="webshop",
        max_steps=6,
        eval_envs=4,
    )


@pytest.fixture(scope="module")
def webshop_agent():
    agent = make_webshop_agent()
    yield agent
    agent.close()


def test_tiny_model_rollout_groups_share_their_initial_state(webshop_agent):
    engine = HFEngine()
    engine.bind(SRC.model(), TOK)
    kw = dict(num_groups=2, group_size=3, max_response_len=8, temperature=1.0, top_p=1.0)
    samples = webshop_agent.collect(engine, TOK, t=1, seed=3, **kw)
    pool = list(webshop_agent._pools["train"])
    first = {}
    for s in samples:
        if s.info["step"] == 0:
            first.setdefault(s.group, set()).add((s.anchor, tuple(s.prompt_ids)))
    assert sorted(first) == [0, 1] and all(len(v) == 1 for v in first.values())  # same task, same start
    assert first[0] != first[1]
    # random bytes never form an action: every row is invalid, the state never moves
    assert all(s.score == pytest.approx(-0.1) and s.step_return == pytest.approx(-0.1) for s in samples)
    assert all(s.incomplete and s.num_tool_calls == 0 and s.turns == 6 for s in samples)
    assert len(samples) == 6 * 6 and {s.episode for s in samples} == set(range(6))
    again = webshop_agent.collect(engine, TOK, t=2, seed=3, **kw)
    assert webshop_agent._pools["train"] == pool  # environments live across iterations
    assert [s.anchor for s in again if s.info["step"] == 0] == [
        s.anchor for s in samples if s.info["step"] == 0
    ]
    wins, n = webshop_agent.evaluate(
        engine, TOK, shard=(1, 2), limit=7, max_response_len=4, temperature=0.4, top_p=1.0, greedy=False
    )
    assert (wins, n) == (0, 3)  # tasks 1, 3, 5 of the first 7


def expert_answers(agent, num_episodes, seed):
    rows = agent.expert_samples(TOK, num_episodes=num_episodes, seed=seed)
    assert rows and all(set(r) == {"prompt_ids", "response_ids", "response_mask"} for r in rows)
    return rows, {TOK.decode(r["prompt_ids"]): r["response_ids"] for r in rows}


def test_expert_samples_replayed_through_the_same_prompts_win(webshop_agent):
    rows, answer = expert_answers(webshop_agent, 4, seed=11)
    assert TOK.decode(rows[0]["response_ids"]).startswith("<think></think><action>search[")
    assert TOK.decode(rows[0]["response_ids"]).endswith("]</action><|im_end|>")
    engine = ScriptedEngine(lambda text: answer[text])  # a KeyError would mean the formats differ
    samples = webshop_agent.collect(
        engine,
        TOK,
        t=1,
        seed=11,
        num_groups=4,
        group_size=2,
        max_response_len=400,
        temperature=1.0,
        top_p=1.0,
    )
    assert len(samples) == 2 * len(rows)
    assert all(s.success and s.info["valid"] and s.score == pytest.approx(10.0) for s in samples)
    assert all(s.num_tool_calls == s.turns for s in samples)


def test_numbered_expert_answers_clicks_by_number_and_wins():
    agent = make_webshop_agent(numbered=True)
    try:
        rows, answer = expert_answers(agent, 4, seed=11)
        replies = [TOK.decode(r["response_ids"], skip_special_tokens=True) for r in rows]
        assert replies[0].startswith("<think></think><action>search[")
        assert all(
            re.fullmatch(r"<think></think><action>\d+</action>", r) for r in replies[1:] if "search[" not in r
        )
        assert "Past: search[" in TOK.decode(
            rows[1]["prompt_ids"]
        )  # the history shows the text, not a number
        samples = agent.collect(
            ScriptedEngine(lambda text: answer[text]),
            TOK,
            t=1,
            seed=11,
            num_groups=4,
            group_size=1,
            max_response_len=400,
            temperature=1.0,
            top_p=1.0,
        )
        assert len(samples) == len(rows) and all(s.success and s.info["valid"] for s in samples)
        assert re.search(r"Past: .*click\[\w+\]", TOK.decode(samples[2].prompt_ids))
    finally:
        agent.close()


def test_train_tasks_restricts_draws_to_the_first_tasks(webshop_agent):
    full = webshop_agent.draw_tasks(5, 40)
    assert len(set(full)) == 40 and max(full) >= 8  # the whole split (hundreds of goals)
    few = EnvAgent(webshop_agent.env_factory, webshop_agent.prompt, train_tasks=8)
    try:
        assert sorted(few.draw_tasks(5, 8)) == list(range(8))  # distinct while there are enough
        draws = few.draw_tasks(5, 40)
        assert len(draws) == 40 and set(draws) <= set(range(8))
    finally:
        few.close()
    with pytest.raises(ValueError, match="train_tasks"):
        EnvAgent(webshop_agent.env_factory, webshop_agent.prompt, train_tasks=0)


def test_gigpo_anchors_equal_for_envs_of_a_group_in_the_same_state(webshop_agent):
    def no_history(text):
        return "\n".join(line for line in text.split("\n") if not line.startswith("Past:"))

    _, answer = expert_answers(webshop_agent, 2, seed=5)
    answer = {no_history(k): v for k, v in answer.items()}
    wasted = []

    def respond(text):  # the expert, except that episode 0 first tries an inadmissible click
        if not wasted:
            wasted.append(text)
            return act("click[nothing here]")
        return answer[no_history(text)]

    samples = webshop_agent.collect(
        ScriptedEngine(respond),
        TOK,
        t=1,
        seed=5,
        num_groups=2,
        group_size=2,
        max_response_len=400,
        temperature=1.0,
        top_p=1.0,
    )
    e0, e1 = ([s for s in samples if s.episode == k] for k in (0, 1))
    assert e0[0].group == e1[0].group == 0 and e0[0].success and e1[0].success
    assert not e0[0].info["valid"] and e0[0].anchor == e0[1].anchor == e1[0].anchor  # still at the start
    assert [s.anchor for s in e0[1:]] == [s.anchor for s in e1]  # then the same states, step by step
    assert len(set(s.anchor for s in e1)) == len(e1)
    # invalid row: score 10 - 0.1; its return is the discounted win from one step further away, minus 0.1
    assert e0[0].score == pytest.approx(9.9)
    assert e0[0].step_return == pytest.approx(10 * G ** (len(e0) - 1) - 0.1)
    assert e0[1].step_return == pytest.approx(e1[0].step_return)


# ----------------------------------------------------------------------------------------------- ALFWorld

ALF_PY = sys.executable  # the project's own environment: `make setup` installs the alfworld extra


def _alfworld_ready() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("alfworld", "textworld"))


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def children() -> set[int]:
    out = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:  # a thread may end while we read
            out |= {int(c) for c in (task / "children").read_text().split()}
        except FileNotFoundError:
            continue
    return {c for c in out if alive(c)}


@pytest.mark.skipif(not _alfworld_ready(), reason="needs the alfworld extra: pip install -e '.[alfworld]'")
def test_alfworld_expert_wins_and_close_leaves_no_worker(tmp_path):
    from spear_lit.envs.alfworld import AlfWorldEnv

    subprocess.run(
        [
            ALF_PY,
            "-m",
            "spear_lit.envs.alfworld.generate",
            "--out",
            str(tmp_path),
            "--num-games",
            "2",
            "--seed",
            "3",
        ],
        check=True,
        capture_output=True,
    )
    before = children()
    agent = EnvAgent(
        functools.partial(AlfWorldEnv, data_path=str(tmp_path), python=ALF_PY),
        AlfWorldPrompt(compact=True),
        name="alfworld",
        max_steps=10,
    )
    rows, answer = expert_answers(agent, 2, seed=0)  # the planner, run in the worker's interpreter
    engine = ScriptedEngine(lambda text: answer[text])
    samples = agent.collect(
        engine, TOK, t=1, seed=0, num_groups=2, group_size=2, max_response_len=200, temperature=1.0, top_p=1.0
    )
    assert len(samples) == len(rows) * 2 and all(s.success and s.score == 10.0 for s in samples)
    workers = {e.worker_pid for e in agent._pools["train"]}
    assert None not in workers and workers <= children() - before
    # a worker killed mid-episode: that episode fails, the others still win, the env serves again later
    victim, seen = agent._pools["train"][0], []

    def kill_then_answer(text):
        seen.append(text)
        if len(seen) == 3:  # the second step of the first environment
            os.kill(victim.worker_pid, signal.SIGKILL)
        return answer[text]

    samples = agent.collect(
        ScriptedEngine(kill_then_answer),
        TOK,
        t=2,
        seed=0,
        num_groups=2,
        group_size=1,
        max_response_len=200,
        temperature=1.0,
        top_p=1.0,
    )
    failed = {s.episode for s in samples if "error" in s.info}
    assert failed == {0} and all(s.success for s in samples if s.episode != 0)
    assert not any(s.success for s in samples if s.episode == 0)
    workers |= {e.worker_pid for e in agent._pools["train"]} - {None}
    agent.close()
    agent.close()  # idempotent
    deadline = time.monotonic() + 5
    while children() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not children() - before and not any(alive(p) for p in workers)
