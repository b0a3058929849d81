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
	$(BIN)/pip install -q -c requirements.lock -e '.[dev,all]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/normkd demo

# Two pytest-xdist workers, one per core of the 2-core CI machine (tests/conftest.py gives each one
# thread); work stealing keeps both busy to the end. Not `-n auto`: a container may report the
# host's CPUs rather than its quota. More cores: make test TEST_WORKERS=8. Plain `pytest`: serial.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples tools
	$(BIN)/ruff format --check src tests benchmarks examples tools

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks examples tools
	$(BIN)/ruff format src tests benchmarks examples tools

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# Named semantic mutants vs the test suite, run as `make test` runs it (2 xdist workers; resumable,
# about an hour on 2 cores, one whole suite of it for the equivalent-docstring canary, which must
# survive). A kill is a failing test; one outside the mutant's own tests is confirmed by re-runs
# (else: flaky). benchmarks/results/mutants.md lists each mutant's fate and explains survivors.
mutants: $(STAMP)
	$(BIN)/python tools/mutants.py --workers $(TEST_WORKERS)

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .ruff_cache

# ---- the peer benchmark's own environment, and the GPU checks --------------------------------
.PHONY: bench-env bench-peer gpu-check gpu-data gpu-wheels gpu-carry

# torchdistill, for benchmarks/bench_peer.py only (never a dependency of normkd), in .venv-bench:
# torchdistill 1.1.5 with --no-deps beside the pinned torch pair (it declares cython and scipy but
# imports neither), Accelerate 1.15.0 + psutil 7.2.2 (its one mixed-precision route, whose failure
# the report states), and normkd itself, editable, pinned by requirements.lock. About 2 minutes.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed-stamp
PEER_PINS := torchdistill==1.1.5
PEER_EXTRA := accelerate==1.15.0 psutil==7.2.2

$(BENCH_STAMP): pyproject.toml requirements.lock
	test -x $(BENCH_VENV)/bin/python || $(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q $(TORCH_PINS)
	$(BENCH_VENV)/bin/pip install -q --no-deps $(PEER_PINS)
	$(BENCH_VENV)/bin/pip install -q -c requirements.lock -e '.[plots]' $(PEER_EXTRA)
	touch $(BENCH_STAMP)

bench-env: $(BENCH_STAMP)

# normkd vs torchdistill, side by side (benchmarks/results/peer.md); run it on an idle machine.
bench-peer: $(BENCH_STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BENCH_VENV)/bin/python benchmarks/bench_peer.py

# On a machine with a CUDA GPU: docs/gpu.md. Without one it prints one line and exits 0. It needs
# no install step: .venv's python where there is one, else the machine's python3 (a GPU machine
# with torch; `make gpu-wheels` brings what else normkd needs), normkd from src/.
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_ARGS ?=
gpu-check:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) benchmarks/gpu_check.py $(GPU_ARGS)

# What a remote GPU machine's `carry` brings (gpu-carry/, ignored): 10,000 train + 2,000 test
# images of ../shared's CIFAR-100 (about 37 MB of the 64 MiB that may travel) and pydantic's wheels.
GPU_CARRY := gpu-carry
gpu-data:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) benchmarks/gpu_check.py --pack-data $(GPU_CARRY)/cifar100

gpu-wheels:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) benchmarks/gpu_check.py --pack-wheels $(GPU_CARRY)/wheels

gpu-carry: gpu-data gpu-wheels
