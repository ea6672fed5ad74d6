# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch; asking pip for a bare "torch" would pull the CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Loopback by default: plain HTTP never leaves the machine unless asked (README, "Quick start").
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
TRAIN_ARGS ?=
# FP32 is the CPU default: the operating point the page states was measured on FP32. INT8 now
# agrees with it on 99.0 % of photographs (docs/quantization.md) but on an AVX2-only CPU is no
# faster; ANEMIA_PRECISION=int8 serves the smaller engine (faster on VNNI CPUs).
SERVE_PRECISION := $(or $(ANEMIA_PRECISION),fp32)

export HOST PORT

.PHONY: serve prepare test train engines clean peers-venv bench

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

# The shipped model and what the model card reports, from the data to the INT8 twin (docs in
# models/MODEL_CARD.md): duplicate clusters -> grouped 5-fold CV + final fit (resumes from runs/)
# -> Platt calibration and the operating point folded into the served ONNX -> its INT8 Q/DQ twin
# -> shape-shortcut check -> the card's tables (models/cv/report.md).
UNCALIBRATED_MODEL := runs/final/uncalibrated.onnx
TARGET_SENSITIVITY ?= 0.9
train: $(VENV)/.dev-installed
	$(PY) -m training.duplicates
	$(PY) -m training.train --output $(UNCALIBRATED_MODEL) $(TRAIN_ARGS)
	$(PY) -m training.calibration apply --model $(UNCALIBRATED_MODEL) --oof models/cv/oof_predictions.csv \
		--val models/cv/val_predictions.csv --clusters models/cv/duplicate_clusters.json \
		--target-sensitivity $(TARGET_SENSITIVITY) --out models/anemia_mobilenetv2.onnx \
		--report models/cv/calibration.json --plot models/reliability.png
	$(PY) build_engines.py quantize --model models/anemia_mobilenetv2.onnx
	$(PY) -m training.shortcut
	$(PY) -m training.report > models/cv/report.md

clean:
	rm -rf $(VENV) engines/*.onnx engines/*.engine engines/manifest.json .pytest_cache .mypy_cache

# --- benchmarks (docs/benchmarks.md) ---------------------------------------------------------
PEERS_VENV ?= .venv-peers
BENCH_OUT ?= benchmarks/results
# Model for `make bench`: the trained model when present, else the same-architecture stand-in.
BENCH_MODEL ?= $(if $(wildcard models/anemia_mobilenetv2.onnx),models/anemia_mobilenetv2.onnx,build/bench/anemia_mobilenetv2_standin.onnx)
# a snapshot, so the model cannot change under a run
BENCH_RUN_MODEL = build/bench/run/anemia_mobilenetv2.onnx

# BentoML and LitServe in their own venv so their pins never move the project's.
$(PEERS_VENV)/.installed: benchmarks/peers/requirements.txt pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet -r benchmarks/peers/requirements.txt
	$(PEERS_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

peers-venv: $(PEERS_VENV)/.installed

build/bench/anemia_mobilenetv2_standin.onnx: | $(VENV)/.dev-installed
	$(PY) -m benchmarks.standin_model --int8

bench: $(VENV)/.dev-installed $(PEERS_VENV)/.installed $(BENCH_MODEL)
	rm -rf build/bench/run && mkdir -p build/bench/run
	cp $(BENCH_MODEL) build/bench/run/anemia_mobilenetv2.onnx
	cp $(BENCH_MODEL:.onnx=.int8.onnx) build/bench/run/anemia_mobilenetv2.int8.onnx 2>/dev/null || true
	$(PY) build_engines.py --model $(BENCH_RUN_MODEL) --engine-dir build/bench/run/engines --precision int4 --int4-rounding rtn
	$(PY) -m benchmarks.inference --model $(BENCH_RUN_MODEL) --build --threads 1 --cpus 0 --out-json $(BENCH_OUT)/inference_1thread.json --out-md $(BENCH_OUT)/inference_1thread.md
	$(PY) -m benchmarks.inference --model $(BENCH_RUN_MODEL) --threads 2 --cpus 0,1 --out-json $(BENCH_OUT)/inference_2threads.json --out-md $(BENCH_OUT)/inference_2threads.md
	$(PY) -m benchmarks.load --model $(BENCH_RUN_MODEL) --precision int8 --requests-per-connection 12 --out-dir $(BENCH_OUT)/pinned_int8 --plot docs/images/benchmark_load_pinned_int8.png
	$(PY) -m benchmarks.load --model $(BENCH_RUN_MODEL) --precision fp32 --servers ours,plain,ours-batch-on --requests-per-connection 12 --out-dir $(BENCH_OUT)/pinned_fp32 --plot docs/images/benchmark_load_pinned_fp32.png
	$(PY) -m benchmarks.load --model $(BENCH_RUN_MODEL) --precision int8 --requests-per-connection 12 --server-cpus 0,1 --client-cpus 0,1 --threads 2 --out-dir $(BENCH_OUT)/shared_int8 --plot docs/images/benchmark_load_shared_int8.png
	$(PY) -m benchmarks.load --model $(BENCH_RUN_MODEL) --precision int8 --servers ours,plain,ours-batch-on --ours-spinning false --requests-per-connection 12 --server-cpus 0,1 --client-cpus 0,1 --threads 2 --out-dir $(BENCH_OUT)/shared_int8_no_spinning --plot docs/images/benchmark_load_shared_int8_no_spinning.png
	# docs/benchmarks.md section 0: wrk pinned to its own core, servers with their defaults; the per-stage budget (needs wrk and py-spy)
	$(PY) -m benchmarks.wrk_load --model $(BENCH_RUN_MODEL) --engine-dir build/bench/run/engines --servers ours,ours-raw,plain-engine,plain-fp32 --out-dir $(BENCH_OUT)/wrk_int8_final
	$(PY) -m benchmarks.profile_stages --model $(BENCH_RUN_MODEL) --engine-dir build/bench/run/engines --concurrency 16 --out-dir $(BENCH_OUT)/profile_int8_c16