#!/usr/bin/env bash
# GPU checks of elite-export, for a person (or a lent machine) with an NVIDIA GPU. One run, < 6 min.
# On a lent H200: the device calls of scripts/gpu_prepare.sh first (they carry onnxruntime-gpu in parts
# and build the bundles in the background); this is the last of them.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default: $OUT, else ./gpu_check_out
#
# Stages (each timed and bounded; a failing stage does not stop the others; exit 1 if any failed):
#   env          nvidia-smi, python, torch/CUDA, what imports
#   wheels       the carried .whl/ wheels the host lacks (diffusers, scipy, onnx-graphsurgeon, CLIP's BPE) -> $SITE
#   ortgpu       the carried onnxruntime-gpu parts joined, sha256 checked, installed -> $SITE; one GPU session
#   install      elite_export importable without installing (the repo's folders linked into $SHIM)
#   cuda         tests/test_cuda_device_gpu.py: cuda-python buffers, CUDA graphs, TrtRunner's logic
#   bundles      the toy bundles (gpu_prepare.sh builds them; built here if it never ran)
#   ort-tests    tests/test_ort_cuda_gpu.py: the CUDA kernels vs the CPU tests' numpy semantics, the device
#                runner, CUDA graphs, the cuda variant of every toy graph
#   parity       scripts/gpu_ort_parity.py: every toy graph (cuda, fp16) within the spec's fp16 tolerance of
#                fp32; images at 20 and 100 steps, PSNR >= 35 dB vs the fp32 CPU runtime; CUDA graph vs not
#   bench-ab     elite-export bench: (a) authors, (b) reference; SD 1.4 sizes, fp16, 512 px, 1 request + CFG,
#                20 steps LMS and DPM++
#   sd14         waits for the SD-size bundle (gpu_prepare.sh)
#   bench-c      (c) the runtime on ORT-CUDA, with and without the UNet step as a CUDA graph
#   bench-b2     (b') the reference with its UNet under torch.compile(mode="reduce-overhead"): last, its
#                compile is the slowest thing here
# With TensorRT (python -c 'import tensorrt'), also the engine stages of before (trt-*: engines of the toy
# bundle, elite-run on tensorrt/onnxruntime/torch and their image parity, polygraphy per graph); with ATTENTION=1 the
# Triton attention kernel's table (scripts/gpu_attention_bench.py).
# OUT_DIR gets at most 8 files (what a device call brings back): summary.txt, bench.json, bench.md,
# parity.json, parity.md, logs.tar.gz (every stage's log).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
source scripts/gpu_env.sh
BUDGET_S="${BUDGET_S:-345}"
BENCH_REPS="${BENCH_REPS:---warmup 2 --reps 5}"
DEADLINE=$(( $(date +%s) + BUDGET_S ))
LOGS="$WORK/logs"
mkdir -p "$OUT_DIR" "$LOGS"
SUMMARY=()
FAILED=0

# run_stage NAME TIMEOUT_S CMD...: CMD (a program or an exported function), its output in LOGS/NAME.log and
# on screen, bounded by TIMEOUT_S and what is left of the budget. Exit code 99 from CMD means "skipped".
run_stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left < 10 )); then SUMMARY+=("$(printf '%-12s SKIPPED (time budget spent)' "$name")"); return 0; fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s) ==="
  local start=$(date +%s) rc
  timeout --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - start ))
  if (( rc == 0 )); then SUMMARY+=("$(printf '%-12s ok      %4ss' "$name" "$took")")
  elif (( rc == 99 )); then SUMMARY+=("$(printf '%-12s SKIPPED %4ss  (see logs/%s.log)' "$name" "$took" "$name")")
  else
    FAILED=$(( FAILED + 1 ))
    local why="rc $rc"; (( rc == 124 || rc == 137 )) && why="timed out"
    SUMMARY+=("$(printf '%-12s FAILED  %4ss  (%s; see logs/%s.log)' "$name" "$took" "$why" "$name")")
  fi
  return 0
}

has_tensorrt() { "$PY" -c 'import tensorrt; tensorrt.Builder' >/dev/null 2>&1; }

env_report() {
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || true
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "triton", "tensorrt", "cuda.bindings", "onnxruntime", "onnx", "onnxscript", "diffusers",
             "transformers", "huggingface_hub"):
    try:
        m = importlib.import_module(name)
        extra = f" cuda {m.version.cuda} available {m.cuda.is_available()}" if name == "torch" else ""
        extra += " (type stubs only: no TensorRT)" if name == "tensorrt" and not hasattr(m, "Builder") else ""
        print(f"{name:<14}{getattr(m, '__version__', 'present')}{extra}")
    except Exception as e:  # report, never stop
        print(f"{name:<14}absent ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
EOF
}

cuda_tests() {  # pytest's 5 = nothing ran: no cuda-python or no GPU (the log says which)
  "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda_device_gpu.py
  local rc=$?; (( rc == 5 )) && return 99; return $rc
}

