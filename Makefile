# The two quick-start commands: `make demo` and `make test`. Both create .venv once and reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint

install: $(STAMP)

# torch is pinned to the CPU build that lies on this machine's disk before the project is
# installed, so that nothing pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/heiindex build --split test
	$(BIN)/heiindex query "a dog on grass"
	$(BIN)/heiindex bench --topk 100

lint: $(STAMP)
	$(BIN)/ruff check heiindex cli tests benchmarks
	$(BIN)/ruff format --check heiindex cli tests benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest
