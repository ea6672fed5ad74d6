#!/usr/bin/env bash
# Acceptance run for a real Jetson (TX2 NX with JetPack 4.6 / TensorRT 8.2, Orin with JetPack 5-6 /
# TensorRT 8.5-10): builds every TensorRT engine, runs the evaluation table and the inference
# benchmark with the server's TensorRT backend, and prints both. Nothing here has run on real
# TensorRT yet (see README, "What ran on real TensorRT"): this script is how that gets done.
#
#   deploy/jetson/acceptance.sh                     # defaults below
#   DATA_DIR=/data/cp-anemic OUT_DIR=/tmp/acc deploy/jetson/acceptance.sh
#
# Needs: the repository, python3 with the service's dependencies, TensorRT's Python bindings and
# pycuda (both ship with JetPack / NVIDIA's images), matplotlib optional (ROC/PR pictures).
# Refusals are part of the result: on a TX2, INT8 (no fast INT8) and INT4 (TensorRT < 10) are
# refused with the reason, and the other precisions are still built and measured.
set -uo pipefail

cd "$(dirname "$0")/../.." || exit 2
PYTHON=${PYTHON:-python3}
MODEL=${ANEMIA_MODEL:-models/anemia_mobilenetv2.onnx}
ENGINE_DIR=${ANEMIA_ENGINE_DIR:-engines}
DATA_DIR=${DATA_DIR:-../shared/data/cp-anemic}
MAX_BATCH=${ANEMIA_MAX_BATCH:-8}
WORKSPACE_MIB=${WORKSPACE_MIB:-256}
OUT_DIR=${OUT_DIR:-acceptance-$(hostname)-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT_DIR"

echo "== environment" | tee "$OUT_DIR/environment.txt"
{
  echo "host: $(hostname)  date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  cat /etc/nv_tegra_release 2>/dev/null || echo "(no /etc/nv_tegra_release: not a Jetson?)"
  "$PYTHON" - <<'PY'
import sys
import tensorrt
import pycuda.driver as cuda
cuda.init()
device = cuda.Device(0)
print("python", sys.version.split()[0], "| tensorrt", tensorrt.__version__, "| GPU", device.name(), "sm_%d%d" % device.compute_capability())
PY
} 2>&1 | tee -a "$OUT_DIR/environment.txt"
"$PYTHON" -c "import tensorrt, pycuda.driver" 2>/dev/null || { echo "TensorRT or pycuda is not importable with $PYTHON"; exit 2; }

echo "== build (every precision; a refusal is reported, not fatal)"
"$PYTHON" build_engines.py --backend tensorrt --precision all --model "$MODEL" --engine-dir "$ENGINE_DIR" \
  --max-batch "$MAX_BATCH" --workspace-mib "$WORKSPACE_MIB" 2>&1 | tee "$OUT_DIR/build.txt"

echo "== evaluation"
if [ -d "$DATA_DIR/Anemic" ] && [ -d "$DATA_DIR/Non-anemic" ]; then
  "$PYTHON" build_engines.py evaluate --mode engines --backend tensorrt --model "$MODEL" --engine-dir "$ENGINE_DIR" \
    --data-dir "$DATA_DIR" --out-dir "$OUT_DIR/evaluation" > "$OUT_DIR/evaluation.txt" 2>&1
  status=$?
  [ $status -eq 0 ] || { cat "$OUT_DIR/evaluation.txt"; echo "evaluation failed ($status)"; }
else
  echo "no labelled images under $DATA_DIR (Anemic/, Non-anemic/): evaluation skipped; set DATA_DIR" | tee "$OUT_DIR/evaluation.txt"
fi

echo "== benchmark"
"$PYTHON" build_engines.py benchmark --backend tensorrt --model "$MODEL" --engine-dir "$ENGINE_DIR" \
  --max-batch "$MAX_BATCH" --json "$OUT_DIR/benchmark.json" > "$OUT_DIR/benchmark.txt" 2>&1

if [ -f benchmarks/inference.py ]; then
  echo "== project inference benchmark (benchmarks/inference.py: every engine, batch 1/8/32, against the CPU floor)"
  # shellcheck disable=SC2086  # BENCH_ARGS is a word list by design (e.g. --smoke)
  "$PYTHON" -m benchmarks.inference --model "$MODEL" --engine-dir "$ENGINE_DIR" --out-md "$OUT_DIR/inference_benchmark.md" \
    ${BENCH_ARGS:-} > "$OUT_DIR/inference_benchmark.txt" 2>&1 || echo "benchmarks/inference.py failed: see $OUT_DIR/inference_benchmark.txt"
fi

echo
echo "================ results ($OUT_DIR) ================"
cat "$OUT_DIR/environment.txt"
echo
if [ -f "$OUT_DIR/evaluation/report.md" ]; then
  # the classification and latency tables, without the long per-layer sections
  sed -n '1,/^## Per-layer/p' "$OUT_DIR/evaluation/report.md" | sed '$d'
else
  cat "$OUT_DIR/evaluation.txt"
fi
echo
cat "$OUT_DIR/benchmark.txt"
if [ -f "$OUT_DIR/inference_benchmark.md" ]; then echo; cat "$OUT_DIR/inference_benchmark.md"; fi
echo
echo "Full report: $OUT_DIR/evaluation/report.md (+ report.json, roc.png, pr.png); engines: $ENGINE_DIR/manifest.json"
