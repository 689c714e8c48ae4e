"""Benchmark: our trainer vs TRL's GRPOTrainer on one identical workload, side by side, plus the physical floor.

    OMP_NUM_THREADS=1 python bench/vs_trl.py --iterations 6 --rounds 2     # needs the `bench` extra (trl)

Workload (issue 11 item 5), the same in both: a random-init tiny Qwen2 (conf/model/tiny_random.yaml, seed 0)
and the byte tokenizer, saved to a temp dir that both load; 8 prompts x 8 completions per iteration; every
prompt exactly 64 tokens ("Add A and B." padded, bench/trl_workload.py), every completion exactly 128 new
tokens (EOS forbidden until then: TRL `generation_kwargs={"min_new_tokens": 128}`, ours
`trl_workload.FixedLengthHFEngine`); substring reward; no tool; Dr.GRPO (TRL `loss_type="dr_grpo"`,
`scale_rewards="none"`, beta=0; ours `loss=grpo` with `norm_by_std=false` and `seq_mean_token_sum_norm`);
micro-batches of 32 rows and one optimizer step of 64 rows per iteration; AdamW lr 1e-4, wd 0.01, clip 1.0;
fp32; no gradient checkpointing; no checkpoint saving (TRL `save_strategy="no"`, ours without the
`checkpoint` callback, which otherwise refreshes last.ckpt every iteration); CPU, one thread per process.

Each run is its own subprocess, alternating TRL, ours, floor, TRL, ours, floor, ... so that both see the same
machine load. Seconds per iteration are the wall time between the ends of consecutive optimizer steps
(generation, scoring, log-probs and the update all inside); the first iteration of every run is dropped
(warm-up) unless it is the only one. The floor is bare `model.generate` of 64 x 128 new tokens plus a bare
forward/backward/AdamW step on the same [64, 192] shapes (two micro-batches of 32). The last line is JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

PROMPTS, GROUP, NEW_TOKENS, MICRO_ROWS, LR, WD, CLIP = 8, 8, 128, 32, 1e-4, 0.01, 1.0
KINDS = ("trl", "ours", "floor", "ours_vllm")
ENGINES = {  # our rollout engine, with EOS forbidden until the budget (bench/trl_workload.py)
    "hf": ["rollout._target_=trl_workload.FixedLengthHFEngine"],
    "vllm_cpu": [
        "rollout=vllm_cpu",
        "rollout._target_=trl_workload.fixed_length_vllm_engine",
        f"rollout.max_model_len={64 + NEW_TOKENS}",
    ],
}


# ---------------------------------------------------------------------------------------------- children
def run_trl(model_dir: str, iterations: int, out: dict) -> None:
    """TRL's GRPOTrainer, configured for the workload; one optimizer step per generation round."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl_workload import PROMPT_TOKENS, draw_problems, substring_reward

    from spear_lit.rollout.chat import prompt_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    problems = draw_problems(PROMPTS * iterations, random.Random(0), tok)
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p.prompt}], tokenize=False, add_generation_prompt=True
        )
        for p in problems
    ]
    for p, t in zip(problems, texts):  # TRL tokenizes the rendered text: exactly our 64 prompt ids
        assert (
            tok(t)["input_ids"] == prompt_ids(tok, p.prompt)
            and len(prompt_ids(tok, p.prompt)) == PROMPT_TOKENS
        )
    data = Dataset.from_list([{"prompt": t, "answer": p.answer} for p, t in zip(problems, texts)])

    def reward(prompts, completions, answer, **kw):
        return [substring_reward(c, a) for c, a in zip(completions, answer)]

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            out["ends"].append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kw):
            out["ends"].append((time.perf_counter(), time.process_time()))

        def on_log(self, args, state, control, logs=None, **kw):
            for k in ("completions/min_length", "completions/max_length"):
                if logs and k in logs:
                    out.setdefault(k, []).append(logs[k])

    args = GRPOConfig(
        output_dir=out["tmp"],
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        seed=0,
        model_init_kwargs={"dtype": "float32"},
        per_device_train_batch_size=MICRO_ROWS,
        gradient_accumulation_steps=PROMPTS * GROUP // MICRO_ROWS,
        num_generations=GROUP,
        num_iterations=1,
        max_steps=iterations,
        shuffle_dataset=False,
        max_completion_length=NEW_TOKENS,
        generation_kwargs={"min_new_tokens": NEW_TOKENS},
        temperature=1.0,
        top_p=1.0,
        loss_type="dr_grpo",
        scale_rewards="none",
        beta=0.0,
        learning_rate=LR,
        weight_decay=WD,
        max_grad_norm=CLIP,
        dataloader_num_workers=0,
    )
    out["ends"] = []
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=reward,
        args=args,
        train_dataset=data,
        processing_class=tok,
        callbacks=[Clock()],
    )
    trainer.train()
    out["optimizer_steps"] = trainer.state.global_step
    out["new_tokens"] = [
        min(out.get("completions/min_length", [0])),
        max(out.get("completions/max_length", [0])),
    ]


