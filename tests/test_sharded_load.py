"""Sharded start-up under FSDP2 (spear_lit/training/sharded_load.py): only global rank 0 reads the policy;
the other ranks build it on the meta device and receive their shards by broadcast.

The end-to-end part runs this file as a script on 2 CPU ranks (Lightning's ``ModelParallelStrategy``, gloo,
``bf16-mixed`` as the recipes): a learner with a KL term (so a reference copy) on the shipped
``builtin:tiny-math-sft``, plus, inside the training step, three more loads through the same function: the
checkpoint in bf16, a random tiny policy (no path), and the old start-up (every rank reads). Each rank
writes what it holds: full parameters (gathered), its own buffers, ties, flags and how often it called
``from_pretrained``. The test compares all of it, bit for bit, with a single-process ``from_pretrained``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from helpers import REPO, subprocess_env

from spear_lit.policy import PolicySource
from spear_lit.training.sharded_load import build_policy

CKPT = "builtin:tiny-math-sft"
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
CALLS = [0]  # from_pretrained calls in this process (counted by the worker's patch)


def _reference(source: PolicySource) -> dict:
    """What a single process holds after ``source.model()``: the same keys as :func:`_snapshot`."""
    return _snapshot(source.model())


def _snapshot(model) -> dict:
    """Full parameters and persistent buffers (gathered: a collective under FSDP2), this rank's own buffers,
    the tie and the flags."""
    full = {n: t.full_tensor() if hasattr(t, "full_tensor") else t for n, t in model.state_dict().items()}
    local = [t.to_local() if hasattr(t, "to_local") else t for t in model.parameters()]
    return {
        "state": {n: t.detach().cpu().clone() for n, t in full.items()},
        "buffers": {n: b.detach().cpu().clone() for n, b in model.named_buffers()},
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()),
        "local_numel": sum(t.numel() for t in local),
        "ptrs": {t.untyped_storage().data_ptr() for t in local},
        "requires_grad": sorted({p.requires_grad for p in model.parameters()}),
        "training": model.training,
        "config": model.config.to_dict(),
        "checkpointing": model.is_gradient_checkpointing,
    }


def _same(got: dict, want: dict) -> None:
    for part in ("state", "buffers"):
        assert got[part].keys() == want[part].keys(), part
        for name, t in want[part].items():
            assert got[part][name].dtype == t.dtype and torch.equal(got[part][name], t), (part, name)
    assert got["tied"] and want["tied"]
    assert got["config"] == want["config"] and got["checkpointing"] == want["checkpointing"]


def test_fsdp2_ranks_other_than_0_never_read_and_hold_rank_0s_weights(tmp_path):
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    want = {
        "policy": _reference(PolicySource(CKPT, gradient_checkpointing=True)),
        "bf16": _reference(PolicySource(CKPT, dtype="bfloat16")),
        "tiny": _reference(PolicySource(tiny=TINY, init_seed=3)),
    }
    want |= {"ref": want["policy"], "old": want["policy"], "tiny_ref": want["tiny"]}
    full_numel = sum(t.numel() for t in PolicySource(CKPT).model().parameters())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank, got in enumerate(ranks):
        for name in ("policy", "ref", "bf16", "tiny", "tiny_ref", "old"):
            _same(got[name], want[name])
            assert got[name]["sharded"] and got[name]["local_numel"] < full_numel, (rank, name)
        # the learner's policy trains, its reference is frozen and in eval mode, with storage of its own
        assert got["policy"]["training"] and got["policy"]["requires_grad"] == [True]
        for ref, policy in (("ref", "policy"), ("tiny_ref", "tiny")):
            assert not got[ref]["training"] and got[ref]["requires_grad"] == [False]
            assert not got[ref]["ptrs"] & got[policy]["ptrs"]
        assert got["compute_dtype"] == "torch.bfloat16" and got["policy"]["state"][
            "lm_head.weight"
        ].dtype == (torch.float32)  # bf16-mixed: fp32 master weights
    # from_pretrained: rank 0 read the checkpoint for the learner and the bf16 load, rank 1 never did (until
    # the old start-up at the end, which shows the counter counts)
    assert [r["calls_after_configure_model"] for r in ranks] == [1, 0]
    assert [r["calls_before_old"] for r in ranks] == [2, 0]
    assert [r["calls_after_old"] for r in ranks] == [3, 1]


def test_without_a_mesh_every_process_builds_the_model_and_a_frozen_deep_copy():
    model, ref = build_policy(PolicySource(tiny=TINY, init_seed=3), None, reference=True)
    assert ref is not None and not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    assert build_policy(PolicySource(tiny=TINY), None)[1] is None


def _worker(out: Path) -> None:
    """Run by the test above on 2 ranks (Lightning relaunches this script for rank 1)."""
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from transformers import PreTrainedModel

    from spear_lit.algos import seq_mean_token_sum_norm
    from spear_lit.training import KLTerm, PolicyLearner

    read = PreTrainedModel.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        CALLS[0] += 1
        return read(cls, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(counted)

    class Probe(PolicyLearner):
        def training_step(self, batch, batch_idx):
            self.current_minibatch = None  # PolicyLearner's hooks read it
            mesh = self.device_mesh["data_parallel"]
            got = {"calls_after_configure_model": CALLS[0], "compute_dtype": str(self.model.compute_dtype)}
            got["policy"], got["ref"] = _snapshot(self.model), _snapshot(self.ref_model)
            with torch.autocast("cpu", enabled=False):  # as at start-up (bf16-mixed autocasts the step)
                got |= self._more_loads(mesh)
            torch.save(got, out / f"rank{self.global_rank}.pt")

        def _more_loads(self, mesh) -> dict:
            got = {}
            got["bf16"] = _snapshot(build_policy(PolicySource(CKPT, dtype="bfloat16"), mesh)[0])
            tiny, tiny_ref = build_policy(PolicySource(tiny=TINY, init_seed=3), mesh, reference=True)
            got["tiny"], got["tiny_ref"] = _snapshot(tiny), _snapshot(tiny_ref)
            got["calls_before_old"] = CALLS[0]
            got["old"] = _snapshot(
                build_policy(PolicySource(CKPT, gradient_checkpointing=True), mesh, every_rank_reads=True)[0]
            )
            got["calls_after_old"] = CALLS[0]
            return got

    probe = Probe(
        PolicySource(CKPT, gradient_checkpointing=True),
        {"kl": KLTerm(coef=0.1, aggregation=seq_mean_token_sum_norm)},
        lambda p: torch.optim.SGD(p, lr=0.0),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        precision="bf16-mixed",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(probe, train_dataloaders=torch.utils.data.DataLoader([0]))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
