# Everything runs inside .venv, created and filled from pyproject.toml on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: venv demo workflow test test-fast lint typecheck imports unit bench bench-quick clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, as the CPU build (its wheel lies on this machine's disk): resolved together with the
	# rest, pip may pick PyPI's CUDA build of the same version, several GB.
	$(BIN)/pip install --quiet 'torch==2.13.0+cpu' || $(BIN)/pip install --quiet 'torch==2.13.0'
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# A trainer (killed once, resumed) and an evaluator following its checkpoints; TensorBoard logs in the run dir.
workflow: $(STAMP)
	$(BIN)/python examples/workflow.py

lint: $(STAMP)
	$(BIN)/ruff check ckptstore tests benchmarks examples
	$(BIN)/ruff format --check ckptstore tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy ckptstore

# The import contracts in pyproject.toml ([tool.importlinter]).
imports: $(STAMP)
	$(BIN)/lint-imports

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck imports unit

# A quick check while editing (under a minute): `ruff check` and the tests without S3 servers, process
# kills or crash harnesses, multi-process jobs, or slow ones (markers assigned in tests/conftest.py).
# No `ruff format --check`, mypy or lint-imports: `make test` runs everything. On FAST_WORKERS processes
# (pytest-xdist; each collects the tests, importing the frameworks): serially they took 60-70 s on 2 cores.
FAST_MARKERS := not server and not crash and not multiprocess and not slow
FAST_WORKERS ?= 2

test-fast: $(STAMP)
	$(BIN)/ruff check ckptstore tests benchmarks examples
	$(BIN)/python -m pytest -q -n $(FAST_WORKERS) -m "$(FAST_MARKERS)"

# The benchmarks' extra peers (Orbax), on top of the test environment.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run.py

bench-quick: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
