#!/usr/bin/env bash
# GPU checks of elite-export, for a person (or a lent machine) with an NVIDIA GPU. One run, < 5 min.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default: $OUT, else ./gpu_check_out
#   PYTHON=python3.12 BENCH_ARGS="--device cuda --json x.json" bash scripts/gpu_check.sh
#
# Stages (each is timed and reported; a failing stage does not stop the others; the script exits 1
# if any stage failed; every stage's output is in OUT_DIR/<stage>.log):
#   env          nvidia-smi, python, torch/CUDA, whether TensorRT and cuda-python import
#   install      `pip install --no-deps --no-build-isolation -e .` when elite_export is not importable
#   cuda         tests/test_cuda_device_gpu.py: cuda-python buffers, CUDA graphs, TrtRunner's logic
# With TensorRT (python -c 'import tensorrt'):
#   bundle       elite-export build --toy --precision fp32,fp16 --backend tensorrt -o OUT_DIR/bundle
#   run-<b>      elite-run on a concept image with --backend tensorrt, onnxruntime, torch (--json)
#   parity       image parity table of tensorrt vs the others, and per-stage timings (gpu_parity.py)
#   graphs       polygraphy TensorRT vs ONNX Runtime on each fp16 graph with the spec's tolerance
# Without TensorRT (it says so), the GPU checks that do not need it:
#   attention    scripts/gpu_attention_bench.py --json OUT_DIR/attention.json (Triton kernel error/timing)
#   bench        python -m elite_export.bench $BENCH_ARGS, if that module exists
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-290}"
DEADLINE=$(( $(date +%s) + BUDGET_S ))
mkdir -p "$OUT_DIR"
SUMMARY=()
FAILED=0

# run_stage NAME TIMEOUT_S CMD...: runs CMD (a program or an exported function) with its output in
# OUT_DIR/NAME.log (and on screen), bounded by TIMEOUT_S and by what is left of the script's budget.
# Exit code 99 from CMD means "skipped" (said in its log).
run_stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left < 10 )); then SUMMARY+=("$(printf '%-16s SKIPPED (time budget spent)' "$name")"); return 0; fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s) ==="
  local start=$(date +%s) rc
  timeout --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - start ))
  if (( rc == 0 )); then SUMMARY+=("$(printf '%-16s ok      %4ss' "$name" "$took")")
  elif (( rc == 99 )); then SUMMARY+=("$(printf '%-16s SKIPPED %4ss  (see %s/%s.log)' "$name" "$took" "$OUT_DIR" "$name")")
  else
    FAILED=$(( FAILED + 1 ))
    local why="rc $rc"; (( rc == 124 || rc == 137 )) && why="timed out"
    SUMMARY+=("$(printf '%-16s FAILED  %4ss  (%s; see %s/%s.log)' "$name" "$took" "$why" "$OUT_DIR" "$name")")
  fi
  return 0
}

has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
has_tensorrt() { "$PY" -c 'import tensorrt; tensorrt.Builder' >/dev/null 2>&1; }
elite_export() { "$PY" -c 'import sys; from elite_export.cli import main; sys.exit(main())' "$@"; }
elite_run() { "$PY" -c 'import sys; from elite_export.runtime.cli import main; sys.exit(main())' "$@"; }

env_report() {
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || true
  "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "triton", "tensorrt", "cuda.bindings", "onnxruntime", "polygraphy", "diffusers"):
    try:
        m = importlib.import_module(name)
        extra = f" cuda {m.version.cuda} available {m.cuda.is_available()}" if name == "torch" else ""
        extra += " (type stubs only: no TensorRT)" if name == "tensorrt" and not hasattr(m, "Builder") else ""
        print(f"{name:<14}{getattr(m, '__version__', 'present')}{extra}")
    except Exception as e:  # report, never stop
        print(f"{name:<14}absent ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
EOF
}

install_if_needed() {
  if "$PY" -c 'import elite_export.engines.cache' 2>/dev/null; then echo "elite_export importable"; return 0; fi
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
}

cuda_tests() {  # pytest's 5 = nothing ran: no cuda-python or no GPU (the log says which)
  "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda_device_gpu.py
  local rc=$?; (( rc == 5 )) && return 99; return $rc
}

run_backend() {  # run_backend BACKEND: elite-run on the toy bundle, JSON on stdout -> OUT_DIR/BACKEND.json
  local b=$1
  elite_run --bundle "$OUT_DIR/bundle" --image calib/concepts/7.jpg --mask calib/concepts/7_bg.png \
    --prompt "a photo of a S" --backend "$b" -o "$OUT_DIR/$b" --json > "$OUT_DIR/$b.json"
  local rc=$?; cat "$OUT_DIR/$b.json"; return $rc
}

export PY OUT_DIR
export -f has_module elite_export elite_run env_report install_if_needed cuda_tests run_backend  # timeout runs them in bash -c

run_stage env 30 env_report
run_stage install 90 install_if_needed
run_stage cuda 90 cuda_tests

if has_tensorrt; then
  run_stage bundle 150 elite_export build --toy --precision fp32,fp16 --backend tensorrt -o "$OUT_DIR/bundle"
  for b in tensorrt onnxruntime torch; do run_stage "run-$b" 60 run_backend "$b"; done
  run_stage parity 20 "$PY" scripts/gpu_parity.py images "$OUT_DIR" tensorrt onnxruntime torch
  run_stage graphs 120 "$PY" scripts/gpu_parity.py graphs "$OUT_DIR/bundle"
else
  echo "TensorRT is not installed for $PY: skipping engine builds and TensorRT parity;"
  echo "running the GPU checks that do not need it."
  SUMMARY+=("$(printf '%-16s SKIPPED (no TensorRT)' tensorrt)")
  if [[ -f scripts/gpu_attention_bench.py ]]; then
    run_stage attention 120 "$PY" scripts/gpu_attention_bench.py --json "$OUT_DIR/attention.json"
  fi
  if has_module elite_export.bench; then
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
    run_stage bench 90 "$PY" -m elite_export.bench ${BENCH_ARGS:---device cuda --json $OUT_DIR/bench.json}
  else
    SUMMARY+=("$(printf '%-16s SKIPPED (no elite_export.bench module)' bench)")
  fi
fi

echo "=== summary ($OUT_DIR) ==="
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT_DIR/summary.txt"
(( FAILED == 0 ))
