"""Cold-start SFT: next-token loss on the assistant tokens of expert multi-turn traces."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from spear_lit.algos import logprobs_from_logits
from spear_lit.training.module import PolicyModule


class SFTLearner(PolicyModule):
    """Supervised warm-up of the policy (loss on tokens the policy would generate: mask 1).

    Args:
        policy: a :class:`spear_lit.policy.PolicySource`.
        optimizer: ``params -> Optimizer``.
        warmup_steps, total_steps: linear warm-up then cosine decay to ``min_lr_ratio`` of the peak.
        prompt_loss_weight: weight of the next-token loss on prompt tokens relative to response tokens
            (0: responses only). A small weight (``train_on_inputs`` in other trainers) gives a randomly
            initialised tiny policy far more signal to learn to copy from its context (ids, object names)
            than the few response tokens of a step do; the loss is the weighted mean over both.
        allow_half_precision_weights: see :class:`~spear_lit.training.module.PolicyModule`.
    """

    def __init__(
        self,
        policy,
        optimizer: Callable,
        *,
        warmup_steps: int = 50,
        total_steps: int = 1500,
        min_lr_ratio: float = 0.1,
        grad_clip: float = 1.0,
        prompt_loss_weight: float = 0.0,
        allow_half_precision_weights: bool = False,
    ):
        super().__init__(
            policy, optimizer, grad_clip=grad_clip, allow_half_precision_weights=allow_half_precision_weights
        )
        if not 0.0 <= prompt_loss_weight:
            raise ValueError(f"prompt_loss_weight={prompt_loss_weight}: must be >= 0")
        self.prompt_loss_weight = prompt_loss_weight
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio

    def configure_optimizers(self):
        opt = super().configure_optimizers()  # refuses half-precision weights unless allowed

        def lr(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            p = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def training_step(self, batch, batch_idx):
        b = batch.cropped()
        logp = logprobs_from_logits(
            self.forward_logits(b)[:, :-1].float(), b.input_ids[:, 1:]
        )  # j predicts j+1
        real = b.attention_mask.float()
        w = real[:, 1:] * real[:, :-1] * self.prompt_loss_weight  # prompt targets after a real token
        w[:, b.prompt_width - 1 :] = b.response_mask  # response targets: the loss mask
        loss = -(logp * w).sum() / w.sum().clamp(min=1e-8)  # weighted mean (w = 0: over the response mask)
        self.log("sft/loss", loss, prog_bar=True, batch_size=len(b))
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
