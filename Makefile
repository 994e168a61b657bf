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

.PHONY: setup test smoke pretrain post status params bench clean

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

# The `slurm` tests need a cluster: bring the local one up (root; Debian packages) unless one
# already answers, and down again afterwards whatever pytest did. Under CI it must come up.
test: setup artifacts/data/tiny/pretrain_s3/manifest.json
	@up=0; bash scripts/slurm_local.sh status 2>/dev/null && up=1; \
	if [ $$up = 0 ]; then bash scripts/slurm_local.sh up || [ -z "$$CI" ] || exit 1; fi; \
	rc=0; $(BIN)/pytest -q --durations=12 tests || rc=$$?; \
	if [ $$up = 0 ]; then bash scripts/slurm_local.sh down || true; fi; \
	exit $$rc

params: setup
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

pretrain: setup $(if $(filter tiny,$(MODEL)),artifacts/data/tiny/pretrain_s3/manifest.json)
ifeq ($(LAUNCHER),slurm)
	$(PYTHON) launcher.py chain $(foreach s,$(PRETRAIN_STAGES),pretrain:$(s),parallelism=$(call layout_of,$(s))) launcher=slurm $(STAGE_ARGS) $(if $(WAIT),--wait)
else
	@set -e; $(foreach s,$(PRETRAIN_STAGES),echo "== $(s) (parallelism=$(call layout_of,$(s)))"; \
	  $(TORCHRUN) --nproc_per_node $(NPROC) --master_port $${MASTER_PORT:-29512} stages/pretrain.py stage=$(s) parallelism=$(call layout_of,$(s)) $(STAGE_ARGS);)
endif

# Post-training chain (paper 4): instruct + reasoning SFT -> merge -> MOD SFT -> RL -> evaluate
# (launcher.CHAINS["post"]); locally one stage after another, on Slurm chained with afterok.
post: setup
	$(PYTHON) launcher.py chain post launcher=$(LAUNCHER) model=$(MODEL) $(ARGS) $(if $(WAIT),--wait)

# Each stage under runs/: DONE, RUNNING/PENDING (Slurm job), FAILED, CANCELLED, latest checkpoint.
status: setup
	@$(PYTHON) launcher.py status --runs runs

# The tiny tokenizer and datasets are built on demand the first time a tiny run needs them.
artifacts/tokenizer/tiny/tokenizer.json:
	$(MAKE) tokenizer TOKENIZER=tiny
artifacts/data/tiny/pretrain_s3/manifest.json: artifacts/tokenizer/tiny/tokenizer.json
	$(MAKE) data DATA=tiny

# The README's first command: the whole pipeline on the tiny config, on CPU.
smoke: setup
	rm -rf runs/tiny runs/smoke && mkdir -p runs/smoke && date +%s > runs/smoke/start
	$(MAKE) pretrain MODEL=tiny HARDWARE=cpu PARALLEL=cpu_fsdp_ep
	$(MAKE) post MODEL=tiny
	$(PYTHON) scripts/smoke_report.py --runs runs --model tiny --out runs/smoke/report.md --start-file runs/smoke/start

clean:
	rm -rf runs outputs multirun

# Any run's metrics as report.md + report.png in that run folder: make report RUN=runs/tiny/pretrain_s1
RUN ?=
.PHONY: report
report: setup
	@test -n "$(RUN)" || { echo "make report: set RUN=runs/<model>/<stage>"; exit 2; }
	$(PYTHON) stages/report.py $(RUN)

# Tokenizer and data (paper 2.3, 3.1). TOKENIZER/DATA pick conf/tokenizer/*.yaml and conf/data/*.yaml.
TOKENIZER ?= tiny
DATA      ?= tiny
.PHONY: tokenizer tokenizer-report data

tokenizer: setup
	$(PYTHON) stages/tokenizer.py tokenizer=$(TOKENIZER) $(ARGS)

tokenizer-report: setup
	$(PYTHON) stages/tokenizer.py tokenizer=$(TOKENIZER) mode=report $(ARGS)

data: setup
	$(PYTHON) stages/curate.py data=$(DATA) $(ARGS)

# Production plan (paper 2.2, 2.3, 3.3-3.5): the scaling-law planner + the time model against
# Table 2 (conf/plan.yaml), and a one-process dry run of a layout's memory and step time on
# torch's fake process group (make dryrun MODEL=axk1_519b HARDWARE=h200_1536 PARALLEL=axk1_pretrain).
.PHONY: plan dryrun
STAGE ?= pretrain_s1
plan: setup
	$(PYTHON) stages/plan.py $(ARGS)

dryrun: setup
	$(PYTHON) stages/dryrun.py stage=$(STAGE) parallelism=$(PARALLEL) $(STAGE_ARGS) hydra.run.dir=. hydra.output_subdir=null \
	  hydra/job_logging=disabled hydra/hydra_logging=disabled

# Hugging Face interop (issue 10): kit DCP checkpoint <-> the released AXK1ForCausalLM layout.
# CKPT: a DCP checkpoint, a run directory or a stage name (default: the last finished stage of the
# smoke chain); OUT defaults to runs/<model>/hf/<stage>. HF/OUT for import are required.
CKPT ?=
OUT  ?=
HF   ?=
.PHONY: export import

export: setup
	$(PYTHON) stages/export.py model=$(MODEL) $(if $(CKPT),ckpt=$(CKPT)) $(if $(OUT),out=$(OUT)) $(ARGS)

import: setup
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

serve-setup: $(VLLM_VENV)/.installed

serve: setup serve-setup
	$(PYTHON) stages/serve.py model=$(MODEL) $(if $(CKPT),ckpt=$(CKPT)) $(ARGS)

# The prepared check of one GPU node (issue 17; README "On a GPU node"): bench/gpu_step.py's kernel and
# full-width block figures and the tiny pre-training stage killed and resumed, one JSON line; without a
# GPU it stops in one line. PYTHON=... runs it with another interpreter (a lent machine's own torch).
.PHONY: gpu-check gpu-check-bundle
gpu-check:
	@PYTHON=$(or $(PYTHON_GPU),$(PYTHON)) bash scripts/gpu_check.sh

# For a machine without a package index (at most 64 MiB carried): the pure-Python wheels the check
# needs at the lock's pins (torchao's is an abi3 x86-64 wheel; antlr4 4.9.3 is built from its sdist;
# wandb left out) and the kit's tracked files, in $(GPU_BUNDLE)/ (ignored by git). There:
#   pip install --no-index --no-deps wheels/*.whl && pip install --no-deps --no-build-isolation -e kit
#   cd kit && make gpu-check PYTHON_GPU=python3
GPU_BUNDLE ?= gpu_bundle
GPU_BUNDLE_PKGS := torchtitan hydra-core omegaconf antlr4-python3-runtime submitit hydra-submitit-launcher datasets fsspec
gpu-check-bundle: setup
	rm -rf $(GPU_BUNDLE) && mkdir -p $(GPU_BUNDLE)/wheels $(GPU_BUNDLE)/kit
	$(BIN)/pip wheel -q --no-deps -w $(GPU_BUNDLE)/wheels $(foreach p,$(GPU_BUNDLE_PKGS),$$(grep -i '^$(p)==' requirements.lock))
	$(BIN)/pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.12 \
	  --implementation cp -d $(GPU_BUNDLE)/wheels $$(grep -i '^torchao==' requirements.lock)
	git ls-files -z | tar --null -cf - -T - | tar -xf - -C $(GPU_BUNDLE)/kit
	@du -sh $(GPU_BUNDLE) && ls $(GPU_BUNDLE)/wheels
