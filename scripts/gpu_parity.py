"""Helpers of scripts/gpu_check.sh (needs numpy and Pillow; `graphs` also polygraphy and TensorRT).

    python scripts/gpu_parity.py images OUT BACKEND...      # parity table of elite-run outputs + timings
    python scripts/gpu_parity.py graphs BUNDLE [GRAPH...]   # polygraphy: TensorRT vs ONNX Runtime per fp16 graph

`images` reads OUT/<backend>/*.png (elite-run -o) and OUT/<backend>.json (elite-run --json on
stdout), compares every backend's images with the first backend's, and lists the numbers found
under timing-like keys of each JSON. `graphs` runs each fp16 graph of the bundle through
`polygraphy run --trt --strongly-typed --onnxrt` with the spec's profile and fp16 tolerance
(graphs holding the attention plugin node are skipped: ONNX Runtime cannot run it).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

TIMING_WORDS = ("time", "second", "_ms", "_s", "latency", "step")


def load_images(folder: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in sorted(glob.glob(f"{folder}/*.png"))]


def timings(node, path: str = "") -> dict[str, float]:
    """Numeric leaves whose key path looks like a timing."""
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in timings(child, f"{path}.{key}" if path else key).items()}
    if isinstance(node, list):
        return {k: v for i, child in enumerate(node) for k, v in timings(child, f"{path}[{i}]").items()}
    is_number = isinstance(node, (int, float)) and not isinstance(node, bool)
    return {path: float(node)} if is_number and any(w in path.lower() for w in TIMING_WORDS) else {}


def image_table(out: str, backends: list[str]) -> int:
    ref_name, ref = backends[0], load_images(os.path.join(out, backends[0]))
    print(f"{'backend':<14}{'vs':<14}{'images':>7}{'max|d|':>9}{'mean|d|':>9}{'PSNR dB':>9}")
    failures = 0
    for name in backends[1:]:
        imgs = load_images(os.path.join(out, name))
        if not imgs or len(imgs) != len(ref) or any(a.shape != b.shape for a, b in zip(imgs, ref)):
            print(f"{name:<14}{ref_name:<14}  cannot compare: {len(imgs)} vs {len(ref)} images or shapes differ")
            failures += 1
            continue
        diff = np.concatenate([np.abs(a - b).ravel() for a, b in zip(imgs, ref)])
        mse = float(np.mean(diff ** 2))
        psnr = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
        print(f"{name:<14}{ref_name:<14}{len(imgs):>7}{diff.max():>9.1f}{diff.mean():>9.3f}{psnr:>9.1f}")
    for name in backends:
        path = os.path.join(out, f"{name}.json")
        try:
            with open(path) as f:
                found = timings(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            print(f"{name}: no timings ({e})")
            continue
        print(f"-- {name} timings --")
        for key, value in found.items():
            print(f"  {key:<48}{value:>12.4f}")
    return failures


def graph_parity(bundle_root: str, names: list[str]) -> int:
    from elite_export.engines.trt_build import engine_profile, uses_attention_plugin
    from elite_export.runtime.bundle import Bundle

    bundle = Bundle.open(bundle_root)
    failures = 0
    for name in names or list(bundle.manifest["graphs"]):
        path, spec = bundle.graph_path(name, "fp16"), bundle.spec(name)
        if uses_attention_plugin(path):
            print(f"{name}: skipped (attention plugin node: ONNX Runtime cannot run it)")
            continue
        profile, tol = engine_profile(spec, bundle.ranges, static=False), spec.tolerance["fp16"]
        shapes = {i: " ".join(f"{n}:{list(p[i])}".replace(" ", "") for n, p in profile.items()) for i in range(3)}
        exe = shutil.which("polygraphy") or os.path.join(os.path.dirname(sys.executable), "polygraphy")
        cmd = [exe, "run", path, "--trt", "--strongly-typed", "--onnxrt",
               "--trt-min-shapes", *shapes[0].split(), "--trt-opt-shapes", *shapes[1].split(),
               "--trt-max-shapes", *shapes[2].split(), "--input-shapes", *shapes[1].split(),
               "--atol", str(tol.atol), "--rtol", str(tol.rtol)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        verdict = "PASSED" if done.returncode == 0 else f"FAILED (rc {done.returncode})"
        print(f"{name}: {verdict}")
        if done.returncode:
            failures += 1
            print("\n".join((done.stdout + done.stderr).splitlines()[-15:]))
    return failures


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("images", "graphs"):
        sys.exit(__doc__)
    if sys.argv[1] == "images":
        sys.exit(1 if image_table(sys.argv[2], sys.argv[3:]) else 0)
    sys.exit(1 if graph_parity(sys.argv[2], sys.argv[3:]) else 0)
