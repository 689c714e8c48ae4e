"""bench/efficacy.py in its smoke mode: real train.py runs (2 experiments x 2 seeds x 2 iterations, tiny
sizes), the report's tables and numbers, the plot, nothing redone on a second call, resume to more iterations."""

from __future__ import annotations

import csv
import statistics
import sys

from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
import efficacy  # noqa: E402


def _table(text: str, task: str) -> dict[str, list[str]]:
    """``{experiment: cells}`` of the task's table in report.md (header checked against COLUMNS)."""
    lines = text.split(f"## task `{task}`", 1)[1].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["experiment", "seeds", *efficacy.COLUMNS]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def _success(run_dir) -> list[float]:
    return [float(r["rollout/success_rate"]) for r in csv.DictReader(open(run_dir / "metrics.csv"))]


def test_smoke_study_reports_tables_and_curves_and_redoes_nothing(tmp_path, capsys):
    out = tmp_path / "study"
    assert efficacy.main(["--smoke", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    arith, twostep = _table(text, "arith"), _table(text, "twostep")  # one table per task
    assert list(arith) == ["tiny_grpo"] and list(twostep) == ["explore_spear"]
    for cells in (*arith.values(), *twostep.values()):
        assert cells[0] == "0,1" and len(cells) == 1 + len(efficacy.COLUMNS)
        values = dict(zip(efficacy.COLUMNS, cells[1:]))
        assert values["iterations"] == "2 ± 0"
        for c in efficacy.COLUMNS[:5]:  # success rates: "m ± s" within [0, 1]
            m, s = (float(x) for x in values[c].split(" ± "))
            assert 0.0 <= m <= 1.0 and s >= 0.0, (c, values[c])
        assert float(values["final entropy"].split(" ± ")[0]) > 0
    # the AUC cell is the seed mean/std of each run's mean training success
    aucs = [statistics.fmean(_success(out / "tiny_grpo" / f"seed{s}")) for s in (0, 1)]
    assert (
        arith["tiny_grpo"][1 + efficacy.COLUMNS.index("train success AUC")]
        == f"{statistics.fmean(aucs):.3f} ± {statistics.stdev(aucs):.3f}"
    )
    assert "Held-out success of the initial policy" in text
    assert (out / "curves.png").stat().st_size > 20_000

    # a second invocation finds every run finished and trains nothing
    runs = [out / e / f"seed{s}" for e in ("tiny_grpo", "explore_spear") for s in (0, 1)]
    before = {d: ((d / "metrics.csv").read_bytes(), (d / "train.log").read_bytes()) for d in runs}
    capsys.readouterr()
    assert efficacy.main(["--smoke", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 4
    assert {d: ((d / "metrics.csv").read_bytes(), (d / "train.log").read_bytes()) for d in runs} == before

    # more iterations: the finished run continues from its last checkpoint (the first rows stay as they were)
    first = _success(runs[0])
    assert (
        efficacy.main(
            ["--smoke", "--out", str(out), "--experiments", "tiny_grpo", "--seeds", "0", "--iterations", "3"]
        )
        == 0
    )
    rows = list(csv.DictReader(open(runs[0] / "metrics.csv")))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3]
    assert _success(runs[0])[:2] == first
    assert "ckpt_path=auto: resuming from" in (runs[0] / "train.log").read_text()