def run_ours(model_dir: str, iterations: int, out: dict, engine: str = "hf") -> None:
    """Our train() through Hydra, on the same workload: a single-turn agent (no tool round) and EOS forbidden.
    ``engine``: ``hf`` (the default rollout) or ``vllm_cpu`` (``rollout=vllm_cpu``, needs `make vllm-cpu`)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from train import train

    overrides = [
        "model=tiny_random",
        f"model.path={model_dir}",
        "loss=grpo",
        "data.advantage.norm_by_std=false",
        "loss.aggregation._target_=spear_lit.algos.seq_mean_token_sum_norm",
        f"iterations={iterations}",
        f"max_response_len={NEW_TOKENS}",
        f"data.prompts_per_iteration={PROMPTS}",
        f"data.group_size={GROUP}",
        f"data.mini_batch_rows={PROMPTS * GROUP}",
        f"data.micro_batch_rows={MICRO_ROWS}",
        "data.ppo_epochs=1",
        f"learner.optimizer.lr={LR}",
        *ENGINES[engine],
        f"learner.optimizer.weight_decay={WD}",
        f"learner.grad_clip={CLIP}",
        "trainer.precision=32-true",
        f"run_dir={out['tmp']}",
        "~callbacks.validation",
        "~callbacks.checkpoint",  # TRL saves nothing either (save_strategy="no")
        "export_hf=false",
        "trainer.logger=null",
    ]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    OmegaConf.update(
        cfg,
        "data.agent",
        {
            "_target_": "spear_lit.agents.ToolAgent",
            "max_turns": 1,
            "task": {"_target_": "trl_workload.AddTask"},
            "tool": {"_target_": "trl_workload.NoTool"},
        },
        merge=False,
    )
    with open_dict(cfg):
        cfg.callbacks.bench_clock = {"_target_": "trl_workload.StepClock"}
    _, objs = train(cfg)
    cbs = {type(c).__name__: c for c in objs["trainer"].callbacks}
    rows, out["ends"] = cbs["IterationReport"].rows, cbs["StepClock"].ends
    out["phases"] = [{k: r.get(k, 0.0) for k in PHASES} for r in rows]
    out["optimizer_steps"] = objs["trainer"].global_step
    out["new_tokens"] = [
        min(r["rollout/response_len_mean"] for r in rows),
        max(r["rollout/response_len_mean"] for r in rows),
    ]


def run_floor(model_dir: str, iterations: int, out: dict) -> None:
    """Bare ``model.generate`` of 64 x 128 new tokens, then a bare forward/backward/AdamW step on the same
    [64, 64 + 128] tokens in two micro-batches of 32: what any trainer must at least spend per iteration."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    vocab = model.config.vocab_size
    prompts = torch.randint(0, 256, (PROMPTS * GROUP, 64))
    out["generate_s"], out["step_s"], out["ends"] = [], [], [(time.perf_counter(), time.process_time())]
    for _ in range(iterations):
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            seq = model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                pad_token_id=vocab - 1,
            )
        t1 = time.perf_counter()
        model.train()
        adv = torch.randn(seq.shape[0], 1)
        for s in range(0, seq.shape[0], MICRO_ROWS):
            ids = seq[s : s + MICRO_ROWS]
            logits = model(input_ids=ids, use_cache=False).logits[:, 63:-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 64:, None]).squeeze(-1)
            loss = -(logp * adv[s : s + MICRO_ROWS]).sum() / (seq.shape[0] * NEW_TOKENS)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        out["generate_s"].append(t1 - t0)
        out["step_s"].append(t2 - t1)
        out["ends"].append((time.perf_counter(), time.process_time()))
    out["new_tokens"] = [seq.shape[1] - 64] * 2


