"""Parity of the bundle graphs on ONNX Runtime's CUDA provider: gpu_check.sh's `parity` stage (needs
onnxruntime-gpu and a GPU; torch-free, like the runtime). Bundles from scripts/gpu_prepare.sh.

    python scripts/gpu_ort_parity.py WORK --json OUT/parity.json --markdown OUT/parity.md

graphs  every graph of WORK/toy in its cuda and fp16 precisions on ORT-CUDA against its fp32 graph on
        ORT-CPU, on the spec's sample inputs at the range's smallest and a larger non-square point: max abs,
        max rel, and pass/fail against the spec's fp16 tolerance
images  the runtime end to end on WORK/toy, ORT-CUDA (its cuda graphs) against ORT-CPU fp32, 20 and 100 LMS
        steps: PSNR >= 35 dB; WORK/toy-static with the UNet step as a CUDA graph against the same without
        (max abs, uint8) and against ORT-CPU fp32 (PSNR)
sd14    where WORK/sd14 is built: its UNet's cuda variant against its fp32 graph, both on ORT-CUDA with TF32
        off, on one sample (random weights: reported, not judged)
The JSON and markdown are rewritten after each part; exit 1 when a judged row fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

PSNR_MIN = 35.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def graph_rows(root: str, device: str) -> list[dict]:
    from elite_export.runtime.backends import OrtRunner
    from elite_export.runtime.bundle import Bundle
    from elite_export.runtime.ort_device import OrtDeviceRunner

    bundle, rows = Bundle.open(root), []
    r = bundle.ranges
    points = [("min", r.batch[0], r.size[0], r.size[0]), ("non-square", min(2, r.batch[2]), r.size[1], r.size[0])]
    for name in bundle.manifest["graphs"]:
        spec, tol = bundle.spec(name), bundle.spec(name).tolerance["fp16"]
        cpu = OrtRunner(spec, bundle.graph_path(name, "fp32"))
        gpus = {p: OrtDeviceRunner(spec, bundle.graph_path(name, p), device)  # (--device cpu: fp16 only)
                for p in ("cuda", "fp16") if p in bundle.manifest["graphs"][name]["files"] and (device, p) != ("cpu", "cuda")}
        for i, (label, b, h, w) in enumerate(points):
            dims = spec.dims(b, h, w, spec.k_range[0] if i == 0 else spec.k_range[2])
            inputs = spec.sample_inputs(dims, seed=i)
            want = {k: v.copy() for k, v in cpu.run(inputs, dims).items()}
            for precision, runner in gpus.items():
                got = runner.run(inputs, dims)
                for out, exp in want.items():
                    diff = np.abs(got[out].astype(np.float64) - exp)
                    rows.append({"graph": name, "output": out, "precision": precision, "case": f"{label} b{b} {h}x{w}",
                                 "max_abs": float(diff.max()), "max_rel": float(diff.max() / max(np.abs(exp).max(), 1e-30)),
                                 "finite": bool(np.isfinite(got[out]).all()),
                                 "passed": bool(np.isfinite(got[out]).all() and tol.passes(got[out], exp)),
                                 "tolerance": f"{tol.atol:g}+{tol.rtol:g}|x|"})
    return rows


def generate(root: str, device: str, steps: int, cuda_graph: bool = False, size: int = 256):
    from elite_export.calib import calibration_set
    from elite_export.runtime.bundle import Bundle
    from elite_export.runtime.pipeline import RuntimePipeline, open_runners
    from elite_export.runtime.preprocess import load_concept
    from elite_export.runtime.requests import GenerationSettings, Request

    bundle = Bundle.open(root)
    pipe = RuntimePipeline(bundle, open_runners(bundle, "onnxruntime", device, cuda_graph=cuda_graph))
    concept = load_concept(*calibration_set().concepts[0])
    t0 = time.perf_counter()
    result = pipe([Request(concept, "a photo of a S", 11)], GenerationSettings(steps=steps, height=size, width=size))
    assert result.ok, result.errors  # a NaN row is a finding, not an image to compare
    return result.images, time.perf_counter() - t0


def image_rows(work: str, device: str) -> list[dict]:
    rows = []
    for steps in (20, 100):
        ref, t_cpu = generate(f"{work}/toy", "cpu", steps)
        got, t_gpu = generate(f"{work}/toy", device, steps)
        p = psnr(got, ref)
        rows.append({"bundle": "toy", "what": f"ORT-CUDA cuda graphs vs ORT-CPU fp32, {steps} LMS steps", "psnr_db": p,
                     "max_abs": int(np.abs(got.astype(int) - ref.astype(int)).max()), "passed": p >= PSNR_MIN,
                     "seconds_cpu": t_cpu, "seconds_cuda": t_gpu})
    if os.path.isfile(f"{work}/toy-static/manifest.json") and device == "cuda":
        ref, _ = generate(f"{work}/toy-static", "cpu", 20)
        plain, _ = generate(f"{work}/toy-static", "cuda", 20)
        graph, _ = generate(f"{work}/toy-static", "cuda", 20, cuda_graph=True)
        d = int(np.abs(graph.astype(int) - plain.astype(int)).max())
        rows.append({"bundle": "toy-static", "what": "UNet as a CUDA graph vs without, 20 steps", "max_abs": d,
                     "psnr_db": psnr(graph, plain), "passed": d <= 1})
        p = psnr(graph, ref)
        rows.append({"bundle": "toy-static", "what": "CUDA graph vs ORT-CPU fp32, 20 steps", "psnr_db": p,
                     "max_abs": int(np.abs(graph.astype(int) - ref.astype(int)).max()), "passed": p >= PSNR_MIN})
    return rows


def sd14_rows(work: str) -> list[dict]:
    import onnxruntime as ort

    from elite_export.runtime.bundle import Bundle

    bundle = Bundle.open(f"{work}/sd14")
    spec = bundle.spec("unet")
    r = bundle.ranges
    inputs = spec.sample_inputs(spec.dims(r.batch[1], r.size[1], r.size[1]))
    outs = {}
    for precision in ("fp32", "cuda"):
        session = ort.InferenceSession(bundle.graph_path("unet", precision), providers=[
            ("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"])
        outs[precision] = session.run(None, inputs)[0]
        del session
    diff = np.abs(outs["cuda"].astype(np.float64) - outs["fp32"])
    return [{"graph": "unet (SD 1.4 size, random weights)", "max_abs": float(diff.max()),
             "max_rel": float(diff.max() / np.abs(outs["fp32"]).max()), "finite": bool(np.isfinite(outs["cuda"]).all()),
             "judged": False}]


def markdown(result: dict) -> str:
    lines = [f"### ORT-CUDA parity, {result['date']}", ""]
    if result.get("graphs"):
        lines += ["| graph | output | precision | case | max abs | max rel | tolerance | result |", "|---" * 8 + "|"]
        lines += [f"| {r['graph']} | {r['output']} | {r['precision']} | {r['case']} | {r['max_abs']:.3g} | "
                  f"{r['max_rel']:.3g} | {r['tolerance']} | {'pass' if r['passed'] else 'FAIL'} |" for r in result["graphs"]]
    if result.get("images"):
        lines += ["", "| bundle | images | PSNR dB | max abs (of 255) | result |", "|---" * 5 + "|"]
        lines += [f"| {r['bundle']} | {r['what']} | {r['psnr_db']:.1f} | {r['max_abs']} | "
                  f"{'pass' if r['passed'] else 'FAIL'} |" for r in result["images"]]
    for r in result.get("sd14", []):
        lines += ["", f"- {r['graph']}: cuda variant vs fp32 on ORT-CUDA (TF32 off): max abs {r['max_abs']:.3g}, "
                      f"max rel {r['max_rel']:.3g}, finite {r['finite']}"]
    lines += [f"- {k}: not run ({v})" for k, v in result.get("skipped", {}).items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work")
    ap.add_argument("--json", required=True)
    ap.add_argument("--markdown", required=True)
    ap.add_argument("--device", default="cuda", help="cpu: the script's own check where no GPU is (no cuda graphs)")
    args = ap.parse_args()
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "skipped": {}}

    def write() -> None:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        with open(args.markdown, "w") as f:
            f.write(markdown(result))

    parts = [("graphs", lambda: graph_rows(f"{args.work}/toy", args.device)),
             ("images", lambda: image_rows(args.work, args.device)), ("sd14", lambda: sd14_rows(args.work))]
    for key, make in parts:
        if not os.path.isfile(f"{args.work}/{'sd14' if key == 'sd14' else 'toy'}/manifest.json"):
            result["skipped"][key] = "bundle not built (scripts/gpu_prepare.sh)"
        else:
            result[key] = make()
        write()
    print(markdown(result))
    failed = [r for k in ("graphs", "images") for r in result.get(k, []) if not r["passed"]]
    print(f"{len(failed)} failed" if failed else "every judged row passed")
    return 1 if failed or "graphs" not in result else 0


if __name__ == "__main__":
    from elite_export.errors import EliteError

    try:
        sys.exit(main())
    except EliteError as e:  # no onnxruntime-gpu or GPU, a broken bundle: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
