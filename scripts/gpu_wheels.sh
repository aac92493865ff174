#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels the GPU host lacks for scripts/gpu_check.sh's
# benchmark, into .whl/ (git-ignored; pass it to the device run in `carry`). The GPU host has torch,
# transformers, tokenizers, huggingface-hub, safetensors, regex, requests, pillow, numpy, filelock,
# but no diffusers, no scipy and no CLIP BPE vocabulary (~44 MB in all).
#
#   bash scripts/gpu_wheels.sh [DEST]          # default DEST: .whl
#
#   diffusers==0.42.1       what the export side is tested with; its Requires-Dist are all on the host
#                           except importlib_metadata, which it imports on Python < 3.8 only
#   clip-anytorch==2.6.0    only for bpe_simple_vocab_16e6.txt.gz (the real CLIP tokenizer; toy.py)
#   scipy==1.17.1           diffusers' LMSDiscreteScheduler (the paper's sampler) needs it; cp312 binary, ~35 MB
#   huggingface-hub==1.33.0 fallback only: diffusers 0.42.1 needs hub >= 1.32; gpu_check.sh installs it
#                           when `import diffusers` fails with the host's own hub (1.x keeps transformers 5.17 happy)
#   onnx-graphsurgeon==0.6.1 the export's constant folding and clean-up (bundles are built on the GPU host:
#                           scripts/gpu_prepare.sh); pure Python, needs only onnx and numpy
# onnxruntime-gpu is too big for one call: scripts/gpu_ort_parts.sh splits it into .ortgpu*/ folders.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$DEST" \
  diffusers==0.42.1 clip-anytorch==2.6.0 huggingface-hub==1.33.0 scipy==1.17.1 onnx-graphsurgeon==0.6.1
ls -l "$DEST"
du -sh "$DEST"
