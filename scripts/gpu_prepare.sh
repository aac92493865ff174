#!/usr/bin/env bash
# The device calls before scripts/gpu_check.sh: each carries one part of onnxruntime-gpu (the machine keeps
# what earlier calls left while it stays warm, 30 s after a call: make the calls back to back), and the
# first one also starts, in the background, the bundles gpu_check.sh needs, so that they are built while
# the parts travel instead of inside gpu_check.sh's 6 minutes.
#
# Here, once:   bash scripts/gpu_wheels.sh && bash scripts/gpu_ort_parts.sh      (.whl/, .ortgpu1/ .. .ortgpu5/)
# Device calls, in this order, each right after the previous one returns:
#   1. carry [".whl", ".ortgpu5"]   command: bash scripts/gpu_prepare.sh start       timeout_s 120
#   2. carry [".ortgpu1"]           command: bash scripts/gpu_prepare.sh status      timeout_s 120
#   3. carry [".ortgpu2"]           command: bash scripts/gpu_prepare.sh status      timeout_s 120
#   4. carry [".ortgpu3"]           command: bash scripts/gpu_prepare.sh status      timeout_s 120
#   5. carry [".ortgpu4"]           command: bash scripts/gpu_check.sh               timeout_s 420
# then give_back. gpu_check.sh joins the parts and checks their sha256, waits for the bundles if they are
# still building, and writes its tables to $OUT (bench.json/.md, parity.json/.md, summary.txt, logs.tar.gz).
#
#   bash scripts/gpu_prepare.sh start    install .whl/ into $SITE, link elite_export, start the builds (setsid)
#   bash scripts/gpu_prepare.sh status   what is built, what is carried so far
#   bash scripts/gpu_prepare.sh build    the builds themselves (what `start` runs in the background)
#
# Builds, in $WORK (/tmp/elite-gpu), three at once (exports are mostly one core each; 16 cores, 128 GB):
#   toy/         the toy bundle, dynamic shapes, fp32 + fp16 + cuda                       (~1 min)
#   toy-static/  the toy bundle, static 1 request at 256 px, fp32 + cuda (CUDA graphs)    (~1 min)
#   sd14/        SD 1.4 / ViT-L/14 / ELITE sizes, random weights, static 1 request at 512 px, fp32 + cuda
#                (the benchmark's (c); ~4-5 min: 5 GB of checkpoints, a 3.4 GB fp32 UNet export)
# Each writes WORK/<name>.log and, when done, WORK/<name>.rc (its exit code).
set -u
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh

build_one() {  # build_one NAME ARGS...: elite-export build ARGS -o WORK/NAME, logged, rc recorded
  local name=$1; shift
  ( elite_export build "$@" -o "$WORK/$name"; echo $? > "$WORK/$name.rc" ) > "$WORK/$name.log" 2>&1 < /dev/null &
}

build_sd14() {
  {
    "$PY" -c "from elite_export.sd14 import make_sd14; make_sd14('$WORK/sd14-checkpoints')" &&
    elite_export build --sd "$WORK/sd14-checkpoints/sd" --image-encoder "$WORK/sd14-checkpoints/image_encoder" \
      --global-mapper "$WORK/sd14-checkpoints/global_mapper.pt" --local-mapper "$WORK/sd14-checkpoints/local_mapper.pt" \
      --precision fp32,cuda --static --batch 1 1 1 --size 512 512 512 -o "$WORK/sd14"
  } > "$WORK/sd14.log" 2>&1
  echo $? > "$WORK/sd14.rc"
}

case "${1:-status}" in
  start)
    install_wheels && install_if_needed || { echo "prepare: the carried wheels did not install"; exit 1; }
    rm -f "$WORK"/*.rc
    setsid nohup bash scripts/gpu_prepare.sh build > "$WORK/prepare.log" 2>&1 < /dev/null &
    echo "builds started in the background (setsid): $WORK/{toy,toy-static,sd14}.log"
    ;;
  build)
    build_one toy --toy --precision fp32,fp16,cuda
    build_one toy-static --toy --precision fp32,cuda --static --batch 1 1 1 --size 256 256 256
    build_sd14 < /dev/null &
    wait
    ;;
  status)
    ls -d .ortgpu[0-9]* 2>/dev/null | tr '\n' ' '; echo "(carried parts so far)"
    for name in toy toy-static sd14; do
      if [[ -f "$WORK/$name.rc" ]]; then echo "$name: done, rc $(cat "$WORK/$name.rc")"
      elif [[ -f "$WORK/$name.log" ]]; then echo "$name: building ($(tail -c 200 "$WORK/$name.log" | tr '\r\n' '  ' | tail -c 120))"
      else echo "$name: not started"; fi
    done
    ;;
  *) echo "usage: bash scripts/gpu_prepare.sh start|status|build"; exit 2 ;;
esac
