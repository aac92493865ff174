# Sourced by scripts/gpu_check.sh and scripts/gpu_prepare.sh (bash): where things go on the GPU host, and
# the install steps both need. The host has python3 with torch (CUDA 13), onnx, onnxscript, transformers,
# scipy, the nvidia-* CUDA libraries as pip packages, and CPU onnxruntime; no registry. The rest comes
# carried: .whl/ (scripts/gpu_wheels.sh) and onnxruntime-gpu in parts (.ortgpu*/, scripts/gpu_ort_parts.sh).
PY="${PYTHON:-python3}"
SITE="${SITE:-/tmp/elite-site}"  # carried wheels installed here (onnxruntime-gpu shadows the host's onnxruntime)
SHIM="${SHIM:-/tmp/elite-shim}"  # elite_export as links to the repo's folders
WORK="${WORK:-/tmp/elite-gpu}"   # bundles built on the host (gpu_prepare.sh) and their logs
export PYTHONPATH="$SITE:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1  # keep the working directory off sys.path: the checkout's bare elite_export/ would hide $SHIM's
export PYTHONUNBUFFERED=1
mkdir -p "$SITE" "$WORK"

# onnxruntime-gpu dlopens libcudart/libcublas/libcudnn/libcufft/libcurand by soname: the host has them in its
# nvidia-* pip packages (torch's), which are on no library path. The loader reads LD_LIBRARY_PATH at process
# start, so it is set here, before any python runs.
nvidia_lib_dirs() {
  "$PY" - <<'EOF' 2>/dev/null
import glob, os, site
dirs = {d for sp in site.getsitepackages() for d in glob.glob(os.path.join(sp, "nvidia", "**", "lib"), recursive=True)}
print(":".join(sorted(dirs)))
EOF
}
NV_LIBS="$(nvidia_lib_dirs)"
export LD_LIBRARY_PATH="${NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
elite_export() { "$PY" -c 'import sys; from elite_export.cli import main; sys.exit(main())' "$@"; }
elite_run() { "$PY" -c 'import sys; from elite_export.runtime.cli import main; sys.exit(main())' "$@"; }

install_wheels() {  # the carried wheels the host lacks -> $SITE; the carried hub only if diffusers needs it
  if has_module diffusers && has_module scipy && has_module onnx_graphsurgeon \
      && "$PY" -c 'import importlib.metadata as m; m.distribution("clip-anytorch")' 2>/dev/null; then
    echo "diffusers, scipy, onnx-graphsurgeon and clip-anytorch (CLIP's BPE vocabulary) present"; return 0
  fi
  if [[ ! -d .whl ]]; then echo "no .whl/ folder (bash scripts/gpu_wheels.sh makes it; carry it)"; return 99; fi
  local pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE")
  "${pip[@]}" .whl/diffusers-*.whl .whl/clip_anytorch-*.whl || return 1
  has_module onnx_graphsurgeon || "${pip[@]}" .whl/onnx_graphsurgeon-*.whl || return 1
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

ort_gpu_ready() {
  "$PY" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null
}

install_ort_gpu() {  # the carried parts -> the wheel (sha256 checked) -> $SITE; then one session on the GPU
  if ort_gpu_ready; then echo "onnxruntime-gpu already importable"; else
    local first n wheel missing=()
    first=$(ls -d .ortgpu[0-9]* 2>/dev/null | head -1)
    if [[ -z "$first" ]]; then echo "no .ortgpu*/ folders (bash scripts/gpu_ort_parts.sh makes them; carry one per call)"; return 1; fi
    n=$(cat "$first/parts"); wheel=$(cut -d' ' -f3 "$first/wheel.sha256")
    for ((i = 0; i < n; i++)); do [[ -f ".ortgpu$((i + 1))/$wheel.part$i" ]] || missing+=(".ortgpu$((i + 1))"); done
    if ((${#missing[@]})); then
      echo "missing parts: ${missing[*]} (each device call carries one; a machine that went cold between calls lost the earlier ones)"
      return 1
    fi
    for ((i = 0; i < n; i++)); do cat ".ortgpu$((i + 1))/$wheel.part$i"; done > "$WORK/$wheel"
    local want got
    want=$(cut -d' ' -f1 "$first/wheel.sha256"); got=$(sha256sum "$WORK/$wheel" | cut -d' ' -f1)
    if [[ "$got" != "$want" ]]; then echo "sha256 of the joined $wheel is $got, expected $want"; return 1; fi
    echo "$wheel: $n parts joined, sha256 $got as recorded"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WORK/$wheel" || return 1
    rm -f "$WORK/$wheel"
  fi
  "$PY" - <<'EOF'
import numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
s = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(),
                         providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
assert s.get_providers()[0] == "CUDAExecutionProvider", f"the CUDA provider did not start: {s.get_providers()}"
assert (s.run(None, {"x": np.array([-1, 0, 1, 2], np.float32)})[0] == [0, 0, 1, 2]).all()
print("a session ran on", s.get_providers()[0])
EOF
}
