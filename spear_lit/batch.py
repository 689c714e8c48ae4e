"""The data types both sides share: rollout loops produce :class:`Episode`s and :class:`Sample` rows, the
data module turns rows into padded :class:`TokenBatch`es and hands the learner one :class:`MiniBatch` per
optimizer step. This module imports nothing of the project, so the learner never loads an engine.

Token-in/token-out (SPEAR_SPEC §9): an episode is the prompt ids followed by the response ids exactly
as generated and as observations were tokenized; the decoded text is never re-tokenized.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Episode:
    """One multi-turn rollout of one prompt.

    ``response_ids`` interleaves policy turns (``response_mask`` 1) and tool/environment observations
    (mask 0); ``len(response_ids) <= L``. ``finished`` is True when the episode ended by the policy's
    own choice (a turn with no tool call), False when it hit the turn or length limit.
    """

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    num_turns: int = 0
    num_tool_calls: int = 0  # assistant turns with at least one parsed tool call (SPEAR_SPEC §7)
    finished: bool = False
    last_turn_text: str = ""  # decoded text of the final assistant turn
    active: bool = True
    truncated: bool = False  # stopped because prompt + response reached the engine's context length
    # the sampling log-prob of every response token (0 on observations); None once a policy turn came
    # without them (an engine that reports none)
    sampler_logp: list[float] | None = field(default_factory=list)

    def append(self, ids: list[int], generated: bool, logp: list[float] | None = None) -> None:
        """Append tokens to the response (mask 1 if the policy generated them, with their sampling
        log-probs ``logp`` when the engine reported them)."""
        self.response_ids.extend(ids)
        self.response_mask.extend([int(generated)] * len(ids))
        if generated and logp is None:
            self.sampler_logp = None
        elif self.sampler_logp is not None:
            self.sampler_logp.extend(logp if generated else [0.0] * len(ids))


@dataclass
class TokenBatch:
    """A padded batch of trajectories, the unit the learner consumes.

    Shapes: ``N`` rows, ``P`` prompt width (left padded), ``T`` response width (right padded).

    * ``input_ids [N, P+T]`` long, ``attention_mask [N, P+T]`` long: prompt then response.
    * ``response_mask [N, T]`` float: 1 on tokens the policy generated (the loss mask ``m``).
    * ``prompt_width`` int: ``P``; response token ``j`` sits at column ``P + j``.
    * ``advantages [N]`` float: one scalar per row, broadcast over its masked tokens.
    * ``old_logp [N, T]`` float: log-probs of the sampling policy (for replay: as stored).
    * ``group_ids [N]`` long: the ``uid`` of each row's prompt.
    * ``rewards [N]`` float, ``num_tool_calls [N]`` long.
    * ``sampler_logp [N, T]`` float or None: the log-prob of each response token under the distribution the
      rollout engine drew it from (0 where it did not generate); None when the rows carry none (replay
      rows, engines that report none).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_width: int
    advantages: torch.Tensor
    old_logp: torch.Tensor
    group_ids: torch.Tensor
    rewards: torch.Tensor
    num_tool_calls: torch.Tensor
    sampler_logp: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    def select(self, index: torch.Tensor | list[int]) -> TokenBatch:
        """Rows ``index`` (a long index or bool mask), same widths."""
        index = torch.tensor(index, dtype=torch.long) if isinstance(index, list) else index
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return TokenBatch(**{k: v if k == "prompt_width" or v is None else v[index] for k, v in kw.items()})

    def cropped(self) -> TokenBatch:
        """Drop columns that are padding in every row (left of the prompt, right of the response)."""
        if len(self) == 0:
            return self
        P = self.prompt_width
        prompt_cols = self.attention_mask[:, :P].any(0).nonzero()
        start = int(prompt_cols[0]) if len(prompt_cols) else P
        resp_cols = self.attention_mask[:, P:].any(0).nonzero()
        end = int(resp_cols[-1]) + 1 if len(resp_cols) else 1
        return TokenBatch(
            input_ids=self.input_ids[:, start : P + end],
            attention_mask=self.attention_mask[:, start : P + end],
            response_mask=self.response_mask[:, :end],
            prompt_width=P - start,
            advantages=self.advantages,
            old_logp=self.old_logp[:, :end],
            group_ids=self.group_ids,
            rewards=self.rewards,
            num_tool_calls=self.num_tool_calls,
            sampler_logp=None if self.sampler_logp is None else self.sampler_logp[:, :end],
        )

    def to(self, device) -> TokenBatch:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return TokenBatch(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()})

    def row(self, i: int) -> dict:
        """One row as a compact dict of unpadded tensors (what the replay buffer stores)."""
        am = self.attention_mask[i].bool()
        P = self.prompt_width
        n_resp = int(am[P:].sum())
        return {
            "prompt_ids": self.input_ids[i, :P][am[:P]].clone(),
            "response_ids": self.input_ids[i, P : P + n_resp].clone(),
            "response_mask": self.response_mask[i, :n_resp].clone(),
            "old_logp": self.old_logp[i, :n_resp].clone(),
            "group_id": int(self.group_ids[i]),
            "reward": float(self.rewards[i]),
            "num_tool_calls": int(self.num_tool_calls[i]),
        }

    @staticmethod
    def from_rows(rows: list[dict], pad_id: int, advantages: torch.Tensor | None = None) -> TokenBatch:
        """Pad rows (dicts as produced by :meth:`row`, or built from episodes) into a batch."""
        n = len(rows)
        P = max((len(r["prompt_ids"]) for r in rows), default=0)
        T = max((len(r["response_ids"]) for r in rows), default=0)
        T = max(T, 1)
        ids = torch.full((n, P + T), pad_id, dtype=torch.long)
        am = torch.zeros((n, P + T), dtype=torch.long)
        rm = torch.zeros((n, T), dtype=torch.float32)  # explicit: a bf16 default dtype must not round these
        old = torch.zeros((n, T), dtype=torch.float32)
        sampler = torch.zeros((n, T), dtype=torch.float32) if all("sampler_logp" in r for r in rows) else None
        for i, r in enumerate(rows):
            p, t = len(r["prompt_ids"]), len(r["response_ids"])
            ids[i, P - p : P] = torch.as_tensor(r["prompt_ids"])
            ids[i, P : P + t] = torch.as_tensor(r["response_ids"])
            am[i, P - p : P + t] = 1
            rm[i, :t] = torch.as_tensor(r["response_mask"], dtype=torch.float)
            if "old_logp" in r:
                old[i, :t] = torch.as_tensor(r["old_logp"], dtype=torch.float)
            if sampler is not None:
                sampler[i, :t] = torch.as_tensor(r["sampler_logp"], dtype=torch.float)
        adv = (
            advantages
            if advantages is not None
            else torch.tensor([r.get("advantage", 0.0) for r in rows], dtype=torch.float32)
        )
        return TokenBatch(
            input_ids=ids,
            attention_mask=am,
            response_mask=rm,
            prompt_width=P,
            advantages=adv.float(),
            old_logp=old,
            group_ids=torch.tensor([r.get("group_id", 0) for r in rows], dtype=torch.long),
            rewards=torch.tensor([r.get("reward", 0.0) for r in rows], dtype=torch.float),
            num_tool_calls=torch.tensor([r.get("num_tool_calls", 0) for r in rows], dtype=torch.long),
            sampler_logp=sampler,
        )


