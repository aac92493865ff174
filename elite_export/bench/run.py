"""`elite-export bench`: ELITE at the real sizes (SD 1.4 UNet and VAE, CLIP ViT-L/14, 1024-wide
mappers; random weights made in code), measured three ways in one process run (see bench/ways.py):
(a) the authors' loop, (b) the batched PyTorch reference, (c) the runtime on ONNX Runtime / TensorRT.

On the CPU the random checkpoints are written once to a cache folder in the released formats and
loaded through load_models; (c) runs an fp32 bundle built from them by `elite-export build`
(content-keyed, so later runs reuse it). On CUDA the models are made directly in memory in fp16
and (c) runs only where a bundle with TensorRT engines is given.

Per stage: warm-up calls, then `reps` timed calls (median, min, max); peak RSS (and device memory)
per way; the runtime's per-step overhead on the SD-size bundle and on the toy bundle.

    elite-export bench --size 256 --steps 4 --json benchmarks/results/cpu.json
    python -m elite_export.bench --device cuda --size 512 --json out.json
"""
from __future__ import annotations

import gc
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from elite_export.bench.measure import PeakMemory, machine, summary, timings
from elite_export.bench.ways import RuntimeWay, TorchWay, Way, Workload, stages
from elite_export.errors import EliteError
from elite_export.runtime.backends import BACKENDS
from elite_export.sd14 import default_cache

WAYS = ("authors", "reference", "compiled", "runtime")  # compiled: (b'), CUDA only


@dataclass(frozen=True)
class BenchOptions:
    size: int = 256  # px
    batch: int = 1  # requests
    steps: int = 4  # of the end-to-end runs
    warmup: int = 1
    reps: int = 3
    threads: int = 0  # torch and ONNX Runtime intra-op threads; 0: one per core
    device: str = "cpu"  # cuda: fp16 PyTorch ways
    ways: tuple[str, ...] = WAYS
    cache: str = field(default_factory=default_cache)
    bundle: str | None = None  # for (c); default: built from the cached checkpoints
    ort_fusion: bool = True  # in the bundle's fp32 graphs (see ort_fusion.py)
    toy_overhead: bool = True
    schedulers: tuple[str, ...] = ("lms",)  # `generate` runs the first; generate_<s> each further one
    cuda_graph: bool = True  # on CUDA: (c) also with the UNet step as a CUDA graph (static bundles)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def n_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    @property
    def workload(self) -> Workload:
        return Workload(self.size, self.batch, self.steps)


