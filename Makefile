# All set-up happens here: `make demo` and `make test` work on a fresh clone.
#
# A user whose Python already imports torch (say a CUDA build) keeps it: the
# virtual environment then sees the system's site-packages. Where no torch is
# importable we install torch==2.13.0, which on the project's machines is a CPU
# build on disk (a plain `pip install torch` could pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.memfit-installed

.PHONY: demo test bench mutate install clean

install: $(STAMP)

$(PY):
	if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/memfit demo

# -n auto: one pytest worker per core (pytest-xdist). The HTML page's test loads it in Debian's
# Chromium (tools/install_browser.sh: apt, best effort, once); where it cannot be installed that test skips.
test: $(STAMP)
	bash tools/install_browser.sh $(PY)
	$(PY) -m pytest -q -n auto

# Mutation testing of the core modules with the suite as the oracle (hours on 2 cores; not in CI).
# Always from scratch: mutmut 3.8 reuses which tests cover which function from its last run, and
# after the code changes that map is stale (surviving mutants that a test would now kill).
# The score excludes the mutants listed, with reasons, in tools/equivalent_mutants.toml.
mutate: $(STAMP)
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run; \
	$(PY) tools/mutation_score.py

bench: $(STAMP)
	$(PY) benchmarks/tracker_overhead.py
	$(PY) benchmarks/estimate_speed.py
	$(PY) benchmarks/estimate_accuracy.py
	$(PY) benchmarks/published_figures.py
	$(PY) benchmarks/published_gpu.py
	$(PY) benchmarks/batch_size_search.py
	$(PY) benchmarks/checkpoint_plan.py
	$(PY) benchmarks/plan_speed.py
	$(PY) benchmarks/distributed_overhead.py
	$(PY) benchmarks/distributed_estimate.py
	$(PY) benchmarks/engine_overhead.py
	$(PY) benchmarks/empty_cache.py
	$(PY) benchmarks/explain_speed.py
	$(PY) benchmarks/seed_strategies.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache mutants .hypothesis
