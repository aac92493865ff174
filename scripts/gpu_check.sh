#!/usr/bin/env bash
# GPU checks of elite-export, for a person (or a lent machine) with an NVIDIA GPU. One run, < 5 min.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default: $OUT, else ./gpu_check_out
#   PYTHON=python3.12 BENCH_ARGS="--device cuda --json x.json" bash scripts/gpu_check.sh
#
# Stages (each is timed and reported; a failing stage does not stop the others; the script exits 1
# if any stage failed; every stage's output is in OUT_DIR/<stage>.log):
#   env          nvidia-smi, python, torch/CUDA, whether TensorRT and cuda-python import
#   wheels       the carried .whl/ wheels the host lacks (diffusers, CLIP's BPE vocabulary; made by
#                scripts/gpu_wheels.sh) into $SITE, which is on PYTHONPATH
#   install      elite_export importable without installing: the repo's folders linked into $SHIM as
#                pyproject maps them (runtime/ -> elite_export.runtime, ...); $SHIM is on PYTHONPATH
#   cuda         tests/test_cuda_device_gpu.py: cuda-python buffers, CUDA graphs, TrtRunner's logic
# With TensorRT (python -c 'import tensorrt'):
#   bundle       elite-export build --toy --precision fp32,fp16 --backend tensorrt -o OUT_DIR/bundle
#   run-<b>      elite-run on a concept image with --backend tensorrt, onnxruntime, torch (--json)
#   parity       image parity table of tensorrt vs the others, and per-stage timings (gpu_parity.py)
#   graphs       polygraphy TensorRT vs ONNX Runtime on each fp16 graph with the spec's tolerance
# Without TensorRT (it says so), the GPU checks that do not need it:
#   attention    scripts/gpu_attention_bench.py --json OUT_DIR/attention.json (Triton kernel error/timing)
#   bench        python -m elite_export.bench $BENCH_ARGS: SD 1.4-size random models made on the GPU,
#                (a) the authors' loop and (b) the batched reference, fp16, 512 px (OUT_DIR/bench.json, .md)
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-290}"
SITE="${SITE:-/tmp/elite-site}"  # carried wheels installed here
SHIM="${SHIM:-/tmp/elite-shim}"  # elite_export as links to the repo's folders
export PYTHONPATH="$SITE:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1  # keep the working directory off sys.path: the checkout's bare elite_export/ would hide $SHIM's
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
for name in ("torch", "triton", "tensorrt", "cuda.bindings", "onnxruntime", "polygraphy", "diffusers",
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

install_wheels() {  # the carried wheels the host lacks -> $SITE; the carried hub only if diffusers needs it
  if has_module diffusers && has_module scipy \
      && "$PY" -c 'import importlib.metadata as m; m.distribution("clip-anytorch")' 2>/dev/null; then
    echo "diffusers, scipy and clip-anytorch (CLIP's BPE vocabulary) present"; return 0
  fi
  if [[ ! -d .whl ]]; then echo "no .whl/ folder (bash scripts/gpu_wheels.sh makes it; carry it)"; return 99; fi
  local pip=("$PY" -m pip install -q --no-index --no-deps --upgrade --target "$SITE")
  "${pip[@]}" .whl/diffusers-*.whl .whl/clip_anytorch-*.whl || return 1
  has_module scipy || "${pip[@]}" .whl/scipy-*.whl || return 1  # diffusers' LMS scheduler
  local err
  if ! err=$("$PY" -c 'import diffusers.models' 2>&1); then
    echo "${err##*$'\n'}"
    echo "diffusers does not import with this host's huggingface-hub: adding the carried one"
    "${pip[@]}" .whl/huggingface_hub-*.whl || return 1
  fi
  "$PY" -c 'import diffusers.models as d, huggingface_hub as h; print("diffusers", d.__file__, "hub", h.__version__)'
}

install_if_needed() {  # no pip install: links, as pyproject's package-dir maps the folders
  if "$PY" -c 'import elite_export.engines.cache' 2>/dev/null; then echo "elite_export importable"; return 0; fi
  mkdir -p "$SHIM/elite_export"
  ln -sfn "$PWD"/elite_export/*.py "$SHIM/elite_export/"
  for d in runtime engines calib; do ln -sfn "$PWD/$d" "$SHIM/elite_export/$d"; done
  "$PY" -c 'import elite_export.engines.cache, elite_export.runtime.pipeline as p; print("elite_export:", p.__file__)'
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

export PY OUT_DIR SITE SHIM
# timeout runs them in bash -c
export -f has_module elite_export elite_run env_report install_wheels install_if_needed cuda_tests run_backend

run_stage env 30 env_report
run_stage wheels 60 install_wheels
run_stage install 30 install_if_needed
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
    run_stage bench 150 "$PY" -m elite_export.bench ${BENCH_ARGS:---device cuda --ways authors,reference \
      --json $OUT_DIR/bench.json --markdown $OUT_DIR/bench.md}
  else
    SUMMARY+=("$(printf '%-16s SKIPPED (no elite_export.bench module)' bench)")
  fi
fi

echo "=== summary ($OUT_DIR) ==="
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT_DIR/summary.txt"
(( FAILED == 0 ))
