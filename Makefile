# The two commands of README.md: `make demo` and `make test`. Both set up .venv first.
PYTHON_BOOTSTRAP ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# torch first, pinned, so that no dependency pulls a CUDA build
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# --force: a second `make demo` replaces demo_out/report.html (the CLI alone refuses to)
demo: $(STAMP)
	$(VENV)/bin/mamba-lrp demo --force

test: $(STAMP)
	$(PYTHON) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PYTHON) benchmarks/bench_mamba_forward.py

clean:
	rm -rf $(VENV) .pytest_cache
