"""The rollout data module: one RL iteration of SPEAR_SPEC §0, served as optimizer mini-batches.

For iteration ``t`` it draws prompts, rolls them out with the current policy, scores them, filters,
computes old log-probs and advantages, decides replay, maintains the buffer, then yields the
iteration's on-policy mini-batches followed by the replayed ones. The next iteration is rolled out
only when the learner pulls the first mini-batch after the last one of ``t`` (``training_step`` takes
the data-loader iterator, so Lightning cannot prefetch): rollouts of ``t`` always use the weights
after the last optimizer step of ``t-1``.

Multi-process (DESIGN.md, "Rules"): the iteration's prompts are drawn once and sharded, each rank rolling
out its own groups (a group never spans ranks). Every decision SPEAR_SPEC takes over "the iteration" or
"the buffer" is taken over all ranks, identically on each: the low-variance group filter ranks the
iteration's ``G`` groups by their per-trajectory reward std; the replay buffer is global
(:mod:`datamodules.replay`); the P50 history and every ``rollout/``, ``filter/``, ``buffer/`` metric are
over all ranks. Mini-batches are ranges of the *global* row order (rank 0's rows, then rank 1's, ...),
so an optimizer step sees the same rows whether they are spread over 1, 2 or 4 ranks; a rank with no row
in a step takes part with an empty micro-batch, so every rank runs the same steps.

Resume anywhere: a mini-batch stays in the saved queue until its optimizer step has completed
(``MiniBatch.done``), and the last one of an iteration until the callbacks have consumed the iteration's
record (``MiniBatch.record_done``), so a checkpoint written at any point resumes without losing or
repeating a step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules import micro_batches
from datamodules.replay import ShardedReplay
from datamodules.scoring import ScoredRows, check_filters, first_rows_of_episodes, group_stats, score_rows
from spear_lit.algos import low_variance_group_mask
from spear_lit.batch import MiniBatch, Normalizers, Sample, TokenBatch
from spear_lit.training.dist import all_gather_objects, all_reduce, gather_objects, world
from spear_lit.training.precision import default_dtype
from spear_lit.training.rollout_correction import mismatch_metrics, mismatch_sums

log = logging.getLogger(__name__)


class RolloutDataModule(L.LightningDataModule):
    """Streams SPEAR's mini-batches, rolling out each RL iteration on demand.

    Args:
        agent: the agent loop and its task (:class:`spear_lit.rollout.protocol.Agent`): ``ToolAgent`` (math
            with a code interpreter, one row per episode) or ``EnvAgent`` (ALFWorld/WebShop, one row per step).
        engine: a rollout engine (:mod:`spear_lit.rollout.hf_engine`).
        advantage: ``(rewards, group_ids, step_returns, anchor_ids) -> [N]``
            (:mod:`datamodules.variants`: ``grpo`` or ``gigpo``).
        toolcall_bonus: ``(num_calls [N], correct [N], weight) -> [N]`` (SPEAR_SPEC §7); ``None`` = no bonus.
        iterations: number of RL iterations (top-level ``iterations``).
        prompts_per_iteration: ``B`` prompts (or initial states) per iteration, over all ranks.
        group_size: ``n`` rollouts per prompt.
        mini_batch_rows: rows per optimizer step over all ranks (one step per mini-batch).
        micro_batch_rows: rows per forward/backward on one rank (memory only; the gradient is the same).
        micro_batch_tokens: instead of ``micro_batch_rows`` (None keeps it): each forward/backward takes
            consecutive rows up to this many tokens (prompt + response; a longer row goes alone), run
            concatenated without padding (:mod:`spear_lit.training.packing`). Memory only, as above.
        ppo_epochs: passes over the on-policy data per iteration.
        max_response_len: ``L``, response tokens per row (also the ``seq_mean_token_sum_norm`` length).
        temperature, top_p: training sampling parameters.
        filters: name → response filter ``(samples, max_response_len) -> bool[N]`` (True = drop the row's loss
            tokens), each logged as ``filter/<name>``; SPEAR_SPEC §8's four are in :mod:`datamodules.variants`.
        group_keep_ratio: low-variance group filter (1.0 keeps every group), over all ranks' groups.
        replay: a ``spear_lit.algos.ReplayBuffer`` (``None`` = no self-imitation), held over all ranks
            (:class:`datamodules.replay.ShardedReplay`).
        seed: everything random in an iteration is seeded by ``(seed, t)`` (prompts, replay draw) or
            ``(seed, t, rank)`` (sampling), so a resumed run rolls out exactly what the uninterrupted one would.
        val_temperature, val_top_p, val_max_problems: validation sampling and size.
        val_group_size: samples per validation problem (``k`` of avg@k; 32 for AIME); greedy uses one.
        tool_failure_patience: stop the run (with an error) after this many consecutive iterations in which
            every tool call failed in the sandbox itself (``tool/error_rate`` 1); 0 = never stop.
    """

    # The first on-policy step's own forward gives its rows' old log-probs (:meth:`_old_logp`). Off: the separate
    # pass covers every row (the same values; tests compare the two).
    first_step_old_logp = True

    def __init__(
        self,
        agent,
        engine,
        *,
        advantage: Callable,
        toolcall_bonus: Callable | None = None,
        iterations: int = 100,
        prompts_per_iteration: int = 8,
        group_size: int = 8,
        mini_batch_rows: int = 64,
        micro_batch_rows: int = 16,
        micro_batch_tokens: int | None = None,
        ppo_epochs: int = 1,
        max_response_len: int = 512,
        temperature: float = 1.0,
        top_p: float = 1.0,
        filters: dict[str, Callable] | None = None,
        group_keep_ratio: float = 1.0,
        replay=None,
        seed: int = 0,
        val_temperature: float = 1.0,
        val_top_p: float = 1.0,
        val_max_problems: int | None = None,
        val_group_size: int = 1,
        tool_failure_patience: int = 3,
    ):
        super().__init__()
        for name, v in dict(
            iterations=iterations,
            prompts_per_iteration=prompts_per_iteration,
            group_size=group_size,
            mini_batch_rows=mini_batch_rows,
            micro_batch_rows=micro_batch_rows,
            max_response_len=max_response_len,
            val_group_size=val_group_size,
        ).items():
            if int(v) < 1:
                raise ValueError(f"data.{name}={v}: must be a positive integer")
        if micro_batch_tokens is not None and int(micro_batch_tokens) < 1:
            raise ValueError(
                f"data.micro_batch_tokens={micro_batch_tokens}: must be a positive integer, or null "
                "(fixed data.micro_batch_rows)"
            )
        if not 0 < group_keep_ratio <= 1:
            raise ValueError(f"data.group_keep_ratio={group_keep_ratio}: must be in (0, 1]")
        self.agent, self.engine = agent, engine
        self.advantage, self.toolcall_bonus = advantage, toolcall_bonus
        self.iterations, self.B, self.n = iterations, prompts_per_iteration, group_size
        self.mini_batch_rows, self.micro_batch_rows, self.ppo_epochs = (
            mini_batch_rows,
            micro_batch_rows,
            ppo_epochs,
        )
        self.micro_batch_tokens = micro_batch_tokens
        self.L = max_response_len
        self.temperature, self.top_p = temperature, top_p
        self.filters = check_filters(filters or {}, max_response_len)
        self.group_keep_ratio, self.seed = group_keep_ratio, seed
        self.replay = ShardedReplay(replay) if replay is not None else None
        self.val_temperature, self.val_top_p, self.val_max_problems = (
            val_temperature,
            val_top_p,
            val_max_problems,
        )
        self.val_group_size = val_group_size
        if tool_failure_patience < 0:
            raise ValueError(
                f"data.tool_failure_patience={tool_failure_patience}: must be >= 0 (0 = never stop)"
            )
        self.tool_failure_patience, self.tool_failures = (
            tool_failure_patience,
            0,
        )  # consecutive all-failed iterations
        self._val_s = 0.0
        self.learner = None
        self.tokenizer = None
        self.baseline = None  # a BaselineHistory, attached by the P50Baseline callback
        self.tool_reward_weight = 0.0  # λ(t), pushed by the ToolRewardSchedule callback
        self.iteration = 0  # last RL iteration whose mini-batches were built
        self.queue: list[MiniBatch] = []

    # ------------------------------------------------------------------ wiring
    def connect(self, learner) -> None:
        """Bind the learner (its model exists only after ``configure_model``; the engine binds lazily)."""
        self.learner = learner
        learner.pack_rows = self.micro_batch_tokens is not None  # token budgets run rows packed
        self.tokenizer = learner.policy_source.tokenizer()
        reply = getattr(self.agent, "min_reply", None)
        if reply is not None:  # an L that cannot hold one useful reply trains on reward -1 only
            need = len(self.tokenizer(reply, add_special_tokens=False)["input_ids"]) + 1  # + EOS
            if self.L < need:
                raise ValueError(
                    f"max_response_len={self.L} cannot hold the shortest useful reply {reply!r} "
                    f"({need} tokens with EOS): learning is impossible; set max_response_len >= {need}"
                )

    @property
    def upcoming_iteration(self) -> int:
        """The iteration the next pulled mini-batch belongs to (schedules are evaluated at it)."""
        return self.iteration if any(m.pending for m in self.queue) else self.iteration + 1

    def train_dataloader(self):
        if self.learner is None:
            raise RuntimeError("RolloutDataModule.connect(learner) must be called before fit")
        return DataLoader(_Steps(self), batch_size=None, num_workers=0)

    def _steps(self):
        while True:
            self._keep_step_old_logp()
            while self.queue and not self.queue[0].pending:  # applied, and its record (if any) consumed
                self.queue.pop(0)
            if not self.queue:
                if self.iteration >= self.iterations:
                    return
                replay_state = self.replay.state_dict() if self.replay is not None else None
                try:  # fp32 whatever the default dtype (HalfPrecision sets bf16 around training_step)
                    with default_dtype(torch.float32):
                        self.queue = self.build_iteration(self.iteration + 1)
                except BaseException:  # e.g. Ctrl-C mid-iteration: leave the buffer as it was
                    if replay_state is not None:
                        self.replay.load_state_dict(replay_state)
                    raise
                self.iteration += 1
            yield self.queue[0]  # stays queued (and in checkpoints) until its step has completed

    # ------------------------------------------------------------------ one iteration
    def build_iteration(self, t: int) -> list[MiniBatch]:
        """Roll out, score, filter and batch iteration ``t`` (SPEAR_SPEC §0 steps 1–10)."""
        start = time.perf_counter()
        rank, ws = world()
        if self.B % ws:
            raise ValueError(f"data.prompts_per_iteration={self.B} must be divisible by the world size {ws}")
        samples, gen_s = self._rollout(t, rank, ws)
        agent_stats = self.agent.pop_stats() if hasattr(self.agent, "pop_stats") else {}
        score_start = time.perf_counter()
        rows = score_rows(
            samples,
            t,
            prompts_per_iteration=self.B,
            max_response_len=self.L,
            filters=self.filters,
            toolcall_bonus=self.toolcall_bonus,
            tool_reward_weight=self.tool_reward_weight,
        )
        keep, dropped = self._group_filter(rows)
        kept = keep.nonzero().flatten().tolist()
        batch = TokenBatch.from_rows([rows.dicts[i] for i in kept], self.tokenizer.pad_token_id)
        if len(batch):
            batch.advantages = self.advantage(
                batch.rewards, batch.group_ids, rows.step_returns[kept], rows.anchor_ids[kept]
            ).float()
        score_s = time.perf_counter() - score_start
        stats = self._rollout_stats(samples, rows, gen_s, agent_stats)
        stats["filter/groups_dropped"] = float(dropped)
        self._check_tool(t, stats)
        counts = all_gather_objects(len(batch))  # every rank's rows, in global row order
        offset = sum(counts[: world()[0]])  # this rank's first row's global position
        pass_entropy, pass_mismatch = self._old_logp(batch, offset, sum(counts), stats)
        steps = self._on_policy_steps(batch, offset, sum(counts), t)
        if self.first_step_old_logp:  # it starts from the sampling weights: its forward is the old policy
            head = steps[0]
            head.old_logp_in_step, head.record_metrics, head.pass_entropy = True, stats, pass_entropy
            head.pass_mismatch = pass_mismatch  # it completes rollout/logp_mismatch_* with its own rows
            # the buffer stores this iteration's rows under keys from here on, in row order
            head.replay_first_key = None if self.replay is None else self.replay.next_key
        stats["perf/score_s"] = score_s
        replay_steps, replay_stats = self._replay_steps(batch, t)
        stats.update(replay_stats)
        first = first_rows_of_episodes(rows.episode_keys[kept].tolist())
        group_means, group_stds = group_stats(rows.traj_rewards[kept][first], rows.group_ids[kept][first])
        gathered = all_gather_objects((group_means, group_stds))
        stats["perf/build_s"] = time.perf_counter() - start
        all_steps = steps + replay_steps
        all_steps[-1].iteration_record = {
            "iteration": t,
            "metrics": stats,
            "group_means": [m for g in gathered for m in g[0]],
            "group_stds": [s for g in gathered for s in g[1]],
        }
        for i, s in enumerate(all_steps):
            s.step_in_iteration, s.steps_in_iteration = i, len(all_steps)
        return all_steps

    def _sampling(self):
        ws = world()[1]
        sync = (lambda has: bool(all_reduce([float(has)], "max")[0])) if ws > 1 else None
        self.engine.bind(self.learner.model, self.tokenizer)  # idempotent; the model exists only after setup
        self.engine.sync_weights()
        return sync

    def _rollout(self, t: int, rank: int, ws: int) -> tuple[list[Sample], float]:
        sync = self._sampling()
        if hasattr(self.agent, "pop_stats"):
            self.agent.pop_stats()  # count this rollout's tool calls only (validation's go elsewhere)
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.seed, t, rank, "train"))
            # the iteration's B prompts are drawn once from (seed, t) and sharded: no repeats across ranks
            samples = self.agent.collect(
                self.engine,
                self.tokenizer,
                t=t,
                seed=_seed(self.seed, t, "problems"),
                num_groups=self.B,
                group_size=self.n,
                shard=(rank, ws),
                max_response_len=self.L,
                temperature=self.temperature,
                top_p=self.top_p,
                sync=sync,
            )
        self.engine.release()  # e.g. vLLM sleeps so the learner's forward/backward get the GPU memory
        return samples, time.perf_counter() - start

    def _group_filter(self, rows: ScoredRows) -> tuple[torch.Tensor, int]:
        """Low-variance group filter over the iteration's groups of all ranks (SPEAR_SPEC §8.5): gather one
        reward per trajectory with its group id, decide once (identically on every rank), apply locally.
        Returns this rank's row mask ``bool[N]`` and the number of groups dropped over all ranks."""
        n = len(rows.group_ids)
        if self.group_keep_ratio >= 1.0:
            return torch.ones(n, dtype=torch.bool), 0
        first = first_rows_of_episodes(rows.episode_keys.tolist())
        parts = all_gather_objects((rows.group_ids[first].tolist(), rows.traj_rewards[first].tolist()))
        gids = torch.tensor([g for p in parts for g in p[0]], dtype=torch.long)  # rank order = global order
        rewards = torch.tensor([r for p in parts for r in p[1]], dtype=torch.float)
        kept = set(gids[low_variance_group_mask(rewards, gids, keep_ratio=self.group_keep_ratio)].tolist())
        keep = torch.tensor([g in kept for g in rows.group_ids.tolist()], dtype=torch.bool)
        return keep, len(set(gids.tolist()) - kept)

    def _rollout_stats(
        self, samples: list[Sample], rows: ScoredRows, gen_s: float, agent_stats: dict
    ) -> dict[str, float]:
        """``rollout/*``, ``filter/*``, ``tool/*`` and rollout timing over all ranks (two all-reduces).

        Episode-level metrics count each trajectory once (its first row); lengths are per row. The rollout
        time splits into the slowest rank's time inside the tool and the rest (generation)."""
        first = first_rows_of_episodes(rows.episode_keys.tolist())
        ep = {
            "rollout/reward_mean": rows.traj_rewards[first],
            "rollout/success_rate": rows.correct[first],
            "rollout/toolcall_bonus_mean": rows.bonus[first],
            "rollout/tool_calls_mean": rows.calls[first],
            "rollout/turns_mean": torch.tensor([float(samples[i].turns) for i in first]),
        }
        flags = {f"filter/{k}": v for k, v in rows.flags.items()}
        sums = [float(v.float().sum()) for v in (*ep.values(), *flags.values())]
        gen_tokens = float(sum(sum(s.response_mask) for s in samples))
        calls, errors = float(agent_stats.get("calls", 0)), float(agent_stats.get("errors", 0))
        capped = [float(agent_stats.get(k, 0)) for k in ("prompts_dropped", "context_truncated")]
        local = [
            *sums,
            calls,
            errors,
            len(first),
            float(rows.lengths.sum()),
            len(samples),
            gen_tokens,
            *capped,
        ]
        total = all_reduce(local, "sum").tolist()
        calls, errors, n_ep, len_sum, n_rows, tokens = total[-8:-2]
        # episodes never sent (prompt over data.agent.max_prompt_len) / cut at the engine's max_model_len
        out_capped = dict(zip(("rollout/prompts_dropped", "rollout/context_truncated"), total[-2:]))
        out = {k: v / max(n_ep, 1) for k, v in zip(ep, total)}
        out.update(zip(flags, total[len(ep) : len(ep) + len(flags)]))
        out.update(out_capped, **{"rollout/response_len_mean": len_sum / max(n_rows, 1)})
        out["sched/tool_reward_weight"] = self.tool_reward_weight
        if "calls" in agent_stats:
            out["tool/calls"], out["tool/error_rate"] = calls, errors / calls if calls else 0.0
        sync = [getattr(self.engine, k, 0.0) for k in ("last_sync_s", "last_sync_bytes")]  # vLLM's; HF: none
        slowest, tool_s, *sync = all_reduce([gen_s, agent_stats.get("tool_s", 0.0), *sync], "max").tolist()
        out["perf/weight_sync_s"], out["perf/weight_sync_bytes"] = sync  # the slowest rank's; bytes per rank
        out["perf/rollout_s"], out["perf/tool_s"], out["perf/generation_s"] = (
            slowest,
            tool_s,
            slowest - tool_s,
        )
        out["perf/rollout_tokens_per_s"] = tokens / max(slowest, 1e-9)
        return out

    def _check_tool(self, t: int, stats: dict) -> None:
        """Make a failing tool visible: a warning for every iteration with sandbox failures, and an error
        after ``tool_failure_patience`` consecutive iterations in which every call failed."""
        rate = stats.get("tool/error_rate", 0.0)
        if rate > 0 and world()[0] == 0:
            log.warning(
                "iteration %d: %.0f%% of %d tool calls failed in the sandbox itself (tool/error_rate)",
                t,
                100 * rate,
                stats["tool/calls"],
            )
        self.tool_failures = self.tool_failures + 1 if rate >= 1.0 else 0
        if self.tool_failure_patience and self.tool_failures >= self.tool_failure_patience:
            raise RuntimeError(
                f"the tool failed on every call for {self.tool_failures} consecutive iterations "
                f"(last: {t}): training on error observations only would teach nothing. Check the "
                "sandbox (bubblewrap installed? the log above has its errors), or raise "
                "data.tool_failure_patience (0 = never stop)"
            )

    # ------------------------------------------------------------------ batching
    def _on_policy_steps(self, batch: TokenBatch, offset: int, total: int, t: int) -> list[MiniBatch]:
        """``ppo_epochs`` passes of mini-batches (old log-probs filled); identical step counts on all ranks.
        ``offset``: this rank's first row's global position; ``total``: rows over all ranks."""
        steps = self._mini_batches(batch, list(range(offset, offset + len(batch))), total, "on_policy", t)
        steps = [dataclasses.replace(s) for _ in range(self.ppo_epochs) for s in steps]
        return steps or [self._minibatch(self._micro_split(batch), "on_policy", t)]

    def _old_logp(self, batch: TokenBatch, offset: int, total: int, stats: dict) -> tuple[tuple, tuple]:
        """Old log-probs of the rows that the iteration's first on-policy step does not hold (SPEAR_SPEC §0
        step 6), by a separate pass before any update of ``t``: none when they all fit in one step.

        The first step starts from the weights that sampled the rows, so its own forward gives its rows' old
        log-probs (``MiniBatch.old_logp_in_step``; ratio 1, as TRL does for one step per rollout): it writes
        them into its micro-batches (later PPO epochs read them there) and the data module copies them into
        the replay buffer's copies of the rows (:meth:`_keep_step_old_logp`) before any replay can draw them
        (the earliest is the next iteration). Returns the pass's global ``(entropy sum, loss tokens)`` and
        sampler-trainer gap sums (:func:`~spear_lit.training.rollout_correction.mismatch_sums`), with which the
        first step completes the iteration's pre-update ``policy/entropy`` and ``rollout/logp_mismatch_*``.
        With ``first_step_old_logp`` off the pass covers every row and sets them itself."""
        start = time.perf_counter()
        covered, skip = 0, 0  # rows the first step covers: over all ranks, and this rank's first ones
        if self.first_step_old_logp:
            covered = self.mini_batch_rows  # global positions below it
            skip = min(len(batch), max(0, covered - offset))
        entropy = (0.0, 0.0)
        if total > covered:  # the same decision on every rank: the pass is a collective
            entropy = self._fill_old_logp(batch, skip)
        done = batch.select(list(range(skip, len(batch))))  # the rows whose old log-probs are known now
        gap = all_reduce(mismatch_sums(done.old_logp, done.sampler_logp, done.response_mask), "sum")
        if not self.first_step_old_logp:
            stats["policy/entropy"] = entropy[0] / entropy[1] if entropy[1] else float("nan")
            stats.update(mismatch_metrics(gap))
        stats["perf/old_logp_s"] = time.perf_counter() - start
        return entropy, tuple(gap.tolist())

    def _fill_old_logp(self, batch: TokenBatch, start: int) -> tuple[float, float]:
        """``batch.old_logp`` of rows ``start..`` under the current weights; these are also the values stored
        with the rows in the replay buffer. Returns the policy's entropy summed over those rows' loss tokens
        and their count, over all ranks (pre-update, as the paper plots it)."""
        parts = self._micro_split(batch.select(list(range(start, len(batch)))))
        entropies: list[torch.Tensor] = []
        offset, ent_sum, tokens = start, 0.0, 0.0
        for part, old, ent in zip(parts, self.learner.old_logprobs(parts, entropies), entropies):
            if getattr(part, "dummy", False):
                continue
            batch.old_logp[offset : offset + len(part)] = old
            offset += len(part)
            ent_sum += float((ent * part.response_mask).sum())
            tokens += float(part.response_mask.sum())
        ent_sum, tokens = all_reduce([ent_sum, tokens], "sum").tolist()
        return ent_sum, tokens

    def _keep_step_old_logp(self) -> None:
        """Copy the old log-probs that completed in-step mini-batches computed (their rows in order: the first
        rows of this rank's batch, dummies aside) into the replay buffer's copies of those rows. Runs before the
        queue drops a completed step and before a checkpoint is taken, so the buffer never holds a row without
        them."""
        for mb in self.queue:
            if mb.done and mb.replay_first_key is not None:
                key = mb.replay_first_key
                for m in mb.micro_batches:
                    for row in [] if getattr(m, "dummy", False) else m.old_logp:
                        self.replay.set_old_logp(key, row)
                        key += 1
                mb.replay_first_key = None

    def _mini_batches(
        self, batch: TokenBatch, positions: list[int], total: int, kind: str, t: int
    ) -> list[MiniBatch]:
        """One optimizer step per ``mini_batch_rows`` rows of the global row order: step ``j`` holds global
        rows ``[j·M, (j+1)·M)``; ``positions`` are this rank's rows' global indices (ascending), ``total``
        the rows over all ranks. Every rank gets the same number of steps."""
        size = self.mini_batch_rows
        pos = torch.tensor(positions, dtype=torch.long)
        return [
            self._minibatch(
                self._micro_split(
                    batch.select(((pos >= j * size) & (pos < (j + 1) * size)).nonzero().flatten())
                ),
                kind,
                t,
            )
            for j in range(math.ceil(total / size))
        ]

    def _micro_split(self, chunk: TokenBatch) -> list[TokenBatch]:
        """Split into micro-batches (:func:`datamodules.micro_batches.split`): as many on every rank."""
        return micro_batches.split(
            chunk, self.micro_batch_rows, self.micro_batch_tokens, self.tokenizer.pad_token_id
        )

    def _minibatch(self, micro: list[TokenBatch], kind: str, t: int) -> MiniBatch:
        tokens = sum(float(m.response_mask.sum()) for m in micro)
        real_rows = sum(len(m) for m in micro if not getattr(m, "dummy", False))
        g_rows, g_tokens = all_reduce([real_rows, tokens], "sum").tolist()
        norm = Normalizers(num_rows=max(1, int(g_rows)), num_tokens=max(1, int(g_tokens)), max_len=self.L)
        return MiniBatch(micro_batches=micro, kind=kind, norm=norm, iteration=t, empty=g_rows == 0)

    def _replay_steps(self, batch: TokenBatch, t: int) -> tuple[list[MiniBatch], dict]:
        """Replay decision from the buffer before this iteration's insertion, then buffer maintenance.

        All of it over the union of the ranks' buffers (SPEAR_SPEC §5.4): ``N⁺``, the trigger, ``K`` and the
        seeded draw are the same on every rank. Each rank replays the drawn rows it holds, at their
        places in the draw order; a rank holding none of a step's rows runs that step with an empty
        micro-batch. So replay is never skipped for lack of rows on a rank (the spec's fallback): every rank
        still runs the same replay steps, and the result does not depend on the number of ranks.
        """
        stats: dict[str, float] = {}
        if self.replay is None:
            return [], stats
        p50 = self.baseline.p50() if self.baseline is not None else None
        p50_std = self.baseline.p50_std() if self.baseline is not None else None
        stats["baseline/p50"] = float("nan") if p50 is None else p50
        stats["buffer/above_p50"] = float(self.replay.count_above(p50))
        steps: list[MiniBatch] = []
        replayed = 0
        if self.replay.should_replay(p50):
            g = torch.Generator().manual_seed(_seed(self.seed, t, "replay"))  # the same draw on every rank
            rows, adv, positions, replayed = self.replay.sample(p50, p50_std, generator=g)
            if replayed:
                mine = TokenBatch.from_rows(rows, self.tokenizer.pad_token_id, adv)
                steps = self._mini_batches(mine, positions, replayed, "replay", t)
        self.replay.add(t, batch)
        stats["buffer/replayed"] = float(replayed)
        stats["buffer/size"] = float(len(self.replay))
        return steps, stats

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluate(self, t: int, *, greedy: bool) -> float:
        """Success rate on the agent's held-out items (all ranks together), greedy or avg@k sampled."""
        rank, ws = world()
        start = time.perf_counter()
        sync = self._sampling()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.seed, t, rank, "val"))
            wins, n = self.agent.evaluate(
                self.engine,
                self.tokenizer,
                shard=(rank, ws),
                limit=self.val_max_problems,
                max_response_len=self.L,
                temperature=self.val_temperature,
                top_p=self.val_top_p,
                greedy=greedy,
                sync=sync,
                samples=1 if greedy else self.val_group_size,
            )
        self.engine.release()
        c, n = all_reduce([wins, n], "sum").tolist()
        self._val_s += time.perf_counter() - start
        return c / max(n, 1)

    def pop_validation_s(self) -> float:
        """Seconds spent in :meth:`evaluate` since the last call (``perf/validation_s``)."""
        s, self._val_s = self._val_s, 0.0
        return s

    def teardown(self, stage: str) -> None:
        close = getattr(self.agent, "close", None)
        if close:
            close()

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Iteration counter, pending mini-batches and every rank's replay rows (gathered to rank 0, the one
        whose data-module state Lightning writes: rank-local state must travel inside it; the other ranks'
        ``ranks`` is ``None``). A completed step is not pending; the last step of an iteration stays until
        its record has been consumed. A collective: every rank calls it (Lightning does, on every save)."""
        self._keep_step_old_logp()
        mine = {
            "queue": [m for m in self.queue if m.pending],
            "replay": self.replay.state_dict() if self.replay is not None else None,
        }
        return {
            "iteration": self.iteration,
            "tool_failures": self.tool_failures,
            "ranks": gather_objects(mine),
        }

    def load_state_dict(self, state: dict) -> None:
        rank, ws = world()
        self.iteration = state["iteration"]
        self.tool_failures = state.get("tool_failures", 0)
        if len(state["ranks"]) != ws:
            self._load_resharded(state["ranks"])
            return
        mine = state["ranks"][rank]
        self.queue = mine["queue"]
        if self.replay is not None and mine["replay"] is not None:
            self.replay.load_state_dict(mine["replay"])

    def _load_resharded(self, ranks: list[dict]) -> None:
        """Resume on another number of ranks: possible at an iteration boundary, where nothing rank-local is
        left but the replay rows (re-dealt over this world's ranks, :meth:`ShardedReplay.load_resharded`)."""
        queued = [m for m in ranks[0]["queue"] if not m.done]  # every rank runs the same steps
        if queued:
            raise ValueError(
                f"this checkpoint was written by {len(ranks)} ranks in the middle of RL iteration "
                f"{self.iteration} ({len(queued)} optimizer steps still queued, held per rank): it resumes only "
                f"on {len(ranks)} ranks. One written at the end of an iteration resumes on any number: "
                "iter_*.ckpt (callbacks.checkpoint.every_n_iterations), or last.ckpt unless a preemption or an "
                "interrupt wrote it."
            )
        self.queue = list(ranks[0]["queue"])  # applied steps whose record the callbacks still read: the same
        if self.replay is not None and ranks[0]["replay"] is not None:
            self.replay.load_resharded([r["replay"] for r in ranks])


class _Steps(IterableDataset):
    def __init__(self, dm: RolloutDataModule):
        self.dm = dm

    def __iter__(self):
        return self.dm._steps()


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())
