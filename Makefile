# megatron_eff — the targets the README names.
#   make quickstart   venv + tokenizer + preprocessing + tiny LLaMA pretraining on CPU + a generated sample
#   make test         the whole test suite (what CI runs)
#   make lint         ruff
#   make bench        benchmarks that print measured figures
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: venv quickstart test test-fast lint bench clean

BLENDING_HELPER := megatron_eff/data/_blending_indices.so

venv: $(VENV)/.installed $(BLENDING_HELPER)

# torch is installed first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
# The big installs show pip's progress: the first run downloads several hundred MB.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install torch==2.13.0
	$(VENV)/bin/pip install -r requirements-dev.txt
	touch $@

# Megatron's blending index in C, loaded through ctypes (megatron_eff/data/blending_indices.py). Without a
# compiler this prints a warning and exits 0; the Python rule then runs, with the same output, slower.
$(BLENDING_HELPER): megatron_eff/data/blending_indices.c | $(VENV)/.installed
	$(PY) -m megatron_eff.data.blending_indices $@

quickstart: venv
	PY=$(PY) bash examples/quickstart.sh

# Test files are spread over PYTEST_WORKERS processes (pytest-xdist), whole files per worker so that a file's
# module fixtures and the README commands' shared workspace are built once. 2 = the CI machine's cores.
PYTEST_WORKERS ?= 2

test: venv
	$(PY) -m pytest -q --durations=25 -n $(PYTEST_WORKERS) --dist loadfile tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) bench/train_step.py

clean:
	rm -rf work_dirs runs
