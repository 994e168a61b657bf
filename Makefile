# axk1-kit: every target runs inside .venv, which `make setup` creates from requirements.lock.
# Override Hydra configs with ARGS, e.g. make pretrain ARGS="optim.lr=3e-4".
PY        ?= python3.11
VENV      := .venv
BIN       := $(VENV)/bin
PYTHON    := $(BIN)/python
TORCHRUN  := $(BIN)/torchrun
MODEL     ?= tiny
HARDWARE  ?= cpu
PARALLEL  ?= cpu_fsdp_ep
NPROC     ?= 2
ARGS      ?=
# LAUNCHER: local (torchrun here) | slurm (submitit jobs chained with afterok); with slurm,
# WAIT=1 waits for the chain and fails if a stage failed.
LAUNCHER  ?= local
WAIT      ?=
export OMP_NUM_THREADS ?= 1

.PHONY: help setup test smoke pretrain post status params clean
.DEFAULT_GOAL := help

# `make` or `make help`: the targets below that carry a `## <group>|<what>` note, by recipe phase.
help:
	@awk -F'## ' '/^[a-z][a-zA-Z_-]*:.*## / { split($$1, rule, ":"); split($$2, note, "|"); \
	  print note[1] "\t" rule[1] "\t" note[2] }' $(MAKEFILE_LIST) | sort -s -k1,1n | \
	  awk -F'\t' '$$1 != group { group = $$1; sub(/^[0-9]+ /, "", $$1); printf "\n%s\n", $$1 } \
	    { printf "  make %-17s %s\n", $$2, $$3 }'
	@printf '\nVariables: MODEL=tiny|axk1_519b  HARDWARE=cpu|h200_node|h200_1024|h200_1536\n'
	@printf '  PARALLEL=<conf/parallelism/*.yaml>  LAUNCHER=local|slurm (WAIT=1 waits)  NPROC=2\n'
	@printf '  CKPT=<stage name, run dir or checkpoint>  OUT=<folder>  HF=<HF folder>  RUN=<run dir>\n'
	@printf '  ARGS="<Hydra overrides>", e.g. ARGS="optim.lr=3e-4"\n'

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed ## 1 Setup|create .venv from requirements.lock and install the kit into it

# The `slurm` tests need a cluster: bring the local one up (root; Debian packages) unless one
# already answers, and down again afterwards whatever pytest did. Under CI it must come up.
test: setup artifacts/data/tiny/pretrain_s3/manifest.json ## 7 Checks|the test suite (CI runs it via .ci/run)
	@up=0; bash scripts/slurm_local.sh status 2>/dev/null && up=1; \
	if [ $$up = 0 ]; then bash scripts/slurm_local.sh up || [ -z "$$CI" ] || exit 1; fi; \
	rc=0; $(BIN)/pytest -q --durations=12 tests || rc=$$?; \
	if [ $$up = 0 ]; then bash scripts/slurm_local.sh down || true; fi; \
	exit $$rc

params: setup ## 3 Pre-training (paper 3)|total/active parameter counts of MODEL
	$(PYTHON) -m model --model $(MODEL)

# Pre-training chain (paper 3.2): stage 1 -> 2 -> 3 (16K) -> 3 (32K); each stage starts from the
# previous stage's final checkpoint and resumes its own latest checkpoint if re-run after a kill.
PRETRAIN_STAGES := pretrain_s1 pretrain_s2 pretrain_s3_16k pretrain_s3_32k
OPTIM ?= $(if $(filter tiny,$(MODEL)),adamw_tiny,adamw)
# The long-context stages run context parallel (paper 3.4: CP 4 at 16K, CP 8 at 32K): the paper's
# 4K layout maps to axk1_16k/axk1_32k, the tiny one (cpu_fsdp_ep) to CP 2 x EP 2 on the 2 CPU ranks;
# any other layout stays as given. Override with PARALLEL_16K=... / PARALLEL_32K=....
long_layout = $(or $(if $(filter cpu_fsdp_ep,$(PARALLEL)),cpu_cp_ep),$(if $(filter axk1_pretrain,$(PARALLEL)),$(1)),$(PARALLEL))
PARALLEL_16K ?= $(call long_layout,axk1_16k)
PARALLEL_32K ?= $(call long_layout,axk1_32k)
STAGE_ARGS = model=$(MODEL) hardware=$(HARDWARE) optim=$(OPTIM) $(ARGS)
layout_of = $(if $(filter pretrain_s3_16k,$(1)),$(PARALLEL_16K),$(if $(filter pretrain_s3_32k,$(1)),$(PARALLEL_32K),$(PARALLEL)))

