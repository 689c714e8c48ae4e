"""Cold-start SFT loss: the response-only loss and the prompt-weighted loss equal their definitions,
computed here row by row on unpadded sequences (so padding and position ids are checked too)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spear_lit.batch import TokenBatch
from spear_lit.policy import PolicySource
from spear_lit.training.sft import SFTLearner


def _rows(n: int = 5, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p, t = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        rows.append(
            {
                "prompt_ids": torch.randint(0, 256, (p,), generator=g).tolist(),
                "response_ids": torch.randint(0, 256, (t,), generator=g).tolist(),
                "response_mask": (torch.rand(t, generator=g) > 0.3).int().tolist(),
            }
        )
    rows[0]["response_mask"][0] = 1  # at least one response target
    return rows


def _expected(model, rows: list[dict], w: float) -> torch.Tensor:
    """sum(w·NLL(prompt targets) + mask·NLL(response targets)) / sum(weights), one row at a time."""
    num, den = torch.zeros(()), torch.zeros(())
    for r in rows:
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        nll = F.cross_entropy(model(input_ids=ids).logits[0, :-1].float(), ids[0, 1:], reduction="none")
        weights = torch.tensor([w] * (len(r["prompt_ids"]) - 1) + [float(m) for m in r["response_mask"]])
        num, den = num + (nll * weights).sum(), den + weights.sum()
    return num / den


@pytest.mark.parametrize("w", [0.0, 0.1, 1.0])
def test_sft_loss_is_the_weighted_mean_next_token_loss(w):
    learner = SFTLearner(
        PolicySource(tiny={"hidden_size": 32, "intermediate_size": 64}),
        lambda p: torch.optim.SGD(p, lr=0.0),
        prompt_loss_weight=w,
    )
    learner.configure_model()
    learner.log = lambda *a, **k: None  # no trainer attached
    rows = _rows()
    batch = TokenBatch.from_rows(rows, pad_id=257)
    with torch.no_grad():
        got = learner.training_step(batch, 0)
        want = _expected(learner.model, rows, w)
    assert torch.allclose(got, want, atol=1e-5), (got, want)


def test_negative_prompt_loss_weight_is_refused():
    with pytest.raises(ValueError, match="prompt_loss_weight"):
        SFTLearner(
            PolicySource(tiny={"hidden_size": 32}),
            lambda p: torch.optim.SGD(p, lr=0.0),
            prompt_loss_weight=-0.1,
        )
