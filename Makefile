# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch; asking pip for a bare "torch" would pull the CUDA build.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 0.0.0.0
PORT ?= 8000
PYTEST_ARGS ?=
TRAIN_ARGS ?=
# INT8 is the measured CPU default (docs/quantization.md: within 1 point of FP32, 29 % of its
# size, 1.6x faster on ONNX Runtime). The code's own default stays fp32, which every backend builds.
SERVE_PRECISION := $(or $(ANEMIA_PRECISION),int8)

export HOST PORT

.PHONY: serve prepare test train engines lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.serve-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	# TensorRT's API as .pyi files for mypy; --no-deps because it requires tensorrt itself.
	$(PIP) install --quiet --no-deps "tensorrt-stubs==10.13.0.35.1"
	touch $@ $(VENV)/.serve-installed

serve: $(VENV)/.serve-installed
	ANEMIA_PRECISION=$(SERVE_PRECISION) $(PY) -m service prepare
	exec env ANEMIA_PRECISION=$(SERVE_PRECISION) $(PY) -m service

prepare: $(VENV)/.serve-installed
	ANEMIA_PRECISION=$(SERVE_PRECISION) $(PY) -m service prepare

engines: $(VENV)/.serve-installed
	$(PY) build_engines.py --backend onnxruntime --precision all

test: $(VENV)/.dev-installed
	$(PY) -m pytest $(PYTEST_ARGS)

train: $(VENV)/.dev-installed
	$(PY) -m training.train $(TRAIN_ARGS)

clean:
	rm -rf $(VENV) engines/*.onnx engines/*.engine engines/manifest.json .pytest_cache .mypy_cache
