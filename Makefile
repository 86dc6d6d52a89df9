VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# pytest worker processes: the cores this process may use, at most 4 (each worker holds torch and diffusers)
JOBS ?= $(shell python3 -c "import os; print(min(4, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1))")

.PHONY: demo test test-slow test-cuda bench install

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/steerdiff demo --out out

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n $(JOBS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -n $(JOBS)

test-cuda: $(STAMP)
	$(PY) -m pytest -q -rs tests/test_cuda.py

bench: $(STAMP)
	$(VENV)/bin/steerdiff bench solvers --out out
