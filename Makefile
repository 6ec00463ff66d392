# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv if it is missing and install the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs
CLIENTS_STAMP := $(VENV)/.installed-clients
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test test-slow lint bench docs clients clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch is named in the same pip command so that the CPU build is used.
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0 -e ".[test,examples,decompositions]"
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0 -e ".[docs]"
	touch $(DOCS_STAMP)

# laplace-torch, cockpit and vivit for tests/test_clients_*.py (skipped when
# absent). torch is named again so that no client pulls another torch build.
$(CLIENTS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0 -e ".[clients]"
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0') and torch.version.cuda is None, torch.__version__"
	touch $(CLIENTS_STAMP)

clients: $(CLIENTS_STAMP)

# tensorly-torch, a baseline of the conv_einsum benchmark only.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0 -e ".[bench]"
	touch $(BENCH_STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# Strict: a broken link or a missing page fails the build (run in CI).
docs: $(DOCS_STAMP)
	$(VENV)/bin/mkdocs build --strict

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check tnbackpack tests examples

bench: $(BENCH_STAMP)
	$(PY) -m tnbackpack.benchmark

clean:
	rm -rf $(VENV) build *.egg-info
