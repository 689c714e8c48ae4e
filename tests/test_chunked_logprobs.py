"""Log-probs and entropy with the LM head run in chunks of positions (spear_lit/training/logprobs.py): the
same values and gradients as the full-vocabulary computation it replaced, nothing vocabulary-wide kept for
the backward, no entropy gradient unless asked, and the same numbers under FSDP2 on two ranks.

The reference is the full-vocabulary computation as ``token_stats`` did it before (logits of the last
``T+1`` positions, ``logprobs_from_logits`` / ``entropy_from_logits`` of ``logits / temperature``) on a
float64 copy of the model. Tolerance (fp32 against float64), elementwise: log-probs and entropy
``atol 5e-6`` (they are ~-7 and ~6.9 for a 1024-token vocabulary; both fp32 paths are off by at most 8e-7),
parameter gradients ``atol 2e-5 + rtol 1e-4`` (entries up to ~20, both fp32 paths off by at most 9e-6); the
old fp32 full-vocabulary path is held to the same bounds, so they are fp32 rounding, not slack.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, subprocess_env

from spear_lit.algos import entropy_from_logits, logprobs_from_logits, seq_mean_token_sum_norm
from spear_lit.batch import TokenBatch, position_ids
from spear_lit.policy import PolicySource
from spear_lit.training import EntropyTerm, KLTerm, PolicyLearner

V = 1024  # not the hidden size: a saved tensor whose last dimension is V is vocabulary-wide
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": V}
TEMPERATURE = 0.7
CHUNK = 128
VALUE_TOL = {"rtol": 0.0, "atol": 5e-6}
GRAD_TOL = {"rtol": 1e-4, "atol": 2e-5}


def _batch(seed: int = 0, lengths=(700, 533, 129, 1), prompts=(5, 17, 9, 17)) -> TokenBatch:
    """Rows of very different lengths (right padding) and prompts of different lengths (left padding); rows 1
    and 3 share their prompt (the shared-prompt forward applies). 1363 response positions: 10 chunks of 128
    and a ragged 83."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, V, (prompts[1],), generator=g).tolist()
    rows = []
    for k, (t, p) in enumerate(zip(lengths, prompts)):
        prompt = shared if k in (1, 3) else torch.randint(0, V, (p,), generator=g).tolist()
        rows.append(
            {
                "prompt_ids": prompt,
                "response_ids": torch.randint(0, V, (t,), generator=g).tolist(),
                "response_mask": [1] * t,
            }
        )
    return TokenBatch.from_rows(rows, pad_id=0).cropped()


def _learner(terms: dict | None = None, **kw) -> PolicyLearner:
    policy = {"probe": lambda x: (x.logp.sum() * 0.0, {})}
    learner = PolicyLearner(
        PolicySource(tiny=TINY, init_seed=3),
        terms or policy,
        lambda p: torch.optim.SGD(p, lr=0.0),
        temperature=TEMPERATURE,
        **kw,
    )
    learner.configure_model()
    return learner


def full_vocabulary_stats(model, b: TokenBatch, temperature: float):
    """The computation ``token_stats`` replaced: ``[n, T, V]`` logits, then log-softmax and entropy."""
    P, T = b.prompt_width, b.response_width
    logits = model(
        input_ids=b.input_ids,
        attention_mask=b.attention_mask,
        position_ids=position_ids(b.attention_mask),
        use_cache=False,
        logits_to_keep=T + 1,
    ).logits[:, :-1]
    z = logits / temperature
    return logprobs_from_logits(z, b.input_ids[:, P:]), entropy_from_logits(z)


