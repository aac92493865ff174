#!/usr/bin/env bash
# Prepare (here, where PyPI is reachable) the onnxruntime-gpu wheel for the GPU host, which has no
# registry and takes at most 64 MiB per device call: the wheel (~244 MiB) is split into 60 MiB parts,
# one per git-ignored folder .ortgpu1/ .. .ortgpuN/, each with the wheel's name and sha256 beside it.
# Carry one folder per call, back to back (the machine keeps what earlier calls left while it stays
# warm); scripts/gpu_check.sh joins the parts, checks the sha256 and installs the wheel with
# `pip install --target`. The order of calls is in scripts/gpu_prepare.sh. Never commit the parts.
#
#   bash scripts/gpu_ort_parts.sh            # ORT_GPU_VERSION=1.31.1 (CUDA 13, cuDNN 9: the H200 image's)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${ORT_GPU_VERSION:-1.31.1}"
PY="${PYTHON:-python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$TMP" "onnxruntime-gpu==$VERSION"
WHEEL="$(cd "$TMP" && ls onnxruntime_gpu-*.whl)"
SHA="$(sha256sum "$TMP/$WHEEL" | cut -d' ' -f1)"
rm -rf .ortgpu[0-9]*
(cd "$TMP" && split -b 60M -d -a 1 "$WHEEL" part.)
n=0
for part in "$TMP"/part.*; do
  n=$((n + 1))
  mkdir -p ".ortgpu$n"
  mv "$part" ".ortgpu$n/$WHEEL.part$((n - 1))"
done
for d in .ortgpu[0-9]*; do
  printf '%s  %s\n' "$SHA" "$WHEEL" > "$d/wheel.sha256"
  echo "$n" > "$d/parts"
done
git check-ignore -q .ortgpu1 || { echo "error: .ortgpu1/ is not git-ignored" >&2; exit 1; }
du -sh .ortgpu[0-9]*
echo "$WHEEL sha256 $SHA in $n parts"
