"""What the runtime's NaN/inf check costs per denoising step (issue 12: target <= 0.2 % of a step).

The check (runtime.requests.finite_rows on the latents after each scheduler step) reads the latents
[n,4,h,w] only: its cost depends on the latent shape, not on the model. So it is timed here on SD 1.4's
latent shapes and set against measured step times: the README's CPU step (SD-size UNet, ONNX Runtime,
2 threads, 256 px, batch 1: 1068 ms) and the H200 fp16 step (PyTorch reference, 512 px: 35 ms; the
runtime's CUDA target is 12 ms). With --bundle it also times a real generation on that bundle and
reports the check's share of its measured step.

    python scripts/finite_check_cost.py [--bundle demo_out/bundle]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from elite_export.runtime.requests import finite_rows

STEP_MS = {"CPU 256 px b1 (README: 1068 ms)": (256, 1, 1068.0), "H200 512 px b1 (reference: 35 ms)": (512, 1, 35.0),
           "H200 512 px b1 (CUDA target: 12 ms)": (512, 1, 12.0), "H200 512 px b4 (4 x 12 ms)": (512, 4, 48.0)}


def check_us(shape: tuple[int, ...], reps: int = 2000) -> float:
    """Median microseconds of finite_rows on float32 latents of `shape` (batches of 100 calls)."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    samples = []
    for _ in range(reps // 100):
        t = time.perf_counter()
        for _ in range(100):
            finite_rows(x)
        samples.append((time.perf_counter() - t) / 100 * 1e6)
    return statistics.median(samples)


def bundle_share(path: str, steps: int = 10) -> tuple[tuple[int, ...], float, float]:
    """(latent shape, check us, measured step ms) for a 256 px generation on the bundle's smallest size."""
    from elite_export.runtime.bundle import Bundle
    from elite_export.runtime.pipeline import RuntimePipeline, open_runners
    from elite_export.runtime.preprocess import load_concept
    from elite_export.runtime.requests import GenerationSettings, Request

    b = Bundle.open(path)
    pipe = RuntimePipeline(b, open_runners(b))
    size = b.ranges.size[0]
    req = Request(load_concept("calib/concepts/7.jpg", "calib/concepts/7_bg.png"), "a photo of a S", 0)
    settings = GenerationSettings(steps=steps, height=size, width=size)
    pipe([req], settings)  # warm-up
    pipe.timer.seconds.clear(), pipe.timer.calls.clear()
    pipe([req], settings)
    step_ms = pipe.timer.seconds["step"] / pipe.timer.calls["step"] * 1e3
    m = b.model
    shape = (1, m.latent_channels, size // m.vae_factor, size // m.vae_factor)
    return shape, check_us(shape), step_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="also time a generation on this bundle (e.g. the toy bundle)")
    args = ap.parse_args()
    print("| step | latents | check (us) | step (ms) | share |")
    print("|---|---|---|---|---|")
    for label, (size, batch, ms) in STEP_MS.items():
        shape = (batch, 4, size // 8, size // 8)
        us = check_us(shape)
        print(f"| {label} | {list(shape)} | {us:.1f} | {ms:g} | {100 * us / (ms * 1e3):.4f} % |")
    if args.bundle:
        shape, us, ms = bundle_share(args.bundle)
        print(f"| measured on {args.bundle} | {list(shape)} | {us:.1f} | {ms:.1f} | {100 * us / (ms * 1e3):.4f} % |")


if __name__ == "__main__":
    main()
