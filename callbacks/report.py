"""Per-iteration reporting: progress bar, ``metrics.csv``, a PNG of the run, and a closing summary."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import lightning as L
from tqdm.auto import tqdm

from callbacks._iteration import finished_iteration, rollout_data
from callbacks.contracts import contract
from spear_lit.training.dist import all_reduce
from spear_lit.training.loggers import log_image

# SPEAR_SPEC §10: the metric vocabulary; these columns always exist in metrics.csv (empty when unmeasured).
SPEC_METRICS = [
    "train/loss",
    "policy/entropy",
    "policy/entropy_agg",
    "policy/approx_kl",
    "policy/clipfrac",
    "policy/clipfrac_lower",
    "policy/clipcov_frac",
    "policy/grad_norm",
    "train/loss_replay",
    "policy/entropy_replay",
    "policy/approx_kl_replay",
    "policy/clipfrac_replay",
    "policy/clipcov_frac_replay",
    "policy/grad_norm_replay",
    "rollout/reward_mean",
    "rollout/success_rate",
    "rollout/toolcall_bonus_mean",
    "rollout/tool_calls_mean",
    "rollout/response_len_mean",
    "rollout/turns_mean",
    "filter/overlong",
    "filter/incomplete",
    "filter/repetitive",
    "filter/unreadable",
    "filter/groups_dropped",
    "sched/sil_coef",
    "sched/tool_reward_weight",
    "buffer/size",
    "buffer/above_p50",
    "buffer/replayed",
    "baseline/p50",
    "perf/rollout_tokens_per_s",
    "perf/train_tokens_per_s",
    "perf/train_tokens",
    "perf/padding_frac",
    "perf/iteration_s",
]
# the per-phase breakdown of perf/iteration_s (seconds of rank 0, rollout: of the slowest rank)
PHASES = [
    "perf/weight_sync_s",
    "perf/generation_s",
    "perf/tool_s",
    "perf/score_s",
    "perf/old_logp_s",
    "perf/update_s",
    "perf/replay_update_s",
    "perf/validation_s",
]
PLOTTED = [
    "rollout/reward_mean",
    "rollout/success_rate",
    "policy/entropy",
    "sched/sil_coef",
    "sched/tool_reward_weight",
]


@contract(
    reads=(
        "record.metrics.*",
        "learner.iteration_metrics",
        "learner.sil_coef",
        "data.validation_s",
        "learner.initial_validation",
    )
)
class IterationReport(L.Callback):
    """One row per RL iteration: merged rollout, train, schedule and timing metrics.

    Writes ``<dir>/metrics.csv`` after every iteration (nothing lost if the run dies), logs the row to the
    trainer's logger, shows a progress bar with reward, success and entropy, and at the end saves
    ``<dir>/training_curves.png`` and prints a summary.

    Args:
        dirpath: output folder; ``None`` = the trainer's ``default_root_dir`` (the Hydra run directory).
        summary_window: iterations averaged for "first" and "last" in the summary.
    """

    def __init__(self, dirpath: str | None = None, summary_window: int = 5):
        self.dirpath, self.window = dirpath, summary_window
        self.rows: list[dict] = []
        self.bar = None
        self._t0 = self._last = None

    def _dir(self, trainer) -> Path:
        return Path(self.dirpath or trainer.default_root_dir)

    def on_train_start(self, trainer, pl_module) -> None:
        dm = rollout_data(trainer)
        self._t0 = self._last = time.perf_counter()
        if trainer.is_global_zero:
            self.bar = tqdm(
                total=dm.iterations, initial=dm.iteration, desc="RL iterations", dynamic_ncols=True
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = finished_iteration(pl_module)
        if record is None or (self.rows and self.rows[-1]["iteration"] >= record["iteration"]):
            return  # not an iteration's end, or its row exists (a resumed run replays the record once)
        now = time.perf_counter()
        row = {"iteration": record["iteration"], "optimizer_steps": trainer.global_step}
        train = pl_module.pop_iteration_metrics()  # step metrics are already global (learner)
        if "policy/entropy" in train:  # measured during the updates; policy/entropy is the pre-update one
            train["policy/entropy_update"] = train.pop("policy/entropy")
        row.update(train)
        row.update(record["metrics"])  # rollout, filter, buffer metrics are already global (data module)
        train_s = float(all_reduce([row.pop("perf/train_s", 0.0)], "max")[0])
        through, tokens = all_reduce(
            [row.pop("perf/train_tokens", 0.0), row.pop("perf/train_real_tokens", 0.0)], "sum"
        ).tolist()
        row["perf/train_tokens"] = through  # through the model, padding included, over all ranks
        row["perf/padding_frac"] = 1.0 - tokens / through if through else float("nan")
        row["perf/train_tokens_per_s"] = tokens / train_s if train_s else float("nan")  # the rows' own
        row["perf/validation_s"] = rollout_data(trainer).pop_validation_s()
        row["sched/sil_coef"] = pl_module.sil_coef
        row["perf/iteration_s"] = now - self._last
        # what the named phases do not cover: checkpoints of the previous iteration, logging, collectives
        row["perf/other_s"] = row["perf/iteration_s"] - sum(row.get(k, 0.0) for k in PHASES)
        row["perf/elapsed_s"] = now - self._t0
        self._last = now
        self.rows.append(row)
        if trainer.is_global_zero:
            self._write_csv(trainer)
            if trainer.logger is not None:
                trainer.logger.log_metrics(
                    {k: v for k, v in row.items() if k != "iteration"}, step=row["iteration"]
                )
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(
                    reward=f"{row['rollout/reward_mean']:.3f}",
                    success=f"{row['rollout/success_rate']:.2f}",
                    entropy=f"{row.get('policy/entropy', float('nan')):.3f}",
                )

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict["rows"])  # a resumed run's metrics.csv continues the same table

    def _write_csv(self, trainer) -> None:
        extra = sorted(
            {k for r in self.rows for k in r} - set(SPEC_METRICS) - {"iteration", "optimizer_steps"}
        )
        cols = ["iteration", "optimizer_steps", *SPEC_METRICS, *extra]
        path = self._dir(trainer) / "metrics.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(self.rows)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
        if not trainer.is_global_zero or not self.rows:
            return
        path = self.plot(self._dir(trainer) / "training_curves.png")
        for logger in trainer.loggers:  # TensorBoard, W&B: an image; MLflow: an artifact; CSV: the file only
            log_image(logger, "training_curves", path)
        print(self.summary(getattr(pl_module, "initial_validation", {})))

    def plot(self, path: Path) -> Path:
        """A PNG of reward, success rate, entropy, SIL coefficient and tool-reward weight per iteration."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 3.2))
        its = [r["iteration"] for r in self.rows]
        for ax, key in zip(axes, PLOTTED):
            ax.plot(its, [r.get(key, math.nan) for r in self.rows], lw=1.5)
            ax.set_title(key)
            ax.set_xlabel("RL iteration")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path

    def summary(self, initial_validation: dict | None = None) -> str:
        """First vs last iterations: success and reward; tool calls; replays; validation; wall time."""
        initial_validation = initial_validation or {}
        w = max(1, min(self.window, len(self.rows) // 2 or 1))
        first, last = self.rows[:w], self.rows[-w:]

        def mean(rows, k):
            vals = [r[k] for r in rows if k in r and not math.isnan(r[k])]
            return sum(vals) / len(vals) if vals else math.nan

        val_keys = sorted({k for r in self.rows for k in r if k.startswith("val/")})
        lines = [
            "=" * 64,
            f"spear_lit run summary ({len(self.rows)} iterations, mean of first/last {w})",
            f"  success rate   {mean(first, 'rollout/success_rate'):.3f} -> {mean(last, 'rollout/success_rate'):.3f}",
            f"  reward         {mean(first, 'rollout/reward_mean'):.3f} -> {mean(last, 'rollout/reward_mean'):.3f}",
            f"  tool calls/ep  {mean(first, 'rollout/tool_calls_mean'):.2f} -> {mean(last, 'rollout/tool_calls_mean'):.2f}",
            f"  replays fired  {sum(1 for r in self.rows if r.get('buffer/replayed', 0) > 0)}",
            *[
                f"  {k:<28} {initial_validation.get(k, math.nan):.3f} -> {self.rows[-1].get(k, math.nan):.3f}"
                for k in val_keys
            ],
            f"  wall time      {self.rows[-1]['perf/elapsed_s']:.0f} s "
            f"({mean(self.rows, 'perf/iteration_s'):.2f} s/iteration)",
            "=" * 64,
        ]
        return "\n".join(lines)
