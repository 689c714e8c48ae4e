"""Held-out evaluation every ``k`` RL iterations and after the last one."""

from __future__ import annotations

import lightning as L

from callbacks._iteration import finished_iteration, rollout_data
from callbacks.contracts import contract


@contract(sets=("record.metrics.val/*", "data.validation_s", "learner.initial_validation"))
class Validation(L.Callback):
    """Adds held-out success rates to the iteration record.

    Metrics (``<task>`` is the agent's name: ``arith``, ``aime``, ``alfworld``, ...):
      * ``val/<task>/accuracy``: the *primary* metric, the one a run is judged by;
      * ``val/<task>/accuracy_sampled`` or ``val/<task>/accuracy_greedy``: the other decoding, when enabled.

    Greedy is one deterministic episode per problem. Sampled is avg@k: ``k = data.val_group_size`` episodes
    per problem at the data module's validation temperature/top-p, every problem counted ``k`` times. The
    built-in tasks report greedy as primary (``accuracy``) and sampled as ``accuracy_sampled``; the AIME
    experiments, like the paper, report avg@32 sampled at temperature 1.0, top-p 0.6 as ``val/aime/accuracy``
    (``greedy: false``, ``primary: sampled``).

    Args:
        every_n_iterations: run after iterations ``k, 2k, ...`` and after the last; 0 = only the last.
        greedy, sampled: which decodings to evaluate.
        primary: ``"greedy"`` or ``"sampled"``: which one is ``val/<task>/accuracy``; ``None`` = greedy when
            it is enabled, else sampled.
        at_start: also evaluate the initial policy before the first iteration's update (iteration 0).
    """

    def __init__(
        self,
        every_n_iterations: int = 10,
        *,
        greedy: bool = True,
        sampled: bool = True,
        primary: str | None = None,
        at_start: bool = True,
    ):
        if every_n_iterations < 0:
            raise ValueError(f"callbacks.validation.every_n_iterations={every_n_iterations}: must be >= 0")
        if not (greedy or sampled):
            raise ValueError(
                "callbacks.validation: greedy and sampled are both false; enable one "
                "(or remove the callback: ~callbacks.validation)"
            )
        primary = primary if primary is not None else ("greedy" if greedy else "sampled")
        if primary not in ("greedy", "sampled") or not {"greedy": greedy, "sampled": sampled}[primary]:
            raise ValueError(
                f"callbacks.validation.primary={primary!r}: must be 'greedy' or 'sampled' and "
                f"that decoding must be enabled (greedy={greedy}, sampled={sampled})"
            )
        self.every, self.greedy, self.sampled, self.at_start = every_n_iterations, greedy, sampled, at_start
        self.primary = primary
        self.results: list[dict] = []

    def metric_names(self, task: str) -> dict[str, str]:
        """``{"greedy" | "sampled": metric name}`` of the enabled decodings."""
        enabled = [d for d, on in (("greedy", self.greedy), ("sampled", self.sampled)) if on]
        return {d: f"val/{task}/accuracy" + ("" if d == self.primary else f"_{d}") for d in enabled}

    def _run(self, dm, t: int) -> dict:
        names = self.metric_names(getattr(dm.agent, "name", "task"))
        out = {name: dm.evaluate(t, greedy=decoding == "greedy") for decoding, name in names.items()}
        self.results.append({"iteration": t, **out})
        return out

    def on_train_start(self, trainer, pl_module) -> None:
        dm = rollout_data(trainer)
        if self.at_start and dm.iteration == 0:
            pl_module.initial_validation = self._run(dm, 0)  # the report's summary compares against it
        elif self.results and self.results[0]["iteration"] == 0:  # resumed: the checkpoint kept it
            pl_module.initial_validation = {k: v for k, v in self.results[0].items() if k != "iteration"}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = finished_iteration(pl_module)
        if record is None:
            return
        dm, t = rollout_data(trainer), record["iteration"]
        if self.results and self.results[-1]["iteration"] >= t:
            return  # already evaluated (a resumed run replays the iteration's record once)
        if t == dm.iterations or (self.every and t % self.every == 0):
            record["metrics"].update(self._run(dm, t))

    def state_dict(self) -> dict:
        return {"results": self.results}

    def load_state_dict(self, state_dict: dict) -> None:
        self.results = state_dict["results"]