wait_for() {  # wait_for NAME...: until WORK/NAME.rc exists for each (gpu_prepare.sh's builds); their rc
  local name
  for name in "$@"; do
    if [[ ! -f "$WORK/$name.log" ]]; then echo "$name: never started (run scripts/gpu_prepare.sh start first)"; return 1; fi
    while [[ ! -f "$WORK/$name.rc" ]]; do sleep 3; done
    echo "$name: rc $(cat "$WORK/$name.rc")"; tail -5 "$WORK/$name.log"
    [[ "$(cat "$WORK/$name.rc")" == 0 ]] || return 1
  done
}

toy_bundles() {  # gpu_prepare.sh's toy builds, or the same here when it never ran
  if [[ ! -f "$WORK/toy.log" ]]; then  # (the logs made first: wait_for reads them; nothing holds tee's pipe)
    : > "$WORK/toy.log"; : > "$WORK/toy-static.log"
    ( elite_export build --toy --precision fp32,fp16,cuda -o "$WORK/toy"; echo $? > "$WORK/toy.rc" ) \
      > "$WORK/toy.log" 2>&1 < /dev/null &
    ( elite_export build --toy --precision fp32,cuda --static --batch 1 1 1 --size 256 256 256 -o "$WORK/toy-static"
      echo $? > "$WORK/toy-static.rc" ) > "$WORK/toy-static.log" 2>&1 < /dev/null &
  fi
  wait_for toy toy-static
}

ort_tests() {
  ELITE_GPU_WORK="$WORK" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_ort_cuda_gpu.py
  local rc=$?; (( rc == 5 )) && return 99; return $rc
}

run_backend() {  # run_backend BACKEND: elite-run on the TensorRT toy bundle, JSON on stdout -> WORK/trt-runs/BACKEND.json
  local b=$1 runs="$WORK/trt-runs"
  mkdir -p "$runs"
  elite_run --bundle "$WORK/trt" --image calib/concepts/7.jpg --mask calib/concepts/7_bg.png \
    --prompt "a photo of a S" --backend "$b" -o "$runs/$b" --json > "$runs/$b.json"
  local rc=$?; cat "$runs/$b.json"; return $rc
}

bench() {  # bench JSON ARGS...: elite-export bench on CUDA, its result (written after each way) to WORK/JSON
  local json=$1; shift
  # shellcheck disable=SC2086  # BENCH_REPS is a list of words
  "$PY" -m elite_export.bench --device cuda --size 512 --steps 20 --schedulers lms,dpm++ $BENCH_REPS \
    --json "$WORK/$json" "$@"
}

export PY OUT_DIR SITE SHIM WORK BENCH_REPS
export -f has_module elite_export elite_run env_report install_wheels install_if_needed ort_gpu_ready install_ort_gpu \
  cuda_tests wait_for toy_bundles ort_tests run_backend bench

run_stage env 30 env_report
run_stage wheels 60 install_wheels
run_stage ortgpu 90 install_ort_gpu
run_stage install 30 install_if_needed
run_stage cuda 60 cuda_tests
run_stage bundles 150 toy_bundles
run_stage ort-tests 90 ort_tests
run_stage parity 100 "$PY" scripts/gpu_ort_parity.py "$WORK" --json "$OUT_DIR/parity.json" --markdown "$OUT_DIR/parity.md"
if has_tensorrt; then  # the engine stages of before, on the toy bundle: TensorRT vs ONNX Runtime vs torch
  run_stage trt-bundle 150 elite_export build --toy --precision fp32,fp16 --backend tensorrt -o "$WORK/trt"
  for b in tensorrt onnxruntime torch; do run_stage "trt-run-$b" 60 run_backend "$b"; done
  run_stage trt-parity 20 "$PY" scripts/gpu_parity.py images "$WORK/trt-runs" tensorrt onnxruntime torch
  run_stage trt-graphs 120 "$PY" scripts/gpu_parity.py graphs "$WORK/trt"
fi
if [[ "${ATTENTION:-0}" == 1 ]]; then  # the Triton ELITE attention kernel's error/timing table (issue 7)
  run_stage attention 120 "$PY" scripts/gpu_attention_bench.py --json "$WORK/attention.json"
fi
rm -f "$WORK"/bench-*.json
run_stage bench-ab 120 bench bench-ab.json --ways authors,reference
run_stage sd14 150 wait_for sd14
run_stage bench-c 150 bench bench-c.json --ways runtime --bundle "$WORK/sd14"
run_stage bench-b2 240 bench bench-b2.json --ways compiled

# the tables: one result from the parts that ran (each part's JSON holds the ways it finished)
"$PY" -m elite_export.bench.report "$WORK"/bench-*.json --json "$OUT_DIR/bench.json" > "$OUT_DIR/bench.md" 2> "$LOGS/report.log" \
  || echo "no benchmark result to report (see logs)" | tee "$OUT_DIR/bench.md"
echo "=== summary ($OUT_DIR) ==="
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT_DIR/summary.txt"
tar czf "$OUT_DIR/logs.tar.gz" -C "$WORK" logs $(cd "$WORK" && ls ./*.log 2>/dev/null) 2>/dev/null
cat "$OUT_DIR/bench.md" "$OUT_DIR/parity.md" 2>/dev/null | tail -c 6000
(( FAILED == 0 ))
