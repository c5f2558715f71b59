# The two Quickstart commands: `make run` and `make test`. Each installs what it needs into a
# local virtual environment first (once; re-run when pyproject.toml changes).
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch on CPU machines; a bare `torch` requirement pulls several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/local-tiny.yaml
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cai-ray-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install run test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# DeepSpeed builds from source and imports torch in setup.py: build against the torch above.
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.15"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/cai-ray run $(CONFIG)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