def _loss(logp, ent, b: TokenBatch, with_entropy: bool) -> torch.Tensor:
    """A weighted sum over valid tokens, with fixed random weights (so every position's gradient counts)."""
    g = torch.Generator().manual_seed(7)
    valid = b.attention_mask[:, b.prompt_width :].to(logp.dtype)
    w, u = (torch.randn(valid.shape, generator=g).to(logp.dtype) for _ in range(2))  # same in fp32 and fp64
    loss = (w * logp * valid).sum()
    return loss + (u * ent * valid).sum() if with_entropy else loss


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("share_prompts", [True, False], ids=["shared-prompt", "plain"])
@pytest.mark.parametrize("entropy_grad", [False, True], ids=["logp-grad", "logp-and-entropy-grad"])
def test_values_and_gradients_match_the_float64_full_vocabulary_computation(share_prompts, entropy_grad):
    learner = _learner(share_prompts=share_prompts)
    b = _batch()
    valid = b.attention_mask[:, b.prompt_width :].bool()
    ref64 = copy.deepcopy(learner.model).double()
    want_logp, want_ent = full_vocabulary_stats(ref64, b, TEMPERATURE)
    _loss(want_logp, want_ent, b, entropy_grad).backward()

    forwards = []  # rows of each model forward: the shared-prompt path runs the 3 distinct prompts first
    hook = learner.model.register_forward_pre_hook(
        lambda m, args, kw: forwards.append(len(kw["input_ids"])), with_kwargs=True
    )
    learner.model.zero_grad()
    logp, ent = learner.token_stats(b, entropy_grad=entropy_grad, chunk_size=CHUNK)
    hook.remove()
    assert forwards == ([3, 4] if share_prompts else [4])
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == valid.shape
    torch.testing.assert_close(logp[valid], want_logp[valid].float(), **VALUE_TOL)
    torch.testing.assert_close(ent[valid], want_ent[valid].float(), **VALUE_TOL)
    assert (logp[~valid] == 0).all() and (ent[~valid] == 0).all()  # padding: 0, never computed
    _loss(logp, ent, b, entropy_grad).backward()
    torch.testing.assert_close(_grads(learner.model), _grads(ref64).float(), **GRAD_TOL)

    # the old fp32 path is within the same bounds of the float64 one (the tolerance is fp32 rounding)
    learner.model.zero_grad()
    old_logp, old_ent = full_vocabulary_stats(learner.model, b, TEMPERATURE)
    torch.testing.assert_close(old_logp[valid], want_logp[valid].float(), **VALUE_TOL)
    _loss(old_logp, old_ent, b, entropy_grad).backward()
    torch.testing.assert_close(_grads(learner.model), _grads(ref64).float(), **GRAD_TOL)


def test_the_reference_model_path_matches_under_no_grad():
    """``token_stats(b, model=ref)`` as the KL term's learner calls it: no graph, the reference's numbers."""
    learner = _learner({"kl": KLTerm(coef=0.1, aggregation=seq_mean_token_sum_norm)})
    with torch.no_grad():  # the policy moves away from the frozen copy
        for p in learner.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    b = _batch(seed=1)
    valid = b.attention_mask[:, b.prompt_width :].bool()
    with torch.no_grad():
        want, _ = full_vocabulary_stats(copy.deepcopy(learner.ref_model).double(), b, TEMPERATURE)
        got, none = learner.token_stats(b, model=learner.ref_model, entropy=False, chunk_size=CHUNK)
        policy, _ = learner.token_stats(b, entropy=False, chunk_size=CHUNK)
    assert none is None and got.grad_fn is None
    torch.testing.assert_close(got[valid], want[valid].float(), **VALUE_TOL)
    assert (policy[valid] - got[valid]).abs().max() > 1e-3  # it did read the reference, not the policy


def test_entropy_has_a_gradient_only_when_asked_or_a_term_needs_it():
    b = _batch(lengths=(40, 3, 17, 1))
    logp, ent = _learner().token_stats(b)
    assert logp.grad_fn is not None and ent.grad_fn is None and not ent.requires_grad
    _, ent = _learner().token_stats(b, entropy_grad=True)
    assert ent.grad_fn is not None
    bonus = {"entropy": EntropyTerm(coef=0.01, aggregation=seq_mean_token_sum_norm)}
    _, ent = _learner(bonus).token_stats(b)
    assert ent.grad_fn is not None