@dataclass
class Sample:
    """One training row.

    Attributes:
        prompt_ids, response_ids, response_mask: tokens as generated (mask 1) or observed (mask 0).
        group: index of the row's group (prompt or initial state) among the iteration's groups over all
            ranks (``rank·B/world + local index``); the data module turns it into a global ``uid``.
        episode: index of the trajectory the row belongs to (several rows per episode for step-wise agents).
        score: task reward of the row's trajectory (math ±1; ALFWorld ``10·won``; WebShop scaled score),
            minus the invalid-action penalty for a row whose action was invalid (SPEAR_SPEC §3.4).
        episode_score: the trajectory's reward without any row's penalty (group statistics take one value
            per trajectory, SPEAR_SPEC §5.1, §8.5); ``None`` = ``score`` (one row per episode).
        success: the trajectory solved the task (reported accuracy; never includes bonuses).
        num_tool_calls: what the tool-call bonus counts (assistant turns with a parsed call; for agents,
            environment steps taken), SPEAR_SPEC §7.
        incomplete: no usable final answer/action (SPEAR_SPEC §8 filter 2).
        text: decoded response (unreadable filter, scoring).
        step_return: GiGPO's discounted return from this step (environment rewards only, minus the
            invalid penalty of this step), SPEAR_SPEC §2.2; 0 for episode-level agents.
        anchor: GiGPO's anchor observation (the state text before the action); ``None`` = no step group.
        turns: assistant turns (math) or steps (agents) of the trajectory, for metrics.
        sampler_logp: the sampling log-prob of each response token (0 where the policy did not generate it),
            as the rollout engine reported it; ``None`` = not reported.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    group: int
    episode: int
    score: float
    success: bool
    num_tool_calls: int = 0
    incomplete: bool = False
    text: str = ""
    step_return: float = 0.0
    anchor: str | None = None
    turns: int = 1
    episode_score: float | None = None
    info: dict = field(default_factory=dict)
    sampler_logp: list[float] | None = None


@dataclass
class Normalizers:
    """Global normalizers of one optimizer mini-batch, over all its micro-batches and all ranks
    (SPEAR_SPEC §3.5), so the gradient does not depend on how the mini-batch is split."""

    num_rows: int
    num_tokens: int
    max_len: int


@dataclass
class MiniBatch:
    """One optimizer step's data on this rank.

    Attributes:
        micro_batches: this rank's rows, split for memory; may be empty rows-wise (a rank with no data
            still runs the same number of forward/backward passes as the others).
        kind: ``"on_policy"`` or ``"replay"`` (replay uses the replay loss settings and ``c(t)``).
        norm: the global normalizers of this step.
        iteration: the RL iteration ``t`` this step belongs to.
        step_in_iteration, steps_in_iteration: position of the step within its iteration.
        iteration_record: set on the last step of an iteration: rollout metrics and group statistics
            that callbacks (baseline history, logging) consume after the step.
        done, record_done: progress flags that keep the step in the data module's checkpointed queue
            until it has been applied (and its record consumed): resume anywhere, nothing lost or repeated.
    """

    micro_batches: list[TokenBatch]
    kind: str
    norm: Normalizers
    iteration: int
    step_in_iteration: int = 0
    steps_in_iteration: int = 1
    iteration_record: dict | None = field(default=None)
    empty: bool = False  # no rows on any rank (e.g. every group was filtered out): no update
    done: bool = False  # its optimizer step has completed (set by the learner): no longer pending
    record_done: bool = False  # the callbacks have consumed its iteration_record (set after them)
    # The iteration's first on-policy step: it starts from the weights that sampled its rows, so its own forward
    # gives their old log-probs (ratio 1, as TRL does; the separate pass covers only the other steps' rows). It
    # writes them into its micro-batches (later PPO epochs read them there; the data module copies them into the
    # replay buffer's rows, keys ``replay_first_key``, ``+1``, ... in row order) and completes the pre-update
    # ``policy/entropy`` in ``record_metrics`` (the iteration record's metrics) with the pass's global
    # ``(entropy sum, loss tokens)`` over the other rows, ``pass_entropy``.
    old_logp_in_step: bool = False
    record_metrics: dict | None = field(default=None)
    replay_first_key: int | None = None
    pass_entropy: tuple[float, float] = (0.0, 0.0)
    # the pass's global sums of the sampler-trainer gap over the other rows (training/rollout_correction.py
    # ``mismatch_sums``), which the first step completes with its own rows' into ``rollout/logp_mismatch_*``
    pass_mismatch: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)

    @property
    def pending(self) -> bool:
        """Not yet applied, or applied but its iteration record not yet consumed by the callbacks."""
        return not (self.done and (self.iteration_record is None or self.record_done))

    @property
    def is_replay(self) -> bool:
        return self.kind == "replay"

    @property
    def last_of_iteration(self) -> bool:
        return self.iteration_record is not None


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows, derived from the mask as ``generate()`` derives them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def distinct_prompts(ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a left-padded prompt block that are the same prompt (same ids, same padding): ``first [U]``,
    the first row of each distinct prompt, and ``inv [N]``, each row's index into ``first``."""
    _, inv = torch.unique(torch.cat([ids, attention_mask], 1), dim=0, return_inverse=True)
    n = int(inv.max()) + 1 if len(inv) else 0
    first = torch.full((n,), len(ids), dtype=torch.long, device=ids.device)
    return first.scatter_reduce(0, inv, torch.arange(len(ids), device=ids.device), "amin"), inv