def child(kind: str, model_dir: str, iterations: int, result: str) -> None:
    """One run in this process; writes ``{iteration_s: [...], startup_s, ...}`` to ``result``."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out: dict = {"tmp": tmp}
        if kind == "ours_vllm":
            run_ours(model_dir, iterations, out, engine="vllm_cpu")
        else:
            {"trl": run_trl, "ours": run_ours, "floor": run_floor}[kind](model_dir, iterations, out)
    out["torch_threads"] = torch.get_num_threads()  # after the run: no library raised it behind our back
    use = resource.getrusage(resource.RUSAGE_SELF)  # blocked (voluntary) vs preempted (involuntary) switches
    out["context_switches"] = {"voluntary": use.ru_nvcsw, "involuntary": use.ru_nivcsw}
    # wall and process-CPU seconds between consecutive optimizer-step ends (the first from the start of training)
    ends = out.pop("ends")
    out["iteration_s"] = [b[0] - a[0] for a, b in zip(ends, ends[1:])]
    out["cpu_s"] = [b[1] - a[1] for a, b in zip(ends, ends[1:])]
    out["startup_s"] = ends[0][0] - t0
    out.pop("tmp")
    Path(result).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------- parent
def save_model(path: Path) -> None:
    """Our tiny random Qwen2 (conf/model/tiny_random.yaml, init seed 0) and byte tokenizer, as an HF dir."""
    import yaml

    from spear_lit.policy import PolicySource
    from spear_lit.policy.source import save_hf

    tiny = yaml.safe_load((REPO / "conf/model/tiny_random.yaml").read_text())["tiny"]
    src = PolicySource(None, tiny=tiny, init_seed=0)
    save_hf(src.model(), src.tokenizer(), path)


def spawn(kind: str, model_dir: Path, iterations: int, threads: int, tmp: Path, i: int) -> dict:
    result = tmp / f"{kind}_{i}.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            kind,
            "--model",
            str(model_dir),
            "--iterations",
            str(iterations),
            "--result",
            str(result),
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"the {kind} run failed (exit {proc.returncode})")
    out = json.loads(result.read_text())
    out["wall_s"] = time.perf_counter() - t0
    return out


def steady(runs: list[dict], key: str = "iteration_s") -> list[float]:
    """Per-iteration values of all runs, each run's first (warm-up) iteration dropped unless it is alone."""
    return [v for r in runs for v in (r[key][1:] if len(r[key]) > 1 else r[key])]


def summarize(runs: dict[str, list[dict]], iterations: int, rounds: int, threads: int) -> dict:
    """The JSON line: medians of wall and CPU seconds per iteration, ours / TRL and each / floor."""
    wall = {k: statistics.median(steady(v)) for k, v in runs.items() if v}
    cpu = {k: statistics.median(steady(v, "cpu_s")) for k, v in runs.items() if v}
    s = {
        "ours_s_per_iter": wall["ours"],
        "trl_s_per_iter": wall["trl"],
        "ratio": wall["ours"] / wall["trl"],
        "floor_s_per_iter": wall["floor"],
        "ours_over_floor": wall["ours"] / wall["floor"],
        "trl_over_floor": wall["trl"] / wall["floor"],
        "ours_cpu_s_per_iter": cpu["ours"],
        "trl_cpu_s_per_iter": cpu["trl"],
        "floor_cpu_s_per_iter": cpu["floor"],
        "cpu_ratio": cpu["ours"] / cpu["trl"],
    }
    if "ours_vllm" in wall:
        s.update(
            ours_vllm_cpu_s_per_iter=wall["ours_vllm"],
            ratio_vllm_cpu=wall["ours_vllm"] / wall["trl"],
            cpu_ratio_vllm_cpu=cpu["ours_vllm"] / cpu["trl"],
        )
    return {**s, "iterations": iterations, "rounds": rounds, "threads": threads}


