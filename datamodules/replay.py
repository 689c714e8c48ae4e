"""SPEAR's replay buffer over all ranks (SPEAR_SPEC §5.3–5.5 in multi-process training).

Every rank holds an *identical* :class:`spear_lit.algos.ReplayBuffer` whose items are row references
``(rank, key)`` together with every row's reward and advantage (a few numbers per row, gathered at
insertion), and keeps the token payloads of only its own rows. So every decision the spec takes "over the
buffer" is taken over the union of the ranks' rows, identically on every rank, without collectives at
decision time: stale-entry eviction (``s_latest`` over all ranks), ``N⁺`` (summed over ranks by
construction), each entry's own mean in cold start, ``N``, ``K = min(2^⌊log2 N⌋, B)`` and the seeded
draw. Each rank then replays the drawn rows it holds, at their positions in the global draw order, so the
replay mini-batches hold the same rows whatever the number of ranks.
"""

from __future__ import annotations

import torch

from spear_lit.algos import ReplayBuffer
from spear_lit.batch import TokenBatch
from spear_lit.training.dist import all_gather_objects, world


class ShardedReplay:
    """A :class:`ReplayBuffer` of row references, identical on every rank, plus this rank's rows.

    Args:
        buffer: the configured ``ReplayBuffer`` (capacity ``B``, ``τ``, trigger factor, recalibration mode).
    """

    def __init__(self, buffer: ReplayBuffer):
        self.buffer = buffer
        self.rows: dict[int, dict] = {}  # key -> this rank's stored row (TokenBatch.row)
        self.next_key = 0

    def __len__(self) -> int:
        """Rows stored over all ranks."""
        return len(self.buffer)

    def count_above(self, p50: float | None) -> int:
        """``N⁺`` over all ranks."""
        return self.buffer.count_above(p50)

    def should_replay(self, p50: float | None) -> bool:
        """``N⁺ > trigger_factor·B`` over all ranks (the same answer on every rank)."""
        return self.buffer.should_replay(p50)

    def add(self, t: int, batch: TokenBatch) -> None:
        """Insert iteration ``t``'s eligible rows of every rank (a collective: every rank calls it)."""
        keys = list(range(self.next_key, self.next_key + len(batch)))
        self.next_key += len(batch)
        valid = batch.response_mask.sum(1) > 0
        mine = (
            batch.rewards.tolist(),
            batch.advantages.tolist(),
            valid.tolist(),
            batch.num_tool_calls.tolist(),
            keys,
        )
        parts = all_gather_objects(mine)  # rank order = global row order

        def cat(i: int, dtype) -> torch.Tensor:
            return torch.tensor([v for p in parts for v in p[i]], dtype=dtype)

        refs = [(r, k) for r, p in enumerate(parts) for k in p[4]]
        self.buffer.add(
            t,
            cat(0, torch.float),
            cat(1, torch.float),
            refs,
            valid=cat(2, torch.bool),
            num_tool_calls=cat(3, torch.long),
        )
        stored = self._my_keys()
        self.rows = {k: v for k, v in self.rows.items() if k in stored}
        self.rows.update({k: batch.row(i) for i, k in enumerate(keys) if k in stored})

    def set_old_logp(self, key: int, old_logp: torch.Tensor) -> None:
        """Give this rank's stored row ``key`` (if the buffer kept it) its old log-probs ``[≥ its response
        tokens]``: computed by the on-policy step when no separate pass ran (see ``MiniBatch.replay_first_key``)."""
        row = self.rows.get(key)
        if row is not None:
            row["old_logp"] = old_logp[: len(row["old_logp"])].clone()

    def sample(
        self, p50: float | None, p50_std: float | None, generator: torch.Generator
    ) -> tuple[list[dict], torch.Tensor, list[int], int]:
        """Recalibrate and draw ``K`` rows over all ranks, then empty the buffer (SPEAR_SPEC §5.4–5.5).

        ``generator`` must be seeded identically on every rank. Returns this rank's drawn rows, their
        recalibrated advantages ``[k]``, their positions in the global draw order (ascending) and ``K``.
        """
        rank = world()[0]
        refs, adv = self.buffer.sample(p50, p50_std, generator=generator)
        positions = [i for i, (r, _) in enumerate(refs) if r == rank]
        rows = [self.rows[refs[i][1]] for i in positions]
        self.rows = {}
        return rows, adv[positions], positions, len(refs)

    def _my_keys(self) -> set[int]:
        rank = world()[0]
        return {k for e in self.buffer.state_dict()["entries"] for r, k in e["items"] if r == rank}

    def state_dict(self) -> dict:
        """This rank's view (the shared buffer and its own rows); the data module gathers every rank's."""
        return {"buffer": self.buffer.state_dict(), "rows": dict(self.rows), "next_key": self.next_key}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.rows, self.next_key = dict(state["rows"]), int(state["next_key"])

    def load_resharded(self, states: list[dict]) -> None:
        """Load a buffer written by another number of ranks (``states``: every old rank's view). The entries
        (identical in every view) keep their order, decisions and numbers; their rows are re-keyed ``0..n-1``
        in that order and dealt round-robin to this world's ranks. Every decision and every replay step
        depend on the entries and the draw order only, never on which rank holds a row."""
        rank, ws = world()
        payload = {(r, k): row for r, s in enumerate(states) for k, row in s["rows"].items()}
        shared, n, self.rows = states[0]["buffer"], 0, {}
        entries = []
        for e in shared["entries"]:
            items = []
            for r, k in e["items"]:
                if n % ws == rank:
                    self.rows[n] = payload[(r, k)]
                items.append((n % ws, n))
                n += 1
            entries.append(dict(e, items=items))
        self.buffer.load_state_dict(dict(shared, entries=entries))
        self.next_key = n
