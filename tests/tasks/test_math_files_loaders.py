"""Loaders for AIME 2024 / AIME 2025 / DAPO-Math-17k layouts on small files written here."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spear_lit.tasks import FileMathTask, load_aime2024, load_aime2025, load_dapo_math, load_math_file
from spear_lit.tasks.prompts import RETOOL_ANSWER_FORMAT, RETOOL_SYSTEM_PROMPT

AIME24 = [
    {"ID": "2024-I-1", "Problem": "Find x if x+1=205.", "Solution": "...", "Answer": 204},
    {"ID": "2024-I-2", "Problem": "Find 5*5.", "Solution": "...", "Answer": 25},
]
AIME25 = [
    {"id": 0, "problem": "Find the sum 60+10.", "answer": "70"},
    {"id": 1, "problem": "Compute 588/1.", "answer": "588"},
]
DAPO_TEXT = "Solve the following math problem step by step.\n\nWhat is 2+2?"
DAPO = [
    {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": DAPO_TEXT}],
        "ability": "MATH",
        "reward_model": {"ground_truth": "4", "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": "abc"},
    }
]


def write(tmp_path, name, rows):
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_three_layouts_explicit_and_auto(tmp_path, suffix):
    a24 = write(tmp_path, "aime24" + suffix, AIME24)
    a25 = write(tmp_path, "aime25" + suffix, AIME25)
    dapo = write(tmp_path, "dapo" + suffix, DAPO)
    p24, p25, pd = load_aime2024(a24), load_aime2025(a25), load_dapo_math(dapo)
    assert [(p.prompt, p.answer) for p in p24] == [("Find x if x+1=205.", "204"), ("Find 5*5.", "25")]
    assert [(p.prompt, p.answer) for p in p25] == [("Find the sum 60+10.", "70"), ("Compute 588/1.", "588")]
    assert [(p.prompt, p.answer) for p in pd] == [(DAPO_TEXT, "4")]
    assert p24[1].uid == "aime24-1" and p24[1].meta == {"source": "aime24", "index": 1}
    assert load_math_file(a24) == p24 and load_math_file(a25) == p25 and load_math_file(dapo) == pd


def test_integral_float_answers_lose_the_point_zero(tmp_path):
    rows = [{"Problem": "p", "Answer": 204.0}, {"Problem": "q", "Answer": 0.5}]
    assert [p.answer for p in load_aime2024(write(tmp_path, "f.parquet", rows))] == ["204", "0.5"]


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.parquet"
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_aime2024(missing)


def test_missing_column_names_path_column_and_found_columns(tmp_path):
    path = write(tmp_path, "bad.parquet", [{"Problem": "p", "Solution": "s"}])
    with pytest.raises(ValueError, match=r"bad\.parquet.*'Answer'.*columns found: \['Problem', 'Solution'\]"):
        load_aime2024(path)
    with pytest.raises(ValueError, match=r"bad\.parquet.*no known layout.*\['Problem', 'Solution'\]"):
        load_math_file(path)
    jl = write(tmp_path, "bad.jsonl", [{"problem": "p", "answer": "1"}, {"problem": "q"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: lacks required column 'answer'"):
        load_aime2025(jl)


def test_dapo_row_without_user_message_or_ground_truth(tmp_path):
    no_user = [{"prompt": [{"role": "system", "content": "hi"}], "reward_model": {"ground_truth": "1"}}]
    with pytest.raises(ValueError, match="no user message"):
        load_dapo_math(write(tmp_path, "d1.jsonl", no_user))
    no_gt = [{"prompt": [{"role": "user", "content": "q"}], "reward_model": {"style": "rule"}}]
    with pytest.raises(ValueError, match="ground_truth"):
        load_dapo_math(write(tmp_path, "d2.jsonl", no_gt))


def test_unsupported_suffix_and_layout(tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text("Problem,Answer\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_math_file(csv)
    with pytest.raises(ValueError, match="unknown layout"):
        load_math_file(write(tmp_path, "a.jsonl", AIME25), layout="gsm8k")


def test_file_math_task(tmp_path):
    dapo_rows = [{**DAPO[0], "reward_model": {"ground_truth": str(i)}} for i in range(5)]
    task = FileMathTask(
        train_files=[str(write(tmp_path, "dapo.parquet", dapo_rows))],
        val_files=[str(write(tmp_path, "a24.parquet", AIME24)), str(write(tmp_path, "a25.jsonl", AIME25))],
        name="aime",
    )
    assert task.system_prompt == RETOOL_SYSTEM_PROMPT
    val = task.val_problems()
    assert [p.answer for p in val] == ["204", "25", "70", "588"]
    assert val[0].prompt == "Find x if x+1=205." + RETOOL_ANSWER_FORMAT
    # 5 problems: a draw of 3 has no repeats; a draw of 12 covers every problem at least twice
    three = task.train_problems(3, random.Random(0))
    assert len({p.uid for p in three}) == 3
    twelve = task.train_problems(12, random.Random(0))
    assert sorted({p.answer for p in twelve}) == ["0", "1", "2", "3", "4"]
    assert task.train_problems(12, random.Random(0)) == twelve
    assert task.score("so \\boxed{70}", val[2]) == (1.0, "70")
    limited = FileMathTask(
        val_files=[str(tmp_path / "a24.parquet")], max_problems=1, system_prompt=None, prompt_suffix=""
    )
    assert [p.prompt for p in limited.val_problems()] == ["Find x if x+1=205."]
    assert limited.system_prompt is None
    with pytest.raises(ValueError, match="no training problems"):
        limited.train_problems(1, random.Random(0))
