"""ALFWorld on the package's engine: generated games (format, all six task types, solvable), the planner
expert winning each through AlfWorldEnv and through ALFWorld's own AlfredTWEnv, reward 10·won, invalid
actions, determinism, step limit, and failure containment (hang, crash, raise, dead parent) with no stray
processes."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("alfworld")

from spear_lit.envs import TextEnv  # noqa: E402
from spear_lit.envs.alfworld import AlfWorldEnv, list_games  # noqa: E402
from spear_lit.envs.alfworld import env as env_module  # noqa: E402
from spear_lit.envs.alfworld.env import TASK_TYPES  # noqa: E402
from spear_lit.envs.alfworld.expert import expert_actions  # noqa: E402
from spear_lit.envs.alfworld.generate import generate_games, make_game, mangle  # noqa: E402

PER_TYPE = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 games, two of each task type, under data/train."""
    root = tmp_path_factory.mktemp("alfworld_data")
    dirs = generate_games(root, num_games=PER_TYPE * len(TASK_TYPES), seed=7)
    return root, dirs


@pytest.fixture
def env(data):
    e = AlfWorldEnv(data_path=str(data[0]), split="train")
    yield e
    e.close()


def alive(pid: int) -> bool:
    """Running and not a zombie (an orphan reaped late by a container's PID 1 still shows in /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return [c for c in out if alive(c)]


# --------------------------------------------------------------------------------------------- generation


def test_generated_games_follow_alfworlds_layout(data):
    root, dirs = data
    assert Counter(d.parent.name.split("-")[0] for d in dirs) == {t: PER_TYPE for t in TASK_TYPES}
    for d in dirs:
        assert d.parent.parent == root / "train" and re.fullmatch(r"trial_T\d{8}_\d{6}", d.name)
        traj = json.loads((d / "traj_data.json").read_text())
        game = json.loads((d / "game.tw-pddl").read_text())
        problem = (d / "initial_state.pddl").read_text()
        p = traj["pddl_params"]
        assert (
            d.parent.name
            == f"{traj['task_type']}-{p['object_target']}-None-{p['parent_target'] or p['toggle_target']}-{traj['scene']['scene_num']}"
        )
        assert game["solvable"] is True and game["walkthrough"] and game["pddl_problem"] == problem
        assert "(:domain alfred)" in problem and "UNKNOWN GOAL" not in game["grammar"]
        assert traj["turk_annotations"]["anns"][0]["task_desc"] in game["grammar"]
        # ALFRED ids, several receptacles, distractors beyond the task's objects
        receptacles = re.findall(r"^\s+([^?\s]\S*) - receptacle$", problem, re.M)
        objects = re.findall(r"^\s+([^?\s]\S*) - object$", problem, re.M)
        assert len(receptacles) >= 6 and all("_bar_" in r for r in receptacles)
        assert len([o for o in objects if not o.startswith(p["object_target"] + "_bar_")]) >= 4
        assert all(r.endswith("_bar_SinkBasin") for r in receptacles if r.startswith("Sink_"))
        if traj["task_type"] == "pick_heat_then_place_in_recep":
            assert any(r.startswith("Microwave_bar_") for r in receptacles)
    assert (
        mangle("Apple|+01.25|-00.50|+00.90")
        == "Apple_bar__plus_01_dot_25_bar__minus_00_dot_50_bar__plus_00_dot_90"
    )


def test_generation_is_deterministic_and_the_cli_writes_the_same_games(data, tmp_path):
    root, dirs = data
    again = make_game(tmp_path / "api", index=3, seed=7)
    ref = dirs[3]
    for name in ("traj_data.json", "initial_state.pddl", "game.tw-pddl"):
        assert (again / name).read_text() == (ref / name).read_text()
    out = subprocess.run(
        [sys.executable, "-m", "spear_lit.envs.alfworld.generate", "--out", str(tmp_path / "cli"),
         "--num-games", "2", "--seed", "7", "--split", "valid_seen"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    assert "wrote 2 solvable games" in out
    cli = sorted((tmp_path / "cli" / "valid_seen").glob("*/*/game.tw-pddl"))
    assert [f.read_text() for f in cli] == [(d / "game.tw-pddl").read_text() for d in sorted(dirs[:2])]


def test_list_games_selects_like_alfredtwenv(data, tmp_path):
    root, dirs = data
    games = list_games(str(root), "train")
    assert games == tuple(sorted(games)) and len(games) == len(dirs)
    assert len(list_games(str(root), "train", (1, 6))) == 2 * PER_TYPE
    assert len(list_games(str(root), "train", ("look_at_obj_in_light",))) == PER_TYPE
    # skipped: "Sliced"/"movable" paths and games not marked solvable
    for name in ("pick_and_place_simple-AppleSliced-None-Fridge-1", "movable_x", "unsolvable"):
        d = tmp_path / "train" / name / "trial_T0"
        d.mkdir(parents=True)
        (d / "traj_data.json").write_text(json.dumps({"task_type": "pick_and_place_simple"}))
        game = json.loads((dirs[0] / "game.tw-pddl").read_text())
        (d / "game.tw-pddl").write_text(json.dumps({**game, "solvable": name != "unsolvable"}))
    assert list_games(str(tmp_path), "train") == ()


# ------------------------------------------------------------------------------------------- playing


def test_planner_expert_wins_every_game_through_the_env(data, env):
    assert isinstance(env, TextEnv) and env.num_games == len(data[1])
    wins = 0
    for task_id, game in enumerate(env.games):
        actions = expert_actions(Path(game).parent)
        r = env.reset(task_id)
        assert r.info["game"] == game and not r.done and r.info["task"]
        assert (
            r.observation.startswith("-= Welcome to TextWorld, ALFRED! =-")
            and "Your task is to: " in r.observation
        )
        for i, action in enumerate(actions):
            assert action in r.admissible_actions
            r = env.step(action)
            assert r.valid and r.reward == (10.0 if i == len(actions) - 1 else 0.0)
        assert r.done and r.won and r.reward == 10.0
        wins += r.won
    assert wins == env.num_games  # 100 % on the generated set


def test_alfworlds_own_alfredtwenv_plays_the_generated_games(data):
    from alfworld.agents.environment import get_environment

    config = {
        "env": {"goal_desc_human_anns_prob": 0, "task_types": [1, 2, 3, 4, 5, 6], "domain_randomization": False,
                "expert_type": "planner"},
        "dataset": {"data_path": str(data[0] / "train"), "num_train_games": -1},
        "general": {"training_method": "dqn"},
        "rl": {"training": {"max_nb_steps_per_episode": 50}},
    }  # fmt: skip
    alfred = get_environment("AlfredTWEnv")(config, train_eval="train")
    assert alfred.num_games == len(data[1])
    env = alfred.init_env(batch_size=1)
    try:
        for _ in range(len(TASK_TYPES)):
            _, infos = env.reset()
            for action in json.loads(Path(infos["extra.gamefile"][0]).read_text())["walkthrough"]:
                _, _, dones, infos = env.step([action])
            assert infos["won"] == [True] and dones[0]
    finally:
        env.close()


def test_invalid_action_changes_nothing(env):
    r0 = env.reset(4)
    look = env.step("look")
    bad = env.step("teleport to the moon")
    assert (bad.valid, bad.done, bad.reward, bad.observation) == (False, False, 0.0, "Nothing happens.")
    assert bad.admissible_actions == look.admissible_actions
    assert env.step("  look ").observation == look.observation  # admissible after stripping, as in TextWorld
    actions = expert_actions(Path(r0.info["game"]).parent)
    for action in actions:
        r = env.step(action)
    assert r.won and r.info["steps"] == 3 + len(actions)


def test_task_id_selects_the_game_deterministically(data, env):
    other = AlfWorldEnv(data_path=str(data[0]))
    try:
        a, b = env.reset(5), other.reset(5)
        assert (a.observation, a.admissible_actions, a.info["game"]) == (
            b.observation,
            b.admissible_actions,
            b.info["game"],
        )
        assert env.reset(5 + env.num_games).info["game"] == a.info["game"]
        assert [env.reset(t).info["game"] for t in (0, 7, 11)] == [env.games[t] for t in (0, 7, 11)]
    finally:
        other.close()


def test_episode_ends_after_max_steps(data):
    with AlfWorldEnv(data_path=str(data[0]), max_steps=3) as env:
        env.reset(0)
        results = [env.step(a) for a in ("look", "dance", "inventory")]
        assert [r.done for r in results] == [False, False, True]
        assert not results[-1].won and results[-1].info["truncated"] and results[-1].reward == 0
        with pytest.raises(RuntimeError):
            env.step("look")


# --------------------------------------------------------------------------------------------- failures

FAKE_WORKER = """
import os, sys, time
sys.path.insert(0, {root!r})
from spear_lit.envs.alfworld import engine

