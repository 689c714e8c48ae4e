"""Shared test utilities: config composition, tiny-run overrides, spies (also used by subprocess runs)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from spear_lit.training.dist import world

REPO = Path(__file__).resolve().parents[1]

# A tiny, fast RL run of the shipped policy: 4 prompts x 4 rollouts, short episodes, no validation.
TINY_RUN_WITH_VALIDATION = [
    "iterations=3",
    "data.prompts_per_iteration=4",
    "data.group_size=4",
    "data.mini_batch_rows=8",
    "data.micro_batch_rows=4",
    "max_response_len=160",
    "data.agent.max_turns=3",
    "data.val_max_problems=4",
    "spear.buffer_size=2",
    "trainer.logger=null",
    "tool.num_workers=2",
]
TINY_RUN = [*TINY_RUN_WITH_VALIDATION, "~callbacks.validation"]


def tiny_learner(terms: dict, **kw):
    """An in-process :class:`PolicyLearner` on a random 32-wide policy, optimizer off (lr 0)."""
    from spear_lit.policy import PolicySource
    from spear_lit.training import PolicyLearner

    learner = PolicyLearner(
        PolicySource(tiny={"hidden_size": 32, "intermediate_size": 64}),
        terms,
        lambda p: torch.optim.SGD(p, lr=0.0),
        **kw,
    )
    learner.configure_model()
    return learner


def micro_grads(learner, mb) -> torch.Tensor:
    """The flattened gradient of one mini-batch ``mb``, accumulated over its micro-batches."""
    learner.model.zero_grad()
    for k, m in enumerate(mb.micro_batches):
        loss, _ = learner._micro_loss(m.cropped(), mb, k)
        loss.backward()
    return torch.cat([p.grad.flatten() for p in learner.model.parameters()])


def compose_cfg(run_dir, overrides=()):
    """The composed config for ``overrides`` with outputs under ``run_dir``."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"run_dir={run_dir}", *overrides])


def checksum(model: torch.nn.Module) -> str:
    """A digest of every parameter's bytes (full tensors, also when sharded)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class StepLog(L.Callback):
    """Writes ``rank<r>.json``: optimizer steps and mini-batch kinds per iteration, and buffer snapshots."""

    def __init__(self, out_dir: str):
        self.out = Path(out_dir)
        self.steps: dict[int, list[str]] = {}
        self.loaded_buffer = None

    def on_train_start(self, trainer, pl_module):
        dm = trainer.datamodule
        self.loaded_buffer = _buffer_digest(dm)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mb = pl_module.current_minibatch
        if mb is None:
            return
        self.steps.setdefault(mb.iteration, []).append(f"{mb.kind}:{len(mb.micro_batches)}:{int(mb.empty)}")

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        record = {
            "rank": rank,
            "global_step": trainer.global_step,
            "steps": self.steps,
            "loaded_buffer": self.loaded_buffer,
            "final_buffer": _buffer_digest(trainer.datamodule),
            "iteration": trainer.datamodule.iteration,
        }
        (self.out / f"rank{rank}.json").write_text(json.dumps(record))


def odd_rows_on_rank(samples, max_response_len: int, *, rank: int = 1) -> torch.Tensor:
    """A response filter (``data.filters`` call shape) that drops every other row on one rank only: uneven
    data across ranks. ``+data.filters.asym={_target_:helpers.odd_rows_on_rank,_partial_:true}``."""
    flags = torch.zeros(len(samples), dtype=torch.bool)
    if world()[0] == rank:
        flags[1::2] = True
    return flags


def _buffer_digest(dm) -> str | None:
    if dm.replay is None:
        return None
    state = dm.replay.state_dict()
    return hashlib.sha256(repr(_plain(state)).encode()).hexdigest() + f":{len(dm.replay)}"


def _plain(x):
    if torch.is_tensor(x):
        return x.tolist()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in sorted(x.items())}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO), env.get("PYTHONPATH", "")])
    env["HYDRA_FULL_ERROR"] = "1"
    return env


class OnPolicySpy(L.Callback):
    """Records the policy checksum at every generate() call (tagged with the iteration being rolled out)
    and after the last optimizer step of every iteration."""

    def __init__(self):
        self.at_generation: list[tuple[int, str]] = []
        self.after_iteration: dict[int, str] = {}

    def setup(self, trainer, pl_module, stage):
        dm = trainer.datamodule
        original = dm.engine.generate

        def generate(*args, **kwargs):
            self.at_generation.append((dm.upcoming_iteration, checksum(pl_module.model)))
            return original(*args, **kwargs)

        dm.engine.generate = generate

    def on_train_start(self, trainer, pl_module):
        self.after_iteration[0] = checksum(pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mb = pl_module.current_minibatch
        if mb is not None and mb.last_of_iteration:
            self.after_iteration[mb.iteration] = checksum(pl_module.model)