pretrain: setup $(if $(filter tiny,$(MODEL)),artifacts/data/tiny/pretrain_s3/manifest.json) ## 3 Pre-training (paper 3)|stages 1 -> 2 -> 3 (16K) -> 3 (32K) (MODEL HARDWARE PARALLEL NPROC LAUNCHER WAIT ARGS)
ifeq ($(LAUNCHER),slurm)
	$(PYTHON) launcher.py chain $(foreach s,$(PRETRAIN_STAGES),pretrain:$(s),parallelism=$(call layout_of,$(s))) launcher=slurm $(STAGE_ARGS) $(if $(WAIT),--wait)
else
	@set -e; $(foreach s,$(PRETRAIN_STAGES),echo "== $(s) (parallelism=$(call layout_of,$(s)))"; \
	  $(TORCHRUN) --nproc_per_node $(NPROC) --master_port $${MASTER_PORT:-29512} stages/pretrain.py stage=$(s) parallelism=$(call layout_of,$(s)) $(STAGE_ARGS);)
endif

# Post-training chain (paper 4): instruct + reasoning SFT -> merge -> MOD SFT -> RL -> evaluate
# (launcher.CHAINS["post"]); locally one stage after another, on Slurm chained with afterok.
post: setup ## 4 Post-training (paper 4)|instruct + reasoning SFT -> merge -> MOD SFT -> RL -> evaluate (MODEL LAUNCHER WAIT ARGS)
	$(PYTHON) launcher.py chain post launcher=$(LAUNCHER) model=$(MODEL) $(ARGS) $(if $(WAIT),--wait)

# The Mode-Overlap Dataset (paper 4.3) from the two SFT sets + checkpoints; then
# `python stages/sft.py stage=mod_sft posttrain_data.mod_file=runs/$(MODEL)/mod_data/mod.jsonl`.
.PHONY: mod-data
mod-data: setup ## 4 Post-training (paper 4)|MOD pairs: join both SFT sets by prompt, fill a missing mode with its SFT model (MODEL ARGS)
	$(PYTHON) stages/mod_data.py model=$(MODEL) $(ARGS)

# Each stage under runs/: DONE, RUNNING/PENDING (Slurm job), FAILED, CANCELLED, latest checkpoint.
status: setup ## 6 Watching runs|every stage's state under runs/
	@$(PYTHON) launcher.py status --runs runs

# The tiny tokenizer and datasets are built on demand the first time a tiny run needs them.
artifacts/tokenizer/tiny/tokenizer.json:
	$(MAKE) tokenizer TOKENIZER=tiny
artifacts/data/tiny/pretrain_s3/manifest.json: artifacts/tokenizer/tiny/tokenizer.json
	$(MAKE) data DATA=tiny

# The README's first command: the whole pipeline on the tiny config, on CPU.
smoke: setup ## 7 Checks|the whole pipeline on the tiny config on CPU
	rm -rf runs/tiny runs/smoke && mkdir -p runs/smoke && date +%s > runs/smoke/start
	$(MAKE) pretrain MODEL=tiny HARDWARE=cpu PARALLEL=cpu_fsdp_ep
	$(MAKE) post MODEL=tiny
	$(PYTHON) scripts/smoke_report.py --runs runs --model tiny --out runs/smoke/report.md --start-file runs/smoke/start

clean: ## 7 Checks|remove runs/, outputs/, multirun/
	rm -rf runs outputs multirun

# Any run's metrics as report.md + report.png in that run folder: make report RUN=runs/tiny/pretrain_s1
RUN ?=
.PHONY: report
report: setup ## 6 Watching runs|a run's metrics as report.md + report.png (RUN)
	@test -n "$(RUN)" || { echo "make report: set RUN=runs/<model>/<stage>"; exit 2; }
	$(PYTHON) stages/report.py $(RUN)

