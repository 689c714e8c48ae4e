"""WebShopEnv: catalogue, BM25 search, pages and paging, invalid actions, step limit, determinism, oracle."""

import math
import re
import time
from collections import Counter

import pytest

from spear_lit.envs import TextEnv
from spear_lit.envs.webshop import WebShopEnv, generate_catalogue, get_shop, make_goals, parse_command
from spear_lit.envs.webshop.catalogue import PRODUCT_TYPES


@pytest.fixture(scope="module")
def shop():
    return get_shop(300, 0)


def test_catalogue_size_and_shape(shop):
    assert len(shop.products) == 300
    assert Counter(p.query for p in shop.products) == {t.query: 30 for t in PRODUCT_TYPES}  # 10 types in turn
    assert set(p.category for p in shop.products) == {
        "fashion",
        "electronics",
        "grocery",
        "beauty",
        "home",
        "sports",
    }
    assert len({p.asin for p in shop.products}) == 300
    assert all(re.fullmatch(r"B0[A-Z0-9]{8}", p.asin) for p in shop.products)
    for p in shop.products:
        t = next(t for t in PRODUCT_TYPES if t.query == p.query)
        assert t.price[0] <= p.price <= t.price[1] and 3 <= len(p.attributes) <= 5
        values = [v for _, vs in p.options for v in vs]
        assert len(values) == len(set(values)) and not set(values) & {
            "buy now",
            "description",
            "features",
            "< prev",
        }
    # one goal per (product, option combination), like WebShop's synthetic goals
    assert len(shop.goals) == sum(math.prod(len(vs) for _, vs in p.options) for p in shop.products)


def test_generation_is_deterministic_in_the_seed():
    a, b = generate_catalogue(60, seed=3), generate_catalogue(60, seed=3)
    assert a == b and make_goals(a, 3) == make_goals(b, 3)
    assert generate_catalogue(60, seed=4) != a


def test_parse_command():
    assert parse_command(" Click[ Buy  Now ] ") == ("click", "buy now")
    assert parse_command("search[Running Shoes black]") == ("search", "Running Shoes black")
    assert (
        parse_command("buy now") is None
        and parse_command("click buy now") is None
        and parse_command("") is None
    )


def test_bm25_exact_title_in_top_results(shop):
    # Bag-of-words: products whose titles permute the same words score alike, so "top results" = top 5
    # (measured: worst rank 5 over the 300 titles of seed 0).
    for p in shop.products:
        assert p.asin in shop.search(p.title)[:5], p.title
    hits = shop.search("Korvo running shoes")
    assert all(shop.product(a).query == "running shoes" for a in hits) and len(hits) == 30
    assert shop.product(hits[0]).title.startswith("Korvo")
    assert shop.search("zzz qqq") == () and shop.search("") == ()
    t = time.process_time()
    shop.search("shoes " * 100_000)  # never hangs: the query is cut to 64 tokens
    # CPU seconds of this process, which load elsewhere does not inflate: ~0.04 cut, ~4 uncut (measured)
    assert time.process_time() - t < 1.0


def test_pages_and_paging():
    env = WebShopEnv()
    r = env.reset(0)
    assert r.observation.startswith("WebShop [SEP] Instruction: [SEP] ") and r.admissible_actions == [
        "search[<query>]"
    ]
    # three types of 30 products each match → 90 hits, cut to WebShop's 50 → 5 pages of 10
    r = env.step("search[running shoes t-shirt headphones]")
    assert r.valid and "Page 1 (Total results: 50)" in r.observation and "< Prev" not in r.observation
    page1, items1 = r.observation, [a for a in r.admissible_actions if re.fullmatch(r"click\[b0\w{8}\]", a)]
    assert len(items1) == 10 and r.admissible_actions[:2] == ["click[back to search]", "click[next >]"]
    r = env.step("click[next >]")
    items2 = [a for a in r.admissible_actions if re.fullmatch(r"click\[b0\w{8}\]", a)]
    assert "Page 2 (Total results: 50)" in r.observation and "click[< prev]" in r.admissible_actions
    assert len(items2) == 10 and not set(items1) & set(items2)
    assert env.step("click[< prev]").observation == page1
    for _ in range(4):
        r = env.step("click[next >]")
    assert "Page 5" in r.observation and "click[next >]" not in r.admissible_actions
    # item page, its description, back to the item and the results page
    items5 = [a for a in r.admissible_actions if re.fullmatch(r"click\[b0\w{8}\]", a)]
    assert len(items5) == 10 and env.step(items2[0]).valid is False  # only this page's items
    item = env.step(items5[0].replace("b0", "B0"))  # clicks are case-insensitive
    assert item.valid and item.admissible_actions[-3:] == [
        "click[description]",
        "click[features]",
        "click[buy now]",
    ]
    assert "Price: $" in item.observation and item.observation.endswith("Buy Now")
    desc = env.step("click[description]")
    assert desc.admissible_actions == ["click[back to search]", "click[< prev]"]
    assert env.step("click[< prev]").observation == item.observation
    assert "Page 5" in env.step("click[< prev]").observation
    assert env.step("click[back to search]").admissible_actions == ["search[<query>]"]


