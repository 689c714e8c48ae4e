"""A deterministic agent for rank-count invariance tests: its samples depend only on (seed, iteration,
group uid, member), never on which rank rolls them out or on the policy, so 1, 2 and 4 processes see
exactly the same trajectories and any difference downstream is the framework's.

It drives the real data module and learner (old log-probs, advantages, filters, replay, updates) with
token ids the real tokenizer would accept; generation is skipped on purpose (sampling differs with batch
shape, and that is not what the test is about). Rewards are chosen so that every iteration has groups
with zero reward std (dropped by the low-variance filter) and successful rows (replay fires).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L
import torch

from spear_lit.batch import Sample
from spear_lit.rollout.protocol import shard_range


class DeterministicAgent:
    """``collect`` returns this rank's share of ``num_groups × group_size`` fixed trajectories.

    Group ``g`` of iteration ``t``: members win (+1) with a probability that depends on ``g``; every 4th
    group always loses and every 4th+1 always wins (zero std). Responses are 6–20 tokens with a masked
    "tool output" span in the middle and a tool call count of 1.
    """

    name = "det"

    def __init__(self, seed: int = 0, vocab: int = 200, **_ignored):
        self.seed, self.vocab = seed, vocab

    def _sample(self, t: int, group: int, member: int) -> Sample:
        rng = random.Random(f"{self.seed}/{t}/{group}/{member}")
        prompt = [rng.randrange(3, self.vocab) for _ in range(4 + group % 3)]
        n = rng.randrange(6, 21)
        response = [rng.randrange(3, self.vocab) for _ in range(n)]
        mask = [0 if n // 3 <= j < n // 3 + 2 else 1 for j in range(n)]
        kind = group % 4
        win = kind == 1 or (kind != 3 and rng.random() < 0.25 + 0.15 * kind)
        return Sample(
            prompt_ids=prompt,
            response_ids=response,
            response_mask=mask,
            group=group,
            episode=member,
            score=1.0 if win else -1.0,
            success=win,
            num_tool_calls=1,
            text="x" * n,
            turns=2,
        )

    def collect(
        self,
        engine,
        tokenizer,
        *,
        t,
        seed,
        num_groups,
        group_size,
        max_response_len,
        temperature,
        top_p,
        greedy=False,
        sync=None,
        shard=(0, 1),
    ) -> list[Sample]:
        lo, hi = shard_range(num_groups, shard)
        out = []
        for g in range(lo, hi):
            for m in range(group_size):
                s = self._sample(t, g, m)
                s.episode = (g - lo) * group_size + m  # unique on this rank
                out.append(s)
        return out

    def evaluate(
        self,
        engine,
        tokenizer,
        *,
        shard,
        limit,
        max_response_len,
        temperature,
        top_p,
        greedy,
        sync=None,
        samples=1,
    ) -> tuple[int, int]:
        rank, world = shard
        items = list(range(limit or 16))[rank::world]
        wins = sum(
            random.Random(f"val/{i}/{k}/{greedy}").random() < 0.5 for i in items for k in range(samples)
        )
        return wins, len(items) * samples


class RowLog(L.Callback):
    """Writes ``rows<rank>.json``: every real row of every optimizer step this rank ran, as
    ``[iteration, kind, step in iteration, group uid, advantage, digest of the row's tokens]``."""

    def __init__(self, out_dir: str):
        self.out, self.rows = Path(out_dir), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mb = pl_module.current_minibatch
        if mb is None:
            return
        for micro in mb.micro_batches:
            if getattr(micro, "dummy", False):
                continue
            for i in range(len(micro)):
                ids = micro.input_ids[i][micro.attention_mask[i].bool()].tolist()
                self.rows.append(
                    [
                        mb.iteration,
                        mb.kind,
                        mb.step_in_iteration,
                        int(micro.group_ids[i]),
                        round(float(micro.advantages[i]), 5),
                        hash(tuple(ids)) % 10**9,
                    ]
                )

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rows{trainer.global_rank}.json").write_text(json.dumps(self.rows))


class DtypeLog(L.Callback):
    """Writes ``dtypes<rank>.json``: the dtypes of every optimizer step's ``old_logp``, ``advantages`` and
    ``response_mask`` and of the replay buffer's stored rows, as seen inside the training step (where
    Lightning's ``HalfPrecision`` makes bf16 the default dtype)."""

    def __init__(self, out_dir: str):
        self.out, self.seen = Path(out_dir), set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mb = pl_module.current_minibatch
        for micro in mb.micro_batches if mb is not None else []:
            self.seen |= {
                f"{k}:{getattr(micro, k).dtype}" for k in ("old_logp", "advantages", "response_mask")
            }
        replay = trainer.datamodule.replay
        for row in replay.rows.values() if replay is not None else []:
            self.seen |= {f"replay.{k}:{row[k].dtype}" for k in ("old_logp", "response_mask")}

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"dtypes{trainer.global_rank}.json").write_text(json.dumps(sorted(self.seen)))


class OffloadLog(L.Callback):
    """Writes ``offload<rank>.json`` at the end of training: the offload policy of every ``fully_shard``
    group of the policy, and the devices of its parameter shards and of AdamW's state."""

    def __init__(self, out_dir: str):
        self.out = Path(out_dir)

    def on_train_end(self, trainer, pl_module):
        groups = [
            m._get_fsdp_state()._fsdp_param_group
            for m in pl_module.model.modules()
            if hasattr(m, "_get_fsdp_state")
        ]
        opt = trainer.optimizers[0]
        record = {
            "policies": sorted({type(g.offload_policy).__name__ for g in groups if g is not None}),
            "param_devices": sorted({str(p.to_local().device) for p in pl_module.model.parameters()}),
            "state_devices": sorted(
                {
                    str(v.device)
                    for s in opt.state.values()
                    for v in s.values()
                    if torch.is_tensor(v) and v.dim()
                }
            ),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"offload{trainer.global_rank}.json").write_text(json.dumps(record))


class SequenceParallelLog(L.Callback):
    """Writes ``sp<rank>.json`` at the end of training: the ranks of this rank's sequence-parallel group
    (``[]`` without one) and its place in it."""

    def __init__(self, out_dir: str):
        self.out = Path(out_dir)

    def on_train_end(self, trainer, pl_module):
        sp = pl_module.sp
        ranks = torch.distributed.get_process_group_ranks(sp.group) if sp is not None else []
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"ranks": ranks, "rank": sp.rank if sp is not None else None}
        (self.out / f"sp{trainer.global_rank}.json").write_text(json.dumps(record))