def test_nothing_vocabulary_wide_is_kept_for_the_backward():
    """Every activation autograd saves outside the checkpointed chunks (parameters aside: the head's
    ``[H, V]`` weight view): none has the vocabulary as last dimension (the full-vocabulary computation
    saves ``[n, T, V]`` logits; the test sees them)."""
    learner, b = _learner(), _batch(lengths=(300, 20, 5, 1))
    params = {p.untyped_storage().data_ptr() for p in learner.model.parameters()}

    def saved_widths(fn) -> list[int]:
        widths = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                widths.append(t.shape[-1] if t.dim() else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return widths

    assert V not in saved_widths(lambda: learner.token_stats(b, chunk_size=CHUNK))
    assert V in saved_widths(lambda: full_vocabulary_stats(learner.model, b, TEMPERATURE))


def test_chunk_size_does_not_change_the_numbers():
    learner, b = _learner(), _batch(lengths=(130, 7, 64, 1))
    with torch.no_grad():
        one, e1 = learner.token_stats(b, chunk_size=1)
        many, e2 = learner.token_stats(b, chunk_size=CHUNK)
        whole, e3 = learner.token_stats(b, chunk_size=10_000)
    torch.testing.assert_close(one, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(many, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(e1, e3, rtol=0, atol=1e-6)
    torch.testing.assert_close(e2, e3, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- FSDP2 on two CPU ranks
RANK_ROWS = {0: [0, 2], 1: [1]}  # rank 0: 829 positions (7 chunks), rank 1: 533 (5 chunks)


def test_fsdp2_on_two_ranks_gives_the_unsharded_numbers(tmp_path):
    """ModelParallelStrategy (fully_shard per decoder layer and the root, as configure_model does; gloo):
    each rank's chunked log-probs, entropy and reference log-probs, and the averaged gradient (FSDP's
    reduce-scatter), equal the unsharded full-vocabulary computation on the same rows."""
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
    learner = _learner({"kl": KLTerm(coef=0.1, aggregation=seq_mean_token_sum_norm)})
    model, b = learner.model, _batch()
    grads = []
    for rank, rows in RANK_ROWS.items():
        got = torch.load(tmp_path / f"rank{rank}.pt")
        part = b.select(rows).cropped()
        valid = part.attention_mask[:, part.prompt_width :].bool()
        model.zero_grad()
        logp, ent = full_vocabulary_stats(model, part, TEMPERATURE)
        _loss(logp, ent, part, with_entropy=True).backward()
        grads.append(_grads(model))
        torch.testing.assert_close(got["logp"][valid], logp[valid].detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(got["entropy"][valid], ent[valid].detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(got["ref_logp"][valid], logp[valid].detach(), rtol=0, atol=1e-5)
    sharded = torch.load(tmp_path / "grads.pt")
    torch.testing.assert_close(
        torch.cat([g.flatten() for g in sharded]), (grads[0] + grads[1]) / 2, **GRAD_TOL
    )


def _fsdp_worker(out: Path) -> None:
    """Run under Lightning's ModelParallelStrategy by the test above (Lightning relaunches this script for
    rank 1): one forward/backward of this rank's rows, gradients gathered whole to rank 0."""
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    class Probe(PolicyLearner):
        def training_step(self, batch, batch_idx):
            self.current_minibatch = None  # PolicyLearner's hooks read it
            part = _batch().select(RANK_ROWS[self.global_rank]).cropped().to(self.device)
            self.model.zero_grad()
            logp, ent = self.token_stats(part, entropy_grad=True, chunk_size=CHUNK)
            with torch.no_grad():
                ref, _ = self.token_stats(part, model=self.ref_model, entropy=False, chunk_size=CHUNK)
            self.manual_backward(_loss(logp, ent, part, with_entropy=True))
            grads = [p.grad.full_tensor() for p in self.model.parameters()]  # a collective on every rank
            stats = {"logp": logp.detach(), "entropy": ent, "ref_logp": ref}
            torch.save(stats, out / f"rank{self.global_rank}.pt")
            if self.global_rank == 0:
                torch.save(grads, out / "grads.pt")

    probe = Probe(
        PolicySource(tiny=TINY, init_seed=3),
        {"kl": KLTerm(coef=0.1, aggregation=seq_mean_token_sum_norm)},
        lambda p: torch.optim.SGD(p, lr=0.0),
        temperature=TEMPERATURE,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(probe, train_dataloaders=torch.utils.data.DataLoader([0]))


if __name__ == "__main__":
    _fsdp_worker(Path(sys.argv[1]))
