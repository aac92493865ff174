"""Timing and memory for the benchmarks: warm-up + repetitions -> median/min/max; peak RSS sampled
by a thread; peak device memory from torch's allocator, or (ONNX Runtime, whose allocations torch does
not see) the device's memory in use sampled by the same thread above a baseline. And the machine a
result was measured on."""
from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

PAGE = os.sysconf("SC_PAGE_SIZE")


def timings(fn: Callable[[], object], warmup: int, reps: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds of `reps` calls of fn after `warmup` calls; sync() waits for the device before each clock read."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def summary(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "reps": len(ms)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def device_used_bytes() -> int:
    """Memory in use on the current CUDA device, by every allocator of every process (cudaMemGetInfo)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free


@dataclass
class PeakMemory:
    """Peak RSS while inside (sampled every `interval` s) and, on CUDA, peak device memory: torch's peak
    allocation, or with `device_baseline` the sampled device memory in use minus that baseline."""
    cuda: bool = False
    interval: float = 0.005
    device_baseline: int | None = None
    peak_rss: int = 0
    peak_device: int | None = None
    _peak_used: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, rss_bytes())
            if self.device_baseline is not None:
                self._peak_used = max(self._peak_used, device_used_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.peak_rss = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, rss_bytes())
        if self.cuda and self.device_baseline is not None:
            self.peak_device = max(self._peak_used, device_used_bytes()) - self.device_baseline
        elif self.cuda:
            import torch

            self.peak_device = torch.cuda.max_memory_allocated()

    def to_dict(self) -> dict:
        out = {"peak_rss_gib": round(self.peak_rss / 2**30, 2)}
        if self.peak_device is not None:
            out["peak_device_gib"] = round(self.peak_device / 2**30, 2)
        return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def machine(threads: int, cuda: bool) -> dict:
    """CPU model, cores, memory, load, library versions (and the GPU) of this run."""
    import importlib.metadata as md

    mem = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    versions = {}
    for dist in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "numpy", "tensorrt"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    out = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads, "memory_gib": round(mem / 2**20, 1),
           "load_average": list(os.getloadavg()), "platform": platform.platform(),
           "python": platform.python_version(), "versions": versions}
    if cuda:
        import torch

        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
    return out
