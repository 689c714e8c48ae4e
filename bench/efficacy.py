"""The efficacy study: every experiment x seed as a ``train.py`` run, then a report over seeds.

    python bench/efficacy.py --experiments tiny_grpo tiny_drbot tiny_spear --seeds 0 1 2 --iterations 60 --out runs/efficacy
    python bench/efficacy.py --smoke --out /tmp/eff          # 2 experiments x 2 seeds x 2 iterations, tiny sizes
    python bench/efficacy.py --cold-start --experiments explore_spear --out /tmp/eff   # initial policy only
    make efficacy                                            # the study's defaults (6 experiments x 3 seeds)

Each run is ``python train.py +experiment=E seed=S iterations=N run_dir=OUT/E/seedS ckpt_path=auto`` in a
subprocess (its output in ``OUT/E/seedS/train.log``). Resumable: a finished run (``policy_hf/`` and a
``metrics.csv`` with iterations 1..N) is not redone; an interrupted one continues from its ``last.ckpt``
(refreshed every iteration). Then ``OUT/report.md`` gets one table per task (mean ± std over seeds) and
``OUT/curves.png`` the curves (mean line, min-max band over seeds, one colour per experiment).

Held-out success is the runs' final validation (``val/<task>/accuracy``: greedy, ``..._sampled``: T = 1);
"start" is the validation of the initial policy (iteration 0, read from the run's closing summary).
Nothing here is asserted; tests/test_efficacy.py checks the smoke mode.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDY = ["tiny_grpo", "tiny_drbot", "tiny_spear", "explore_grpo", "explore_drbot", "explore_spear"]
SMOKE_EXPERIMENTS = ["tiny_grpo", "explore_spear"]
# --smoke: a few prompts, short replies and 4 validation problems, so that a run takes seconds
SMOKE_OVERRIDES = [
    "data.prompts_per_iteration=2",
    "data.group_size=4",
    "data.mini_batch_rows=8",
    "data.micro_batch_rows=8",
    "data.val_max_problems=4",
    "spear.buffer_size=2",
    "tool.num_workers=1",
    "trainer.logger=null",
]
COLUMNS = [
    "held-out greedy",
    "held-out sampled",
    "train success first 1/5",
    "train success last 1/5",
    "train success AUC",
    "final entropy",
    "wall time (s)",
    "iterations",
]
CURVES = [
    ("val_greedy", "held-out success (greedy)"),
    ("val_sampled", "held-out success (sampled)"),
    ("rollout/success_rate", "training success (T=1)"),
    ("policy/entropy", "entropy (pre-update)"),
    ("rollout/response_len_mean", "response length (tokens)"),
]
_START = re.compile(r"^\s*(val/\S+)\s+(\S+) -> (\S+)\s*$", re.M)  # IterationReport's summary line


# ------------------------------------------------------------------------------------------ running
def run_dir(out: Path, experiment: str, seed: int) -> Path:
    return out / experiment / f"seed{seed}"


def read_metrics(path: Path) -> list[dict[str, float]]:
    """Rows of a run's ``metrics.csv`` as floats (an empty cell is NaN); ``[]`` when absent."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [
            {k: float(v) if v not in ("", None) else math.nan for k, v in r.items()}
            for r in csv.DictReader(f)
        ]


def is_finished(d: Path, iterations: int) -> bool:
    """A finished run: its exported policy and a metrics row for every iteration 1..``iterations``."""
    done = {int(r["iteration"]) for r in read_metrics(d / "metrics.csv")}
    return (d / "policy_hf").is_dir() and set(range(1, iterations + 1)) <= done


def train_command(
    experiment: str, seed: int, iterations: int, d: Path, overrides: Sequence[str]
) -> list[str]:
    return [
        sys.executable,
        str(REPO / "train.py"),
        f"+experiment={experiment}",
        f"seed={seed}",
        f"iterations={iterations}",
        f"run_dir={d}",
        "ckpt_path=auto",
        f"hydra.run.dir={d}/hydra",
        *overrides,
    ]


