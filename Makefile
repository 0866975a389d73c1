# chest-jax: `make demo` runs base -> LoRA -> compare on the CPU presets; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= dev
comma := ,
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# Huge-page malloc for XLA:CPU's large arrays (chest_jax/hostmem.py): the scripts re-execute themselves with it,
# pytest cannot, so the targets start with it (ignored where glibc is older than 2.35 or absent).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: install test demo bench clean-runs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/python train_base.py --config configs/quick/base.yaml --overwrite --no-progress
	$(BIN)/python train_lora.py --config configs/quick/lora_inf.yaml --overwrite --no-progress
	$(BIN)/python compare.py --config configs/quick/compare.yaml

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --json results/bench.json

clean-runs:
	rm -rf runs results .cache
