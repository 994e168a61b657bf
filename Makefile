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
export PYTHONPATH := $(CURDIR)
export OMP_NUM_THREADS ?= 1

.PHONY: setup test smoke pretrain params bench clean

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/pytest -q tests

params: setup
	$(PYTHON) -m model --model $(MODEL)

clean:
	rm -rf runs outputs multirun

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
