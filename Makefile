# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch/torchvision are pinned as a pair: other pairs fail to import or download gigabytes.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint format bench mutants clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -c requirements.lock -e '.[dev,onnx,timm]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/normkd demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples tools
	$(BIN)/ruff format --check src tests benchmarks examples tools

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks examples tools
	$(BIN)/ruff format src tests benchmarks examples tools

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# Named semantic mutants vs the test suite (resumable; about an hour on 2 cores):
# benchmarks/results/mutants.md lists what the suite kills and explains each survivor.
mutants: $(STAMP)
	$(BIN)/python tools/mutants.py

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .ruff_cache