real = engine.make_engine

class Faulty:
    # the real engine, except for three commands
    def __init__(self):
        self.env = real()
    def load(self, game):
        self.env.load(game)
    def reset(self):
        return self.env.reset()
    def step(self, command):
        if command == "look":
            time.sleep(600)  # hang
        if command == "inventory":
            os._exit(3)  # die
        if command == "help":
            raise RuntimeError("engine bug")
        return self.env.step(command)

engine.make_engine = Faulty
from multiprocessing.connection import Connection
engine.serve(Connection(int(sys.argv[1])), int(sys.argv[2]))
"""


@pytest.fixture
def faulty_env(data, tmp_path, monkeypatch):
    script = tmp_path / "faulty_worker.py"
    script.write_text(FAKE_WORKER.format(root=str(Path(__file__).resolve().parents[2])))
    monkeypatch.setattr(env_module, "WORKER", script)
    e = AlfWorldEnv(data_path=str(data[0]), step_timeout_s=2.0)
    yield e
    e.close()


def test_a_hanging_step_times_out_and_training_goes_on(faulty_env):
    env = faulty_env
    env.reset(0)
    pid = env.worker_pid
    start = time.monotonic()
    r = env.step("look")
    # the step hangs 600 s and times out after 2 s: 300 s is far from both, so load alone cannot cross it
    assert time.monotonic() - start < 300
    assert r.done and not r.won and r.reward == 0 and "time-out" in r.info["error"]
    assert not alive(pid) and env.worker_pid is None
    r = env.reset(1)  # a fresh worker
    assert not r.done and "error" not in r.info and env.worker_pid != pid


def test_a_crashing_or_raising_engine_fails_only_its_episode(faulty_env):
    env = faulty_env
    env.reset(0)
    r = env.step("inventory")
    assert r.done and not r.won and "exited with code 3" in r.info["error"]
    env.reset(0)
    pid = env.worker_pid
    r = env.step("help")
    assert r.done and "RuntimeError: engine bug" in r.info["error"]
    assert env.worker_pid == pid  # the worker survives an exception
    assert not env.reset(2).done


def test_close_leaves_no_process(data):
    before = set(children(os.getpid()))
    env = AlfWorldEnv(data_path=str(data[0]))
    env.reset(0)
    pid = env.worker_pid
    assert alive(pid) and pid in children(os.getpid())
    env.close()
    env.close()  # idempotent
    assert not alive(pid) and set(children(os.getpid())) == before


def test_worker_exits_when_its_parent_is_killed(data):
    parent = textwrap.dedent(f"""
        import os, signal
        from spear_lit.envs.alfworld import AlfWorldEnv
        env = AlfWorldEnv(data_path={str(data[0])!r})
        env.reset(0)
        print(env.worker_pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)
