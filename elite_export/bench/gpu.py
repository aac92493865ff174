"""The benchmark's CUDA-only ways (bench.py runs them with --device cuda):

    runtime-onnxruntime-cuda        (c) the runtime on ONNX Runtime's CUDA provider: the bundle's cuda
                                    graphs (else fp16), device-resident I/O (runtime/ort_device.py)
    runtime-onnxruntime-cuda-graph  (c) the same with the UNet step replayed as a CUDA graph (static bundles)
    compiled                        (b') the reference with its UNet under torch.compile(mode="reduce-overhead")

Besides the stage times, for (c): device memory in use above what it was before the sessions opened
(ONNX Runtime allocates outside torch), the UNet's host <-> device bytes per generation, the loop's own
time per step (step - UNet call: scheduler, guidance mix, copies), and the largest difference between the
CUDA-graph variant's images and the plain one's (same seeds). For (b'): the compile time of its first call.
"""
from __future__ import annotations

import gc
import time

import numpy as np

from elite_export.errors import EliteError


def runtime_extras(way, opts) -> dict:
    """Loop time per step and the UNet's copies per generation, from one more generation."""
    from elite_export.runtime.timing import StageTimer

    unet = way.pipe.runners["unet"]
    way.pipe.timer = StageTimer()
    before = getattr(unet, "copied_bytes", 0)
    way.generate()
    copied = getattr(unet, "copied_bytes", 0) - before
    t = way.pipe.timer
    step, call = (t.seconds[k] * 1e3 / t.calls[k] for k in ("step", "unet"))
    return {"loop_ms_per_step": step - call, "unet_call_ms": call, "unet_copied_kib_per_generation": copied / 1024,
            "unet_copied_kib_per_step": copied / 1024 / opts.steps}


def cuda_runtime_ways(opts, bundle, results: dict, unavailable: dict) -> None:
    from elite_export.bench.run import concept, measure_way
    from elite_export.bench.measure import device_used_bytes
    from elite_export.bench.ways import RuntimeWay
    from elite_export.runtime.ort_device import OrtDeviceRunner, graph_precision, open_ort_runners

    plain, graph = "runtime-onnxruntime-cuda", "runtime-onnxruntime-cuda-graph"
    baseline, t0 = device_used_bytes(), time.perf_counter()
    try:
        precision = graph_precision(bundle, "cuda", None)
        runners = open_ort_runners(bundle, "cuda", opts.n_threads, precision)
    except EliteError as e:
        unavailable[plain] = str(e).splitlines()[0][:240]
        return
    images = {}
    try:
        way = RuntimeWay(bundle, runners, opts.workload, concept(), "onnxruntime", plain)
        results[plain] = {**measure_way(way, opts, time.perf_counter() - t0, baseline), "precision": precision,
                          **runtime_extras(way, opts)}
        images[plain] = way.generate().copy()
        if not opts.cuda_graph:
            return
        if not bundle.manifest.get("static"):
            unavailable[graph] = "the bundle is not static (elite-export build --static)"
            return
        runners["unet"].close()  # its session's memory goes back before the graph variant's opens
        gc.collect()
        t0 = time.perf_counter()
        try:
            runners["unet"] = OrtDeviceRunner(bundle.spec("unet"), bundle.graph_path("unet", precision), "cuda",
                                              cuda_graph=True, threads=opts.n_threads)
        except EliteError as e:
            unavailable[graph] = str(e).splitlines()[0][:240]
            return
        way = RuntimeWay(bundle, runners, opts.workload, concept(), "onnxruntime", graph)
        results[graph] = {**measure_way(way, opts, time.perf_counter() - t0, baseline), "precision": precision,
                          **runtime_extras(way, opts)}
        images[graph] = way.generate()
        diff = np.abs(images[graph].astype(int) - images[plain].astype(int))
        results[graph]["images_vs_plain_max_abs"] = int(diff.max())
    finally:
        for r in runners.values():
            r.close()


def compiled_way(models, opts, results: dict) -> None:
    """(b'): the reference with torch.compile(mode="reduce-overhead") on its UNet (the encoders and the VAE,
    ~5 % of a 20-step generation, stay eager). The compile happens in the first call, timed apart."""
    import torch

    from elite_export.bench.run import concept, measure_way
    from elite_export.bench.ways import TorchWay

    with TorchWay(models, opts.workload, concept(), "cuda", torch.float16, authors=False, compiled=True) as way:
        t0 = time.perf_counter()
        way.unet_step()
        way.sync()
        compile_s = time.perf_counter() - t0
        results[way.name] = {**measure_way(way, opts, compile_s), "compile_seconds": round(compile_s, 1),
                             "compiled": "unet (mode=reduce-overhead)"}
