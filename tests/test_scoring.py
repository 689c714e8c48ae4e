"""The data module's scoring, function by function (datamodules/scoring.py) and the response filters of
SPEAR_SPEC §8 (datamodules/variants.py), with hand-worked values."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from datamodules import scoring, variants
from spear_lit.batch import Sample

FILTERS = {
    "overlong": variants.overlong,
    "incomplete": variants.incomplete,
    "repetitive": variants.repetitive,
    "unreadable": variants.unreadable,
}


def _sample(
    group=0,
    episode=0,
    score=1.0,
    *,
    response=(5, 6),
    text="ok",
    incomplete=False,
    calls=0,
    success=None,
    anchor=None,
    step_return=0.0,
    episode_score=None,
):
    return Sample(
        prompt_ids=[1, 2],
        response_ids=list(response),
        response_mask=[1] * len(response),
        group=group,
        episode=episode,
        score=score,
        success=score > 0 if success is None else success,
        num_tool_calls=calls,
        incomplete=incomplete,
        text=text,
        anchor=anchor,
        step_return=step_return,
        episode_score=episode_score,
    )


def test_each_filter_flags_exactly_its_rows():
    samples = [
        _sample(response=[7] * 4),  # overlong at L = 4 (a truncated reply reaches L exactly)
        _sample(response=[7] * 3, incomplete=True),  # incomplete
        _sample(response=[3] * 29),  # one 20-gram 10 times (29 = 20 + 9): repetitive
        _sample(response=[3] * 28),  # 9 times: not repetitive (but overlong)
        _sample(text="a \ufffd b"),
    ]  # unreadable
    flags = scoring.filter_flags(samples, FILTERS, max_response_len=4)
    assert {k: v.tolist() for k, v in flags.items()} == {
        "overlong": [True, False, True, True, False],
        "incomplete": [False, True, False, False, False],
        "repetitive": [False, False, True, False, False],
        "unreadable": [False, False, False, False, True],
    }
    assert variants.repetitive(samples, 4, n=2, threshold=3).tolist() == [True, False, True, True, False]


def test_rewards_add_the_bonus_to_the_row_and_to_the_trajectory():
    # a step row with its own -0.1 invalid-action penalty (score 9.9) in a won episode (episode_score 10)
    samples = [_sample(score=9.9, episode_score=10.0, calls=3), _sample(score=-1.0, calls=0)]
    r, traj, bonus = scoring.rewards(samples, variants.standard_bonus, 0.5)
    # bonus = min(0.1 * calls, 1) * 0.5: [0.15, 0]
    assert bonus.tolist() == pytest.approx([0.15, 0.0])
    assert r.tolist() == pytest.approx([10.05, -1.0]) and traj.tolist() == pytest.approx([10.15, -1.0])
    r, traj, bonus = scoring.rewards(samples, None, 0.5)
    assert bonus.tolist() == [0.0, 0.0] and r.tolist() == pytest.approx([9.9, -1.0])


def test_group_and_anchor_ids():
    samples = [
        _sample(group=0, anchor="A"),
        _sample(group=0, anchor="B"),
        _sample(group=1, anchor="A"),
        _sample(group=0, anchor="A"),
        _sample(group=1),
    ]
    assert scoring.group_ids(samples, t=3, prompts_per_iteration=4).tolist() == [
        12,
        12,
        13,
        12,
        13,
    ]  # t*B + group
    # (0,A)=0, (0,B)=1, (1,A)=2: equal text in another group is another step group; no anchor: -1 - index
    assert scoring.anchor_ids(samples).tolist() == [0, 1, 2, 0, -5]


def test_a_filtered_row_keeps_its_tokens_with_a_zero_loss_mask():
    samples = [_sample(response=[5, 6, 7]), _sample(response=[5, 6, 7, 8], score=-1.0)]
    rows = scoring.score_rows(
        samples, 1, prompts_per_iteration=2, max_response_len=4, filters={"overlong": variants.overlong}
    )
    assert rows.flags["overlong"].tolist() == [False, True]
    assert [d["response_mask"] for d in rows.dicts] == [[1, 1, 1], [0, 0, 0, 0]]
    assert [d["response_ids"] for d in rows.dicts] == [[5, 6, 7], [5, 6, 7, 8]]
    assert [d["reward"] for d in rows.dicts] == [1.0, -1.0] and [d["group_id"] for d in rows.dicts] == [2, 2]
    assert rows.traj_rewards.tolist() == [1.0, -1.0]  # group statistics still see the filtered row
    unfiltered = scoring.score_rows(samples, 1, prompts_per_iteration=2, max_response_len=4, filters={})
    assert unfiltered.flags == {} and [d["response_mask"] for d in unfiltered.dicts] == [
        [1, 1, 1],
        [1, 1, 1, 1],
    ]


def test_a_filter_of_the_wrong_shape_is_named():
    with pytest.raises(ValueError, match=r"data\.filters\.half returned .* bool tensor \[N\]"):
        scoring.filter_flags([_sample(), _sample()], {"half": lambda s, n: torch.tensor([True])}, 4)


@pytest.mark.parametrize(
    "entry, words",
    [
        (True, ["data.filters.x=True", "_target_", "+filter@data.filters.overlong=overlong"]),
        (variants.standard_bonus, ["data.filters.x", "weight", "called as (samples, max_response_len)"]),
    ],
)
def test_an_entry_that_is_not_a_filter_is_refused_by_name(entry, words):
    with pytest.raises(ValueError) as err:
        scoring.check_filters({"x": entry}, 8)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_the_filter_configs_build_the_filters():
    from helpers import REPO

    built = {name: instantiate(OmegaConf.load(REPO / "conf" / "filter" / f"{name}.yaml")) for name in FILTERS}
    assert scoring.check_filters(built, 4).keys() == FILTERS.keys()
    samples = [_sample(response=[3] * 29, text="\ufffd", incomplete=True), _sample()]
    got = scoring.filter_flags(samples, built, 4)
    assert {k: v.tolist() for k, v in got.items()} == {k: [True, False] for k in FILTERS}