def launch(experiment: str, seed: int, iterations: int, d: Path, overrides: Sequence[str]) -> int:
    """Run (or continue) one training run; append its output to ``d/train.log`` and its wall time to
    ``d/wall_s.json``. Returns the exit code."""
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # FACTS.md: 2 spinning OpenMP threads run 5-10x slower under load
    cmd = train_command(experiment, seed, iterations, d, overrides)
    start = time.perf_counter()
    with open(d / "train.log", "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = d / "wall_s.json"
    spent = json.loads(wall.read_text()) if wall.exists() else []
    wall.write_text(json.dumps([*spent, time.perf_counter() - start]))
    return rc


# ------------------------------------------------------------------------------------------ summary
def task_of(rows: list[dict]) -> str:
    """The task name from a run's validation column ``val/<task>/accuracy`` (``?`` if it has none)."""
    names = [k.split("/")[1] for k in (rows[0] if rows else {}) if re.fullmatch(r"val/[^/]+/accuracy", k)]
    return names[0] if names else "?"


def _last(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if not math.isnan(r.get(key, math.nan))]
    return vals[-1] if vals else math.nan


def _mean(vals) -> float:
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def summarize(d: Path) -> dict:
    """One run's numbers for the report (NaN where unmeasured) and its curves.

    * ``first``/``last``: mean training success over the first/last fifth of the iterations (at least one);
    * ``auc``: area under the training-success curve divided by its length (the mean over iterations);
    * ``wall``: seconds of all invocations of the run (``wall_s.json``), else the sum of ``perf/iteration_s``.
    """
    rows = read_metrics(d / "metrics.csv")
    task = task_of(rows)
    greedy, sampled = f"val/{task}/accuracy", f"val/{task}/accuracy_sampled"
    succ = [r.get("rollout/success_rate", math.nan) for r in rows]
    k = max(1, round(len(rows) / 5))
    wall = d / "wall_s.json"
    start = {}
    log = d / "train.log"
    if log.exists():  # the closing summary of the last invocation: "val/<task>/accuracy  <start> -> <end>"
        for key, s, _ in _START.findall(log.read_text(errors="replace")):
            if s != "nan":  # a resumed invocation has no iteration-0 validation: keep the first one's
                start[key] = float(s)
    return {
        "task": task,
        "held-out greedy": _last(rows, greedy),
        "held-out sampled": _last(rows, sampled),
        "start greedy": start.get(greedy, math.nan),
        "start sampled": start.get(sampled, math.nan),
        "train success first 1/5": _mean(succ[:k]),
        "train success last 1/5": _mean(succ[-k:]),
        "train success AUC": _mean(succ),
        "final entropy": _last(rows, "policy/entropy"),
        "wall time (s)": sum(json.loads(wall.read_text()))
        if wall.exists()
        else sum(r.get("perf/iteration_s", 0.0) for r in rows),
        "iterations": float(len(rows)),
        **validation_setup(d),
        "curves": {
            "iteration": [r["iteration"] for r in rows],
            **{key: [r.get(key, math.nan) for r in rows] for key, _ in CURVES[2:]},
            "val_greedy": [r.get(greedy, math.nan) for r in rows],
            "val_sampled": [r.get(sampled, math.nan) for r in rows],
        },
    }


def validation_setup(d: Path) -> dict:
    """The run's held-out set size and sampling temperature, from its composed config (NaN if absent)."""
    path = d / "hydra" / ".hydra" / "config.yaml"
    if not path.exists():
        return {"val problems": math.nan, "val temperature": math.nan}
    import yaml

    data = yaml.safe_load(path.read_text()).get("data", {})
    return {
        "val problems": float(data.get("val_max_problems") or math.nan),
        "val temperature": float(data.get("val_temperature", math.nan)),
    }


def mean_std(vals: Sequence[float], digits: int = 3) -> str:
    """``"m ± s"`` over seeds (sample std; ``"m"`` for one value; ``"–"`` for none)."""
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return "–"
    m = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def report(results: dict[str, dict[int, dict]], *, iterations: int, command: str) -> str:
    """``report.md``: a table per task (experiments in the given order), mean ± std over seeds."""
    tasks: dict[str, list[str]] = {}
    for e, runs in results.items():
        task = next((r["task"] for r in runs.values() if r["task"] != "?"), "?")
        tasks.setdefault(task, []).append(e)
    lines = [
        "# Efficacy study",
        "",
        f"`{command}`",
        "",
        f"Mean ± sample std over seeds; {iterations} iterations requested per run. Held-out: the final "
        "validation (greedy, and sampled at the task's validation temperature, stated per task). Training success: rollouts at T = 1, first and last fifth of "
        "the iterations; AUC = mean training success over all iterations. Entropy: pre-update token mean of "
        "the last iteration. Wall time: per run.",
        "",
    ]
    for task, exps in tasks.items():
        lines += [
            f"## task `{task}`",
            "",
            "| experiment | seeds | " + " | ".join(COLUMNS) + " |",
            "|---|---|" + "---|" * len(COLUMNS),
        ]
        starts = []
        for e in exps:
            runs = results[e]
            cells = [
                mean_std([r[c] for r in runs.values()], 0 if c in ("wall time (s)", "iterations") else 3)
                for c in COLUMNS
            ]
            lines.append(f"| {e} | {','.join(map(str, sorted(runs)))} | " + " | ".join(cells) + " |")
            starts += [(r["start greedy"], r["start sampled"]) for r in runs.values()]
        setups = {(r["val problems"], r["val temperature"]) for e in exps for r in results[e].values()}
        lines += [
            "",
            "Held-out set: "
            + "; ".join(f"{n:.0f} problems, sampled at T = {t:g}" for n, t in sorted(setups))
            + " (`data.val_max_problems`, `data.val_temperature`).",
        ]
        if starts:
            lines += [
                "",
                f"Held-out success of the initial policy (iteration 0, mean over the runs above): greedy "
                f"{mean_std([g for g, _ in starts])}, sampled {mean_std([s for _, s in starts])}.",
            ]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, dict[int, dict]], path: Path) -> Path:
    """``curves.png``: a row per task, a column per curve; mean over seeds with a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks: dict[str, list[str]] = {}
    for e, runs in results.items():
        tasks.setdefault(next((r["task"] for r in runs.values() if r["task"] != "?"), "?"), []).append(e)
    fig, axes = plt.subplots(
        len(tasks), len(CURVES), figsize=(4 * len(CURVES), 3.2 * len(tasks)), squeeze=False
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (task, exps) in enumerate(tasks.items()):
        for j, e in enumerate(exps):
            for col, (key, _) in enumerate(CURVES):
                by_it: dict[float, list[float]] = {}
                for r in results[e].values():
                    for it, v in zip(r["curves"]["iteration"], r["curves"][key]):
                        if not math.isnan(v):
                            by_it.setdefault(it, []).append(v)
                    start = (
                        r.get("start " + key.removeprefix("val_"), math.nan)
                        if key.startswith("val_")
                        else math.nan
                    )
                    if not math.isnan(start):
                        by_it.setdefault(0.0, []).append(start)
                its = sorted(by_it)
                if not its:
                    continue
                ax, c = axes[row][col], colours[j % len(colours)]
                mean = [statistics.fmean(by_it[i]) for i in its]
                marker = "o" if key.startswith("val_") else None
                ax.plot(its, mean, color=c, lw=1.5, marker=marker, ms=3, label=e)
                ax.fill_between(
                    its, [min(by_it[i]) for i in its], [max(by_it[i]) for i in its], color=c, alpha=0.2
                )
        for col, (_, title) in enumerate(CURVES):
            ax = axes[row][col]
            ax.set_title(f"{task}: {title}", fontsize=9)
            ax.set_xlabel("RL iteration")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def cold_start(
    experiment: str, *, problems: int, samples: int, seed: int = 0, overrides: Sequence[str] = ()
) -> dict[str, float]:
    """Held-out success of an experiment's initial policy (no training), in this process.

    Greedy: one episode per validation problem; sampled: avg@``samples`` at the validation temperature
    (T = 1), over the first ``problems`` validation problems of the experiment's task.
    """
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    torch.manual_seed(seed)
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"+experiment={experiment}",
                f"seed={seed}",
                "run_dir=/nonexistent",
                f"data.val_max_problems={problems}",
                f"data.val_group_size={samples}",
                *overrides,
            ],
        )
    learner = instantiate(cfg.learner, _convert_="all")
    data = instantiate(cfg.data, _convert_="all")
    data.connect(learner)
    learner.configure_model()
    try:
        return {
            "greedy": data.evaluate(0, greedy=True),
            "sampled": data.evaluate(0, greedy=False),
            "task": getattr(data.agent, "name", "?"),
        }
    finally:
        data.teardown("fit")


# ------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--experiments", nargs="+", help=f"default: {' '.join(STUDY)} (--smoke: {SMOKE_EXPERIMENTS})"
    )
    ap.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2 (--smoke: 0 1)")
    ap.add_argument("--iterations", type=int, help="RL iterations per run; default 60 (--smoke: 2)")
    ap.add_argument("--out", type=Path, required=True, help="study folder: runs, report.md, curves.png")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (a test of the harness, not a study)")
    ap.add_argument(
        "--report-only", action="store_true", help="write the report from the runs there; train nothing"
    )
    ap.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides for every run (e.g. data.val_max_problems=128)"
    )
    ap.add_argument(
        "--cold-start",
        action="store_true",
        help="only measure each experiment's initial policy on its validation problems (no training)",
    )
    ap.add_argument("--problems", type=int, default=128, help="--cold-start: validation problems")
    ap.add_argument("--samples", type=int, default=4, help="--cold-start: sampled episodes per problem")
    args = ap.parse_args(argv)
    if args.cold_start:
        sys.path.insert(0, str(REPO))
        print(
            "| experiment | task | held-out greedy | held-out sampled (T=1) | problems x samples |\n|---|---|---|---|---|"
        )
        for e in args.experiments or STUDY:
            r = cold_start(e, problems=args.problems, samples=args.samples, overrides=args.overrides)
            print(
                f"| {e} | {r['task']} | {r['greedy']:.3f} | {r['sampled']:.3f} | {args.problems} x {args.samples} |",
                flush=True,
            )
        return 0
    experiments = args.experiments or (SMOKE_EXPERIMENTS if args.smoke else STUDY)
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.smoke else [0, 1, 2])
    iterations = args.iterations or (2 if args.smoke else 60)
    overrides = [*(SMOKE_OVERRIDES if args.smoke else []), *args.overrides]
    failed = []
    for e in experiments:
        for s in seeds:
            d = run_dir(args.out, e, s)
            if args.report_only or is_finished(d, iterations):
                print(
                    f"[efficacy] {e} seed {s}: {'finished' if is_finished(d, iterations) else 'not run'}, skipped"
                )
                continue
            print(f"[efficacy] {e} seed {s}: training ({d}/train.log)", flush=True)
            rc = launch(e, s, iterations, d, overrides)
            if rc != 0 or not is_finished(d, iterations):
                failed.append(f"{e} seed {s} (exit {rc}, see {d}/train.log)")
    results = {
        e: {
            s: summarize(run_dir(args.out, e, s))
            for s in seeds
            if (run_dir(args.out, e, s) / "metrics.csv").exists()
        }
        for e in experiments
    }
    results = {e: r for e, r in results.items() if r}
    command = "python bench/efficacy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(results, iterations=iterations, command=command)
    if failed:
        text += "\n**Unfinished runs** (resume: run the same command again):\n" + "".join(
            f"\n* {f}" for f in failed
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(text + "\n")
    if results:
        plot(results, args.out / "curves.png")
    print(text)
    print(f"\n[efficacy] wrote {args.out / 'report.md'} and {args.out / 'curves.png'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