NAMES = {
    "trl": "TRL GRPOTrainer (HF generate)",
    "ours": "spear_lit train.py, rollout=hf",
    "ours_vllm": "spear_lit train.py, rollout=vllm_cpu",
    "floor": "floor: bare generate + fwd/bwd/AdamW",
}


def table(runs: dict[str, list[dict]], s: dict) -> str:
    """Markdown table (wall and CPU seconds per iteration, multiples of the floor and of TRL) and phase lines."""

    def cell(vals):
        return f"{statistics.median(vals):.2f} [{min(vals):.2f}-{max(vals):.2f}]"

    lines = [
        "| run | wall s/iter, median [min-max] | CPU s/iter | wall x floor | wall vs TRL | CPU vs TRL | "
        "start-up s | new tokens | steps/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    trl_cpu = statistics.median(steady(runs["trl"], "cpu_s"))
    for k in KINDS:
        rs = runs[k]
        if not rs:
            continue
        wall, cpu = steady(rs), steady(rs, "cpu_s")
        toks = sorted({round(x) for r in rs for x in r["new_tokens"]})
        steps = sorted({r.get("optimizer_steps", len(r["iteration_s"])) for r in rs})
        lines.append(
            f"| {NAMES[k]} | {cell(wall)} | {cell(cpu)} | "
            f"{statistics.median(wall) / s['floor_s_per_iter']:.2f}x | "
            f"{statistics.median(wall) / s['trl_s_per_iter']:.2f}x | {statistics.median(cpu) / trl_cpu:.2f}x | "
            f"{statistics.median(r['startup_s'] for r in rs):.1f} | {'/'.join(map(str, toks))} | "
            f"{'/'.join(map(str, steps))} |"
        )
    fl = runs["floor"]
    lines += [
        "",
        "floor parts (median wall s): generate {:.2f}, fwd/bwd/AdamW {:.2f}".format(
            statistics.median(steady(fl, "generate_s")), statistics.median(steady(fl, "step_s"))
        ),
    ]
    for k in ("ours", "ours_vllm"):
        if runs[k]:
            phases = {p: statistics.median(v for r in runs[k] for v in _col(r, p)) for p in PHASES}
            lines.append(
                f"{NAMES[k]} phases (median wall s): "
                + ", ".join(f"{p[5:-2]} {v:.2f}" for p, v in phases.items())
            )
    return "\n".join(lines)


PHASES = ("perf/generation_s", "perf/score_s", "perf/old_logp_s", "perf/update_s", "perf/other_s")


def _col(run: dict, key: str) -> list[float]:
    rows = run["phases"][1:] if len(run["phases"]) > 1 else run["phases"]
    return [p[key] for p in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=6, help="iterations per run (the first is warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="TRL, ours, floor repeated this many times")
    ap.add_argument("--threads", type=int, default=1, help="OMP/torch threads of every run")
    ap.add_argument(
        "--vllm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run ours with rollout=vllm_cpu (default: when vLLM is installed)",
    )
    ap.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.model, args.iterations, args.result)
    vllm = importlib.util.find_spec("vllm") is not None if args.vllm is None else args.vllm
    kinds = [k for k in KINDS if k != "ours_vllm" or vllm]
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_model(tmp / "model")
        for i in range(args.rounds):
            for k in kinds:
                runs[k].append(spawn(k, tmp / "model", args.iterations, args.threads, tmp, i))
                print(
                    f"round {i + 1}/{args.rounds} {k}: {' '.join(f'{v:.2f}' for v in runs[k][-1]['iteration_s'])} s/iter",
                    file=sys.stderr,
                    flush=True,
                )
    s = summarize(runs, args.iterations, args.rounds, args.threads)
    print(
        f"\nours vs TRL, {PROMPTS}x{GROUP} completions of {NEW_TOKENS} tokens on 64-token prompts per iteration, "
        f"{args.rounds} rounds x {args.iterations} iterations, {args.threads} thread(s) per run\n"
    )
    print(table(runs, s))
    print(
        f"\nratio ours/TRL = {s['ratio']:.2f} (goal <= 0.7); above floor: ours {s['ours_over_floor']:.2f}x, "
        f"TRL {s['trl_over_floor']:.2f}x"
    )
    print(json.dumps(s))


if __name__ == "__main__":
    main()