def elite_export_cli(*args: str) -> None:
    """`elite-export ARGS` in a child process: an export's memory is not the benchmark's."""
    cmd = [sys.executable, "-c", "import sys; from elite_export.cli import main; sys.exit(main())", *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise EliteError(f"`elite-export {' '.join(args)}` failed:\n{proc.stdout[-3000:]}")


def sd14_paths(cache: str):
    from elite_export.checkpoints import CheckpointPaths
    from elite_export.sd14 import make_sd14

    root = make_sd14(os.path.join(cache, "sd14-random-0"))
    return CheckpointPaths(f"{root}/sd", f"{root}/image_encoder", f"{root}/global_mapper.pt",
                           f"{root}/local_mapper.pt")


def sd14_bundle(opts: BenchOptions, paths) -> str:
    """A static fp32 bundle at the benchmark's size and batch (reused while its inputs are unchanged)."""
    name = f"bundle-sd14-{opts.size}-b{opts.batch}" + ("" if opts.ort_fusion else "-unfused")
    out = os.path.join(opts.cache, name)
    b, s = str(opts.batch), str(opts.size)
    elite_export_cli("build", "--sd", paths.sd, "--image-encoder", paths.image_encoder, "--global-mapper",
                     paths.global_mapper, "--local-mapper", paths.local_mapper, "--precision", "fp32", "--static",
                     "--batch", b, b, b, "--size", s, s, s, "-o", out,
                     *([] if opts.ort_fusion else ["--no-ort-fusion"]))
    return out


def toy_bundle(opts: BenchOptions) -> str:
    out = os.path.join(opts.cache, "bundle-toy" + ("" if opts.ort_fusion else "-unfused"))
    elite_export_cli("build", "--toy", "--precision", "fp32", "-o", out,
                     *([] if opts.ort_fusion else ["--no-ort-fusion"]))
    return out


def concept():
    from elite_export.calib import calibration_set
    from elite_export.runtime.preprocess import load_concept

    return load_concept(*calibration_set().concepts[0])


def measure_way(way: Way, opts: BenchOptions, setup_seconds: float, device_baseline: int | None = None) -> dict:
    """Every stage of `way`: warm-up, reps (median/min/max ms); the way's peak memory (on CUDA: torch's
    peak allocation, or with `device_baseline` the device memory in use above it: ONNX Runtime's)."""
    with PeakMemory(cuda=opts.cuda, device_baseline=device_baseline) as mem:
        times = {s: summary(timings(way.stage(s), opts.warmup, opts.reps, way.sync)) for s in stages(opts.schedulers)}
    print(f"  {way.name}: " + ", ".join(f"{s} {v['median_ms']:.0f} ms" for s, v in times.items()), file=sys.stderr)
    return {"stages": times, "setup_seconds": round(setup_seconds, 1), **mem.to_dict()}


def runtime_overhead(way: RuntimeWay, opts: BenchOptions, runs: int) -> dict:
    """What the runtime adds to the UNet graph per denoising step (ONNX Runtime):
    loop = step - UNet call, timed inside the same steps of `runs` generations (scheduler, guidance, copies);
    call = runner.run - the bare session run on inputs bound once: the median difference over pairs run
    back to back (checks, I/O binding). Below the graph's run-to-run spread it can come out negative."""
    from elite_export.runtime.timing import StageTimer

    bare, call = way.bare_unet(), way.unet_step
    timings(bare, opts.warmup, 0)
    timings(call, opts.warmup, 0)
    pairs = [(timings(bare, 0, 1)[0], timings(call, 0, 1)[0]) for _ in range(max(runs, 5))]
    graph_ms = statistics.median(g for g, _ in pairs) * 1e3
    call_ms = statistics.median(c - g for g, c in pairs) * 1e3
    way.pipe.timer = StageTimer()
    for _ in range(runs):
        way.generate()
    t = way.pipe.timer
    step, in_loop = (t.seconds[k] * 1e3 / t.calls[k] for k in ("step", "unet"))
    overhead = (step - in_loop) + call_ms
    return {"steps": t.calls["step"], "step_ms": step, "unet_call_ms": in_loop, "loop_ms": step - in_loop,
            "graph_ms": graph_ms, "call_overhead_ms": call_ms, "overhead_ms": overhead,
            "overhead_pct": 100 * overhead / step}


def torch_ways(opts: BenchOptions, paths, results: dict, on_result=lambda: None):
    """(a) and (b); returns the models (for (b'), which runs last)."""
    import torch

    from elite_export.checkpoints import load_models
    from elite_export.sd14 import random_sd14_models

    if not set(opts.ways) & ({"authors", "reference", "compiled"} if opts.cuda else {"authors", "reference"}):
        return None
    torch.set_num_threads(opts.n_threads)
    t0 = time.perf_counter()
    if opts.cuda:
        models = random_sd14_models("cuda", torch.float16)
    else:
        models = load_models(paths)
    load_s = time.perf_counter() - t0
    dtype = torch.float16 if opts.cuda else torch.float32
    for name in ("authors", "reference"):
        if name in opts.ways:
            t0 = time.perf_counter()
            with TorchWay(models, opts.workload, concept(), opts.device, dtype, authors=name == "authors") as way:
                results[name] = measure_way(way, opts, load_s + time.perf_counter() - t0)
            on_result()
    gc.collect()
    if opts.cuda:
        torch.cuda.empty_cache()
    return models


def runtime_ways(opts: BenchOptions, bundle_dir: str, results: dict, unavailable: dict) -> dict:
    """(c) on each runtime backend that opens here; returns the ONNX Runtime way's overhead."""
    from elite_export.runtime.bundle import Bundle
    from elite_export.runtime.pipeline import open_runners

    bundle, overhead = Bundle.open(bundle_dir), {}
    if opts.cuda:
        from elite_export.bench.gpu import cuda_runtime_ways

        cuda_runtime_ways(opts, bundle, results, unavailable)
        return overhead
    for backend in BACKENDS:
        t0 = time.perf_counter()
        try:
            runners = open_runners(bundle, backend, "cpu", opts.n_threads)
        except (ImportError, EliteError) as e:
            unavailable[f"runtime-{backend}"] = str(e).splitlines()[0][:200]
            continue
        with RuntimeWay(bundle, runners, opts.workload, concept(), backend) as way:
            results[way.name] = measure_way(way, opts, time.perf_counter() - t0)
            if backend == "onnxruntime":
                overhead = runtime_overhead(way, opts, opts.reps)
    return overhead


def toy_overhead(opts: BenchOptions) -> dict:
    """The runtime's per-step overhead on the toy bundle (tiny graphs: the overhead at its most visible)."""
    from elite_export.runtime.bundle import Bundle
    from elite_export.runtime.pipeline import open_runners

    bundle = Bundle.open(toy_bundle(opts))
    toy = BenchOptions(size=opts.size, batch=opts.batch, steps=20, warmup=2, reps=5, threads=opts.threads)
    with RuntimeWay(bundle, open_runners(bundle, "onnxruntime", "cpu", opts.n_threads), toy.workload, concept(),
                    "onnxruntime") as way:
        way.generate()  # warm-up
        return runtime_overhead(way, toy, toy.reps)


def run_bench(opts: BenchOptions, on_result=lambda result: None) -> dict:
    """Every way asked for; `on_result(result so far)` after each (a killed run keeps what it measured)."""
    if opts.cuda:
        import torch

        if not torch.cuda.is_available():
            raise EliteError("--device cuda needs a CUDA GPU and a CUDA build of torch; this host has neither")
    if opts.cuda and "runtime" in opts.ways and opts.bundle is None:
        opts = BenchOptions(**{**asdict(opts), "ways": tuple(w for w in opts.ways if w != "runtime")})
    started = machine(opts.n_threads, opts.cuda)
    cpu_models = {"authors", "reference"} & set(opts.ways) or ("runtime" in opts.ways and opts.bundle is None)
    paths = sd14_paths(opts.cache) if cpu_models and not opts.cuda else None
    bundle_dir = None
    if "runtime" in opts.ways:
        bundle_dir = opts.bundle or sd14_bundle(opts, paths)
    results, unavailable, overhead = {}, {}, {}
    result = {"benchmark": "elite-ways", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": started,
              "load_average_end": list(os.getloadavg()),
              "options": {k: v for k, v in asdict(opts).items() if k != "cache"} | {"dtype": "fp16" if opts.cuda
                                                                                    else "fp32"},
              "ways": results, "unavailable": unavailable, "overhead": overhead}

    def report() -> None:
        result["load_average_end"] = list(os.getloadavg())
        on_result(result)

    models = torch_ways(opts, paths, results, report)
    if bundle_dir:
        overhead["sd14"] = runtime_ways(opts, bundle_dir, results, unavailable)
        report()
    if "compiled" in opts.ways:
        if opts.cuda:
            from elite_export.bench.gpu import compiled_way

            compiled_way(models, opts, results)
        else:
            unavailable["compiled"] = "CUDA only: torch.compile's reduce-overhead mode replays CUDA graphs"
        report()
    del models
    if opts.toy_overhead and not opts.cuda:
        overhead["toy"] = toy_overhead(opts)
    report()
    return result