# Tokenizer and data (paper 2.3, 3.1). TOKENIZER/DATA pick conf/tokenizer/*.yaml and conf/data/*.yaml.
TOKENIZER ?= tiny
DATA      ?= tiny
.PHONY: tokenizer tokenizer-report data

tokenizer: setup ## 2 Data (paper 2.3, 3.1)|train the tokenizer (TOKENIZER=tiny or axk1)
	$(PYTHON) stages/train_tokenizer.py tokenizer=$(TOKENIZER) $(ARGS)

tokenizer-report: setup ## 2 Data (paper 2.3, 3.1)|the tokenizer's Table 6 efficiency report
	$(PYTHON) stages/train_tokenizer.py tokenizer=$(TOKENIZER) mode=report $(ARGS)

data: setup ## 2 Data (paper 2.3, 3.1)|curate, mix and pack the three stages' data (DATA=tiny or axk1)
	$(PYTHON) stages/curate.py data=$(DATA) $(ARGS)

# Production plan (paper 2.2, 2.3, 3.3-3.5): the scaling-law planner + the time model against
# Table 2 (conf/plan.yaml), and a one-process dry run of a layout's memory and step time on
# torch's fake process group (make dryrun MODEL=axk1_519b HARDWARE=h200_1536 PARALLEL=axk1_pretrain).
.PHONY: plan dryrun
STAGE ?= pretrain_s1
plan: setup ## 3 Pre-training (paper 3)|scaling-law planner and the time model against Table 2 (ARGS)
	$(PYTHON) stages/plan.py $(ARGS)

dryrun: setup ## 3 Pre-training (paper 3)|one layout's memory and step time on a fake world (MODEL HARDWARE PARALLEL STAGE ARGS)
	$(PYTHON) stages/dryrun.py stage=$(STAGE) parallelism=$(PARALLEL) $(STAGE_ARGS) hydra.run.dir=. hydra.output_subdir=null \
	  hydra/job_logging=disabled hydra/hydra_logging=disabled

# Hugging Face interop (issue 10): kit DCP checkpoint <-> the released AXK1ForCausalLM layout.
# CKPT: a DCP checkpoint, a run directory or a stage name (default: the last finished stage of the
# smoke chain); OUT defaults to runs/<model>/hf/<stage>. HF/OUT for import are required.
CKPT ?=
OUT  ?=
HF   ?=
.PHONY: export import

export: setup ## 5 Checkpoints and serving|kit checkpoint -> Hugging Face folder (CKPT OUT)
	$(PYTHON) stages/export.py model=$(MODEL) $(if $(CKPT),ckpt=$(CKPT)) $(if $(OUT),out=$(OUT)) $(ARGS)

import: setup ## 5 Checkpoints and serving|Hugging Face folder -> kit checkpoint (HF OUT MODEL)
	$(PYTHON) stages/import_hf.py model=$(MODEL) hf=$(HF) out=$(OUT) $(ARGS)

# vLLM serving (issue 10): .venv-vllm holds vLLM's CPU build with its own pins (requirements-vllm.lock);
# `make serve CKPT=...` exports the checkpoint if needed and starts the OpenAI-compatible server on
# 127.0.0.1:8000 (ARGS="host=... port=..."; a non-loopback host needs $$VLLM_API_KEY).
VLLM_VENV := .venv-vllm
.PHONY: serve-setup serve

$(VLLM_VENV)/.installed: requirements-vllm.lock
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q --no-deps -r requirements-vllm.lock
	$(VLLM_VENV)/bin/python -c "import torch, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

serve-setup: $(VLLM_VENV)/.installed ## 1 Setup|create .venv-vllm (vLLM) for serving and vllm rollouts

serve: setup serve-setup ## 5 Checkpoints and serving|vLLM OpenAI-compatible server on 127.0.0.1:8000 (CKPT ARGS)
	$(PYTHON) stages/serve.py model=$(MODEL) $(if $(CKPT),ckpt=$(CKPT)) $(ARGS)
