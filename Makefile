# segcore: two commands do all the set-up on a fresh Linux machine with Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install test test-precision test-load demo lint bench bench-memory clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# torch first, pinned to the CPU build that lies on these machines (any other torch pulls
# a multi-GB CUDA build); then the project with its dev and bench extras.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev,bench]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the tests whose outcome hangs on what --amp/--tile auto detect, run as each kind of CPU
# would decide (SEGCORE_CPU_FEATURES overrides the detected flags; segcore/inference.py)
CPU_KINDS ?= avx2 avx512_bf16 amx
WHY_AMP := import torch; from segcore.inference import choose_precision as c; print(c(torch.device("cpu")).reason)
test-precision: $(STAMP)
	@for kind in $(CPU_KINDS); do \
	  echo "== SEGCORE_CPU_FEATURES=$$kind: $$(SEGCORE_CPU_FEATURES=$$kind $(PY) -c '$(WHY_AMP)')"; \
	  SEGCORE_CPU_FEATURES=$$kind $(PY) -m pytest -q -m precision $(PYTEST_ARGS) || exit 1; \
	done

# the load tests too slow for every run (docs/RELIABILITY.md, item 6): a burst of 20 arrival
# events through the on-arrival deployment across a worker restart (~5 min on 2 cores)
test-load: $(STAMP)
	SEGCORE_LOAD_TESTS=1 $(PY) -m pytest -q -s tests/test_load.py $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m flows.demo $(DEMO_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check segcore flows tests bench

# the harness (bench/): bare model vs segment vs MONAI, then the I/O ceiling; results in
# bench/results/. BENCH_ARGS / IO_ARGS add options, e.g. BENCH_ARGS="--size 8192 --amp bf16".
bench: $(STAMP)
	$(PY) -m bench compare $(BENCH_ARGS)
	$(PY) -m bench io $(IO_ARGS)

bench-memory: $(STAMP)
	$(PY) bench/memory.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
