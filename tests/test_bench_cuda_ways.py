"""The benchmark's CUDA ways where they can run here: (c)'s device-resident runner on the CPU provider
through the same measuring code (stages per scheduler, the UNet's copies per step), the run's flow with
(b') refused on the CPU, and the tables that the GPU run writes (from a result of that shape)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from elite_export.runtime.bundle import Bundle
from elite_export.specs import GRAPH_NAMES


def test_device_runner_way_measures_every_scheduler_and_its_copies(toy_bundle, concept):
    from elite_export.bench.run import BenchOptions, measure_way
    from elite_export.bench.gpu import runtime_extras
    from elite_export.bench.ways import RuntimeWay
    from elite_export.runtime.ort_device import OrtDeviceRunner

    bundle = Bundle.open(str(toy_bundle))
    runners = {n: OrtDeviceRunner(bundle.spec(n), bundle.graph_path(n), "cpu") for n in GRAPH_NAMES}
    opts = BenchOptions(size=256, steps=3, warmup=0, reps=1, schedulers=("lms", "dpm++"))
    way = RuntimeWay(bundle, runners, opts.workload, concept, "onnxruntime", "runtime-onnxruntime-cuda")
    measured = {**measure_way(way, opts, 0.0), **runtime_extras(way, opts)}
    assert set(measured["stages"]) == {"concept_encoder", "text_encoder", "unet_step", "vae_decoder", "generate",
                                       "generate_dpm++"}
    spec = bundle.spec("unet")
    dims = spec.dims(1, 256, 256)
    nbytes = {t.name: int(np.prod(spec.shape(t, dims))) * np.dtype(t.dtype).itemsize for t in spec.inputs + spec.outputs}
    per_step = nbytes["latents"] + nbytes["timestep"] + nbytes["noise_pred"]
    per_generation = sum(nbytes.values()) - per_step + opts.steps * per_step
    assert measured["unet_copied_kib_per_generation"] == per_generation / 1024
    assert measured["loop_ms_per_step"] > 0 and measured["unet_call_ms"] > 0


def test_run_on_the_cpu_refuses_the_compiled_way_and_reports_after_each_way(toy_bundle):
    from elite_export.bench.run import BenchOptions, run_bench

    seen = []
    opts = BenchOptions(size=256, steps=2, warmup=0, reps=1, ways=("compiled", "runtime"), bundle=str(toy_bundle),
                        toy_overhead=False)
    result = run_bench(opts, lambda r: seen.append(sorted(r["ways"])))
    assert "CUDA only" in result["unavailable"]["compiled"]
    assert set(result["ways"]) == {"runtime-onnxruntime"} and seen[0] == ["runtime-onnxruntime"]


def gpu_shaped_result() -> dict:
    def way(ms: float, **extra) -> dict:
        stages = {s: {"median_ms": ms * k, "min_ms": ms * k, "max_ms": ms * k, "reps": 5}
                  for s, k in (("concept_encoder", 1), ("text_encoder", 0.2), ("unet_step", 2), ("vae_decoder", 1),
                               ("generate", 40), ("generate_dpm++", 40))}
        return {"stages": stages, "setup_seconds": 1.0, "peak_rss_gib": 2.0, "peak_device_gib": 3.4, **extra}

    return {"date": "2026-12-03 10:00", "load_average_end": [0.5] * 3,
            "machine": {"cpu": "Xeon", "cores": 16, "memory_gib": 125.9, "threads": 16, "load_average": [0.4] * 3,
                        "gpu": "NVIDIA H200", "cuda": "13.0", "versions": {"torch": "2.11.0", "onnxruntime": "1.31.1"}},
            "options": {"device": "cuda", "size": 512, "batch": 1, "steps": 20, "dtype": "fp16", "warmup": 2,
                        "reps": 5, "schedulers": ["lms", "dpm++"]},
            "ways": {"authors": way(30), "reference": way(17.5), "compiled": way(12, compile_seconds=70.0),
                     "runtime-onnxruntime-cuda": way(6, precision="cuda", loop_ms_per_step=0.05,
                                                     unet_copied_kib_per_step=256.0),
                     "runtime-onnxruntime-cuda-graph": way(5, precision="cuda", images_vs_plain_max_abs=0)},
            "unavailable": {}, "overhead": {}}


def test_gpu_tables(tmp_path):
    from elite_export.bench.report import markdown, text_report

    result = gpu_shaped_result()
    text, md = text_report(result), markdown(result)
    assert "(b') reference, torch.compile" in text and "(c) runtime ORT-CUDA + CUDA graph" in text
    assert "| generate_dpm++ |" in md and "steps (LMS/DPM++)" in text
    assert "c-graph vs b'" in text and "6.00x" in text  # (a) 30 / (c-graph) 5 on every stage
    assert "images_vs_plain_max_abs" in md and "unet_copied_kib_per_step" in md
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    printed = subprocess.run([sys.executable, "-m", "elite_export.bench.report", str(path)], capture_output=True,
                             text=True, check=True).stdout
    assert printed.strip() == md.strip()