@pytest.mark.parametrize(
    "setup, bad",
    [
        (
            [],
            ["click[buy now]", "click[next >]", "hello", "search[]", "search[ !! ]", "", "click[b0aaaaaaaa]"],
        ),
        (
            ["search[desk lamp]"],
            ["search[shoes]", "click[b0zzzzzzzz]", "click[description]", "click[< prev]"],
        ),
        (
            ["search[desk lamp]", "FIRST_ITEM"],
            ["click[next >]", "click[red]", "search[lamp]", "click[page 2]"],
        ),
    ],
)
def test_invalid_actions_change_nothing(setup, bad):
    env = WebShopEnv()
    r = env.reset(5)
    for a in setup:
        r = env.step(
            next(x for x in r.admissible_actions if re.fullmatch(r"click\[b0\w{8}\]", x))
            if a == "FIRST_ITEM"
            else a
        )
    for a in bad:
        r2 = env.step(a)
        assert not r2.valid and not r2.done and r2.reward == 0.0, a
        assert r2.observation == r.observation and r2.admissible_actions == r.admissible_actions, a
    # a valid action still works afterwards (the session state was not touched)
    assert env.step(r.admissible_actions[-1].replace("<query>", "lamp")).valid


def test_step_limit_ends_the_episode():
    env = WebShopEnv(max_steps=15)
    env.reset(1)
    assert env.step("search[desk lamp]").valid
    for _ in range(13):  # invalid actions count as steps too
        assert not env.step("click[nothing]").done
    r = env.step("click[nothing]")
    assert r.done and r.reward == 0.0 and not r.won and r.info["truncated"] and r.admissible_actions == []
    after = env.step("click[back to search]")
    assert after.done and not after.valid and after.reward == 0.0
    # buying on the last allowed step still pays
    env.reset(3)
    actions = env.oracle_actions()
    env = WebShopEnv(max_steps=len(actions))
    env.reset(3)
    for a in actions:
        r = env.step(a)
    assert r.done and r.won and r.reward == 10.0 and "truncated" not in r.info


def test_wrong_option_scores_hand_formula():
    env = WebShopEnv(reward_scale=10.0)
    env.reset(7)
    goal, actions = env.session.goal, env.oracle_actions()
    asin = next(a[6:-1] for a in actions if re.fullmatch(r"click\[b0\w{8}\]", a))
    group, values = env.shop.product(asin).options[0]
    wrong = next(v for v in values if v != dict(goal.options)[group])
    for a in actions:
        r = env.step(f"click[{wrong}]" if a == f"click[{dict(goal.options)[group]}]" else a)
    # all attributes, all options but one, price → (|att| + |opt| − 1 + 1) / (|att| + |opt| + 1), × 10
    n_att, n_opt = len(goal.attributes), len(goal.options)
    assert r.done and not r.won and r.reward == pytest.approx(10 * (n_att + n_opt) / (n_att + n_opt + 1))
    assert r.info["asin"].lower() == asin and r.info["options"][group] == wrong
    assert "Your score (min 0.0, max 1.0)" in r.observation


def test_determinism_by_task_id_and_splits():
    a, b = WebShopEnv(), WebShopEnv()
    assert a.reset(12).observation != a.reset(11).observation == b.reset(11).observation
    assert [a.step(x).observation for x in a.oracle_actions()] == [
        b.step(x).observation for x in b.oracle_actions()
    ]
    train, val = WebShopEnv(split="train"), WebShopEnv(split="val", val_goals=500)
    assert val.num_tasks == 500 and train.num_tasks == len(train.shop.goals) - 500
    assert not set(train.goals) & set(val.goals)
    assert val.reset(val.num_tasks + 2).observation == val.reset(2).observation  # ids wrap around
    with pytest.raises(ValueError):
        WebShopEnv(split="test")


def test_oracle_reaches_full_score():
    wins, n = 0, 0
    for split, ids in (("train", range(200)), ("val", range(100))):
        env = WebShopEnv(split=split)
        for task_id in ids:
            env.reset(task_id)
            for a in env.oracle_actions():
                r = env.step(a)
                assert r.valid, a
            assert r.done
            wins, n = wins + r.won, n + 1
            assert r.won == (r.reward == 10.0)
    assert wins / n >= 0.95  # measured: 300/300


def test_is_a_text_env_and_hydra_instantiable():
    from hydra.utils import instantiate

    env = instantiate({"_target_": "spear_lit.envs.webshop.WebShopEnv", "num_products": 100, "max_steps": 15})
    assert isinstance(env, TextEnv) and len(env.shop.products) == 100
    assert "Instruction:" in env.reset(0).observation
    env.close()
    with pytest.raises(RuntimeError):
        env.step("search[x]")


def test_asin_prefix_changes_only_the_ids(shop):
    short = get_shop(300, 0, "")
    assert [p.asin for p in short.products] == [p.asin[2:] for p in shop.products]
    assert [(p.title, p.price, p.options) for p in short.products] == [
        (p.title, p.price, p.options) for p in shop.products
    ]
    assert [g.instruction for g in short.goals] == [g.instruction for g in shop.goals]
    a, b = WebShopEnv(split="val", asin_prefix=""), WebShopEnv(split="val")
    a.reset(3), b.reset(3)
    assert [x.replace("click[b0", "click[") for x in b.oracle_actions()] == a.oracle_actions()
    results = a.step(a.oracle_actions()[0])
    assert all(not c.startswith("click[b0") for c in results.admissible_actions[2:])
    with pytest.raises(ValueError, match="asin_prefix"):
        WebShopEnv(asin_prefix="b0 ")
