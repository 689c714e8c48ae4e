"""The learner: a LightningModule that turns mini-batches of trajectories into optimizer steps.

It holds the policy and a dict of loss terms, computes per-token log-probs and entropy, sums the
weighted terms and steps the optimizer. It never generates text (the data module does, through a
rollout engine bound to the same model). Optimization is manual because one step is a mini-batch of
several micro-batches whose loss normalizers are global (SPEAR_SPEC §3.5).
"""

from __future__ import annotations

import math
import time
import zlib
from collections import defaultdict
from collections.abc import Callable

import lightning as L
import torch
import torch.distributed as dist

from spear_lit.batch import MiniBatch, TokenBatch, position_ids
from spear_lit.training import logprobs, offload, precision, rollout_correction, sequence_parallel, strategies
from spear_lit.training.dist import all_reduce
from spear_lit.training.sharded_load import build_policy
from spear_lit.training.terms import TermInput


class PolicyModule(L.LightningModule):
    """The policy inside Lightning: built late in ``configure_model`` (FSDP2-sharded per decoder layer
    under ``ModelParallelStrategy``), per-token log-probs/entropy, and the HF config in checkpoints.
    Shared by the RL learner and cold-start SFT.

    Args:
        policy: a :class:`spear_lit.policy.PolicySource`.
        optimizer: ``params -> torch.optim.Optimizer`` (Hydra ``_partial_``).
        temperature: log-probs and entropy are taken of ``logits / temperature`` (the sampling temperature).
        grad_clip: global gradient-norm clip.
        reference: also keep a frozen copy of the initial policy (KL term).
        share_prompts: rows with identical prompts share one forward of the prompt (:meth:`response_logits`).
    """

    def __init__(
        self,
        policy,
        optimizer: Callable,
        *,
        temperature: float = 1.0,
        grad_clip: float = 1.0,
        reference: bool = False,
        share_prompts: bool = True,
        allow_half_precision_weights: bool = False,
    ):
        super().__init__()
        self.policy_source, self.optimizer_factory = policy, optimizer
        self.share_prompts = share_prompts
        self.pack_rows = False  # set by the data module with data.micro_batch_tokens (training/packing.py)
        self.sp = None  # this rank's sequence-parallel group (training/sequence_parallel.py), if any
        self.allow_half_precision_weights = allow_half_precision_weights
        self.temperature, self.grad_clip, self.reference = temperature, grad_clip, reference
        self.model = None
        self.ref_model = None
        # RL sets it: the PPO ratio must compare the sampling distribution with itself
        self.no_dropout = False

    def configure_model(self) -> None:
        if self.model is not None:
            return
        flag = self._trainer.precision if self._trainer is not None else None
        # FSDP2: read on rank 0 only, broadcast into every rank's shards; bf16-mixed: fp32 sharded parameters
        # (AdamW's), bf16 all-gathered ones, fp32 reduce-scatter (spear_lit/training/sharded_load.py)
        self.model, self.ref_model = build_policy(
            self.policy_source,
            self.device_mesh["data_parallel"] if strategies.is_model_parallel(self) else None,
            reference=self.reference,
            mp_policy=precision.fsdp_mp_policy(flag),
            offload_policy=offload.offload_policy(self._trainer.strategy if self._trainer else None),
        )
        self.model.train()  # from_pretrained returns eval mode; the reference stays in it
        for m in filter(None, (self.model, self.ref_model)):
            m.compute_dtype = precision.compute_dtype(flag, m.dtype)  # read by the rollout engines
            if self.no_dropout:
                _disable_dropout(m)
        self.sp = sequence_parallel.group_of(self._trainer.strategy if self._trainer else None, self.model)

    def configure_optimizers(self):
        params = list(self.model.parameters())
        precision.check_optimizer_params(params, self.allow_half_precision_weights)
        return self.optimizer_factory(params)

    def forward_logits(self, b: TokenBatch, model=None, keep: int = 0) -> torch.Tensor:
        """Logits ``[n, P+T, V]`` of every position of ``b`` (``model``: the policy unless given); with ``keep``
        only those of the last ``keep`` positions (the LM head skips the rest: less compute, much less memory
        with a large vocabulary)."""
        model = model or self.model
        return model(
            input_ids=b.input_ids,
            attention_mask=b.attention_mask,
            position_ids=position_ids(b.attention_mask),
            use_cache=False,
            logits_to_keep=keep,
        ).logits

    def response_logits(self, b: TokenBatch, model=None) -> torch.Tensor:
        """Full-vocabulary logits ``[n, T, V]`` of positions ``P-1 .. P+T-2``, the ones that predict the ``T``
        response tokens, over shared prompts where they apply (:func:`logprobs.response_hidden`). For probes
        and tests: :meth:`token_stats` never builds them."""
        model = model or self.model
        return model.get_output_embeddings()(logprobs.response_hidden(model, b, self.share_prompts))

    def token_stats(
        self,
        b: TokenBatch,
        model=None,
        entropy: bool = True,
        *,
        entropy_grad: bool | None = None,
        chunk_size: int = logprobs.CHUNK_SIZE,
    ):
        """Per-token ``logp [n, T]`` and entropy ``[n, T]`` (or None) of the response tokens of ``b`` (0 on
        padding), the LM head run on ``chunk_size`` positions at a time (:mod:`spear_lit.training.logprobs`).
        The entropy has a gradient only with ``entropy_grad``; None: if a loss term ``needs_entropy_grad``."""
        if entropy_grad is None:
            terms = getattr(self, "terms", {})  # PolicyLearner's; SFT has none
            entropy_grad = any(getattr(t, "needs_entropy_grad", False) for t in terms.values())
        if self.sp is not None:  # b is the same micro-batch on every rank of the group
            return sequence_parallel.response_token_stats(
                model or self.model,
                b,
                self.sp,
                temperature=self.temperature,
                entropy=entropy,
                entropy_grad=entropy_grad,
                chunk_size=chunk_size,
            )
        return logprobs.response_token_stats(
            model or self.model,
            b,
            temperature=self.temperature,
            share_prompts=self.share_prompts,
            entropy=entropy,
            entropy_grad=entropy_grad,
            chunk_size=chunk_size,
            packed=self.pack_rows,
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["hf_config"] = self.model.config.to_dict()
        checkpoint["policy_path"] = str(self.policy_source.path) if self.policy_source.path else None


class PolicyLearner(PolicyModule):
    """The RL learner: policy + loss terms + optimizer; one optimizer step per mini-batch.

    Args:
        policy: a :class:`spear_lit.policy.PolicySource` (the model is built in ``configure_model``).
        loss_terms: name → term (see :mod:`spear_lit.training.terms`); the step loss is their sum.
        optimizer: ``params -> torch.optim.Optimizer`` (Hydra ``_partial_``), AdamW lr 1e-6 in the paper.
        temperature: sampling temperature; log-probs and entropy are taken of ``logits / temperature``.
        grad_clip: global gradient-norm clip; a non-finite norm skips the step (SPEAR_SPEC §3.5).
        seed: seeds the per-step generator of Clip-Cov's random token choice.
        share_prompts: one forward per distinct prompt of a micro-batch (:meth:`response_logits`).
        allow_half_precision_weights: see :class:`PolicyModule`.
    """

    def __init__(
        self,
        policy,
        loss_terms: dict[str, Callable],
        optimizer: Callable,
        *,
        temperature: float = 1.0,
        grad_clip: float = 1.0,
        seed: int = 0,
        share_prompts: bool = True,
        allow_half_precision_weights: bool = False,
    ):
        if not loss_terms:
            raise ValueError("loss.terms is empty: give at least a policy term (e.g. loss=spear)")
        reference = any(getattr(t, "needs_reference", False) for t in loss_terms.values())
        super().__init__(
            policy,
            optimizer,
            temperature=temperature,
            grad_clip=grad_clip,
            reference=reference,
            share_prompts=share_prompts,
            allow_half_precision_weights=allow_half_precision_weights,
        )
        # samples and old log-probs come without dropout: so must the update's log-probs
        self.no_dropout = True
        self.terms, self.seed = dict(loss_terms), seed
        self.automatic_optimization = False
        self.sil_coef = 1.0  # c(t), pushed by the SILWarmup callback before each step
        self.skipped_steps = 0
        self.iteration_metrics: dict[str, list[float]] = defaultdict(list)
        self._perf = {
            "perf/train_tokens": 0.0,  # through the model, padding included
            "perf/train_real_tokens": 0.0,  # the rows' own tokens (the report turns both into padding_frac)
            "perf/train_s": 0.0,
            "perf/update_s": 0.0,
            "perf/replay_update_s": 0.0,
        }

    def on_fit_start(self) -> None:
        # Under DDP we reduce gradients ourselves, once per optimizer step, after all micro-batches
        # (DDP's reducer would demand one backward per forward of the wrapper).
        ddp = self.trainer.model
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            ddp.require_backward_grad_sync = False
        self._manual_grad_sum = isinstance(ddp, torch.nn.parallel.DistributedDataParallel)

    @torch.no_grad()
    def old_logprobs(
        self, micro_batches: list[TokenBatch], entropy: list | None = None
    ) -> list[torch.Tensor]:
        """``old_logp [n, T]`` of each micro-batch under the current weights (SPEAR_SPEC §0 step 6), with
        dropout off like sampling (the distribution the rows were drawn from). If ``entropy`` is a list, the
        per-token entropy ``[n, T]`` of each micro-batch is appended to it (pre-update, as the paper plots it)."""
        out = []
        was_training = self.model.training
        self.model.eval()
        try:
            for b in micro_batches:
                for c, own, _ in sequence_parallel.members(b.cropped(), self.sp, self.device):
                    stats = self.token_stats(c, entropy=entropy is not None)
                    if own:  # (a sequence-parallel group runs each member's rows in turn)
                        logp, ent = stats
                full = torch.zeros_like(b.old_logp)
                full[:, : logp.shape[1]] = logp.cpu()
                out.append(full)
                if entropy is not None:
                    full_ent = torch.zeros_like(b.old_logp)
                    full_ent[:, : ent.shape[1]] = ent.cpu()
                    entropy.append(full_ent)
        finally:
            self.model.train(was_training)
        return out

    # ---------------------------------------------------------------- one optimizer step
    def training_step(self, dataloader_iter):
        self.current_minibatch = None  # if the stream ends here (StopIteration), callbacks see no step
        mb: MiniBatch = next(dataloader_iter)[0]  # Lightning yields (batch, batch_idx, dataloader_idx)
        self.current_minibatch = mb
        if mb.done:  # resumed after its step but before its record was consumed: only the callbacks rerun
            return
        start = time.perf_counter()
        opt = self.optimizers()
        additive: dict[str, float] = defaultdict(float)  # loss/* and train/loss: partial sums over ranks
        weighted: dict[str, float] = defaultdict(float)  # token means: Σ value·tokens of each micro-batch
        tokens, through = 0.0, 0
        scale = self._loss_scale() * (self.sil_coef if mb.is_replay else 1.0)
        deepspeed = strategies.is_deepspeed(self)
        for k, micro in enumerate(mb.micro_batches):
            micro = micro.cropped()
            through += int(micro.attention_mask.sum()) if self.pack_rows else micro.attention_mask.numel()
            if deepspeed:
                strategies.deepspeed_micro_step(self.trainer.model, last=k == len(mb.micro_batches) - 1)
            for member, own, weight in sequence_parallel.members(micro, self.sp, self.device):  # SP: in turn
                loss, member_metrics = self._micro_loss(member, mb, k, own=own)
                self.manual_backward(loss * (scale * weight))
                if own:
                    metrics = member_metrics
            w = float(micro.response_mask.sum())
            tokens += w
            for name, v in metrics.items():
                if name.startswith("loss/") or name == "train/loss":
                    additive[name] += float(v)
                else:
                    weighted[name] += float(v) * w
        self._reduce_gradients()
        if (
            deepspeed
        ):  # ZeRO partitions p.grad away; the engine clips by its config (learner.grad_clip) in step()
            grad_norm = 0.0
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        sums, step_tokens = _global_step_metrics(additive, weighted, tokens)  # identical on every rank
        if mb.old_logp_in_step and mb.record_metrics is not None:
            # the pre-update entropy: this forward's over its rows, plus the pass's over the other steps' rows
            e_sum, e_tokens = mb.pass_entropy
            e_sum, e_tokens = e_sum + sums.get("policy/entropy", 0.0) * step_tokens, e_tokens + step_tokens
            mb.record_metrics["policy/entropy"] = e_sum / e_tokens if e_tokens else float("nan")
            mb.record_metrics.update(rollout_correction.step_mismatch(mb))  # its rows' old log-probs are in
        if mb.empty:
            pass  # nothing on any rank: no update (weight decay alone must not move the policy)
        elif math.isfinite(grad_norm) and all(
            math.isfinite(v) for k, v in sums.items() if k.startswith("loss")
        ):
            if deepspeed:  # ZeRO keeps its own fp32 partitions: not measured
                opt.step()
                grad_norm = float(self.trainer.model.get_global_grad_norm() or 0.0)
            else:
                ratio = precision.UpdateRatio(self.model.parameters())
                with ratio.measure():
                    opt.step()
                sums["policy/update_ratio"] = ratio.value
        else:
            self.skipped_steps += 1
            sums["train/skipped_nonfinite"] = 1.0
        opt.zero_grad(set_to_none=True)
        sums["policy/grad_norm"] = grad_norm
        self._perf["perf/train_tokens"] += through
        self._perf["perf/train_real_tokens"] += sum(float(m.attention_mask.sum()) for m in mb.micro_batches)
        elapsed = time.perf_counter() - start
        self._perf["perf/train_s"] += elapsed
        self._perf["perf/replay_update_s" if mb.is_replay else "perf/update_s"] += elapsed
        self._record(sums, suffix="_replay" if mb.is_replay else "")
        mb.done = True  # applied: a checkpoint from now on no longer holds it as pending

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Lightning calls this after every callback's on_train_batch_end: the iteration record is consumed.
        if self.current_minibatch is not None:
            self.current_minibatch.record_done = True

    def _micro_loss(
        self, micro: TokenBatch, mb: MiniBatch, k: int, own: bool = True
    ) -> tuple[torch.Tensor, dict]:
        logp, ent = self.token_stats(micro)
        ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref, _ = self.token_stats(micro, model=self.ref_model, entropy=False)
        g = torch.Generator(device=self.device).manual_seed(_seed(self.seed, self.global_step, k))
        old_logp = micro.old_logp
        if mb.old_logp_in_step:  # the step's own weights sampled these rows: this forward is the old policy
            old_logp = logp.detach()
        if mb.old_logp_in_step and own:  # (another member's rows of a sequence-parallel group: not ours)
            kept = mb.micro_batches[k].old_logp  # kept with the rows: later PPO epochs, the replay buffer
            kept[:, : logp.shape[1]] = old_logp.to(kept.device)
        x = TermInput(
            logp=logp,
            old_logp=old_logp,
            entropy=ent,
            advantages=micro.advantages,
            mask=micro.response_mask,
            norm=mb.norm,
            replay=mb.is_replay,
            generator=g,
            ref_logp=ref,
            sampler_logp=micro.sampler_logp,
        )
        total = logp.sum() * 0.0  # keeps every rank's graph connected even for an all-masked micro-batch
        metrics: dict[str, float] = {}
        for name, term in self.terms.items():
            value, m = term(x)
            total = total + value
            metrics[f"loss/{name}"] = float(value.detach())
            metrics.update({f"policy/{k2}": float(v) for k2, v in m.items()})
        valid = micro.response_mask
        metrics["policy/entropy"] = float((ent.detach() * valid).sum() / valid.sum().clamp(min=1))
        metrics["train/loss"] = float(total.detach())
        return total, metrics

    def _loss_scale(self) -> float:
        # Losses use global normalizers, so the right gradient is the SUM over ranks. FSDP2 and DeepSpeed
        # average over the data-parallel group: undo it. Under DDP we all-reduce with SUM ourselves.
        if (strategies.is_model_parallel(self) or strategies.is_deepspeed(self)) and dist.is_initialized():
            return float(dist.get_world_size())
        return 1.0

    def _reduce_gradients(self) -> None:
        if not getattr(self, "_manual_grad_sum", False):
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def _record(self, metrics: dict[str, float], suffix: str) -> None:
        named = {
            (k + suffix if k.startswith("policy/") or k.startswith("loss/") or k == "train/loss" else k): v
            for k, v in metrics.items()
        }
        for k, v in named.items():
            self.iteration_metrics[k].append(v)
        # callback_metrics only: the logger gets one row per RL iteration (IterationReport), not per step
        self.log_dict(named, on_step=True, on_epoch=False, batch_size=1, prog_bar=False, logger=False)

    def pop_iteration_metrics(self) -> dict[str, float]:
        """Mean of each train metric over the steps since the last call (one RL iteration)."""
        out = {k: sum(v) / len(v) for k, v in self.iteration_metrics.items() if v}
        out.update(self._perf)  # sums, not means
        self.iteration_metrics.clear()
        self._perf = dict.fromkeys(self._perf, 0.0)
        return out

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # the metrics of the iteration's steps so far: a run resumed mid-iteration reports the whole iteration
        checkpoint["learner"] = {
            "sil_coef": self.sil_coef,
            "skipped_steps": self.skipped_steps,
            "iteration_metrics": {k: list(v) for k, v in self.iteration_metrics.items()},
            "perf": dict(self._perf),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("learner", {})
        self.sil_coef = state.get("sil_coef", self.sil_coef)
        self.skipped_steps = state.get("skipped_steps", 0)
        self.iteration_metrics = defaultdict(
            list, {k: list(v) for k, v in state.get("iteration_metrics", {}).items()}
        )
        self._perf = {**self._perf, **state.get("perf", {})}


def _disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off for good (as TRL's ``disable_dropout``): every ``nn.Dropout`` and the attention dropout
    that Hugging Face models read from their config while training."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):  # copied from the config at build time
            m.attention_dropout = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def _global_step_metrics(
    additive: dict[str, float], weighted: dict[str, float], tokens: float
) -> tuple[dict[str, float], float]:
    """One step's metrics over all ranks (one all-reduce): loss terms are sums of the ranks' parts (their
    normalizers are global), the others token means; and the step's loss tokens over all ranks. Every rank
    computes the same terms, hence the same keys."""
    a, w = sorted(additive), sorted(weighted)
    total = all_reduce([*(additive[k] for k in a), *(weighted[k] for k in w), tokens], "sum").tolist()
    out = dict(zip(a, total[: len(a)]))
    out.update({k: v / max(total[-1], 1.0) for k, v in zip(w, total[len(a) : -1])})
    return out, total[-1]


def _seed(*parts: int) -> int:
    return zlib.crc32(repr(parts).encode())
