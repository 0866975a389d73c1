# chest-jax: `make demo` runs base -> LoRA -> compare on the CPU presets; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= dev
comma := ,
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

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
