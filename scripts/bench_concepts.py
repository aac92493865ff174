"""UNet step time vs the number of concepts per prompt (issue 13): what each extra concept costs.

The bundle's fp32 UNet graph on ONNX Runtime (CPU), inputs bound once (the graph alone, as
`elite-export bench`'s bare-UNet figure), at C = 1..C_max concepts for the same batch and size; the
counts are interleaved within each repetition so that drift of a shared machine hits them alike.
Prints a table (median [min-max] ms, added % vs C = 1, added % per extra concept against the 5 %
target) and writes JSON (machine, options, every sample) and the table as markdown beside it.

    python scripts/bench_concepts.py --toy --json benchmarks/results/concepts-toy-$(date +%F).json
    python scripts/bench_concepts.py --sd14 --size 256 --json benchmarks/results/concepts-cpu-256-$(date +%F).json
    python scripts/bench_concepts.py --bundle BUNDLE --json out.json
    python scripts/bench_concepts.py --flops --size 256     # SD 1.4 UNet FLOPs vs C (meta device: no memory)

--sd14 writes the random SD 1.4-size checkpoints once (elite_export/sd14.py, ~5 GB in
$ELITE_BENCH_CACHE or ~/.cache/elite-export) and builds an fp32 bundle with batch and size fixed and
the concept count dynamic (`elite-export build` in a child process; the export peaks at ~21 GB RSS:
run it on a quiet machine). Both are reused on later runs. --flops counts the SD 1.4-size UNet's
FLOPs per step at C = 0..C_max with torch's FlopCounterMode on the meta device (no weights are made;
seconds); --sd14 adds that count to its JSON beside the times.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

TARGET_PER_CONCEPT = 0.05  # issue 13: each extra concept adds <= 5 % to an SD-size step


def build(args: list[str]) -> None:
    """`elite-export build ARGS` in a child process (an export's memory is not the benchmark's)."""
    cmd = [sys.executable, "-c", "import sys; from elite_export.cli import main; sys.exit(main())", "build", *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        sys.exit(f"`elite-export build {' '.join(args)}` failed:\n{proc.stdout[-3000:]}")


def make_bundle(opts: argparse.Namespace) -> str:
    from elite_export.sd14 import default_cache, make_sd14

    cache, c, s, b = opts.cache or default_cache(), str(opts.max_concepts), str(opts.size), str(opts.batch)
    fixed = ["--precision", "fp32", "--batch", b, b, b, "--size", s, s, s, "--concepts", "1", "1", c]
    if opts.toy:
        out = os.path.join(cache, f"bundle-toy-{s}-b{b}-c{c}")
        build(["--toy", *fixed, "-o", out])
    else:
        root = make_sd14(os.path.join(cache, "sd14-random-0"))
        out = os.path.join(cache, f"bundle-sd14-{s}-b{b}-c{c}")
        build(["--sd", f"{root}/sd", "--image-encoder", f"{root}/image_encoder", "--global-mapper",
               f"{root}/global_mapper.pt", "--local-mapper", f"{root}/local_mapper.pt", *fixed, "-o", out])
    return out


def bound_unet(bundle, concepts: int, batch: int, size: int, threads: int):
    """A callable running the UNet session once on sample inputs bound once (C = `concepts`)."""
    from elite_export.runtime.backends import OrtRunner

    spec = bundle.spec("unet")
    dims = spec.dims(batch, size, size, concepts=concepts)
    runner = OrtRunner(spec, bundle.graph_path("unet"), threads=threads)
    inputs = spec.sample_inputs(dims)
    binding = runner.session.io_binding()
    for name, a in inputs.items():
        binding.bind_cpu_input(name, a)
    for name, buf in runner.output_buffers(dims).items():
        binding.bind_output(name, "cpu", 0, buf.dtype, buf.shape, buf.ctypes.data)
    return lambda: runner.session.run_with_iobinding(binding)


def sd14_flops(size: int, max_concepts: int, batch: int = 1) -> list[dict]:
    """FLOPs of one SD 1.4-size UNet step ([uncond; cond] rows) with C = 0 (no local branch) .. C_max."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from elite_export.attention import cross_attention_layers, install_elite_attention
    from elite_export.sd14 import SD14

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14.unet)
        kv = {p: (torch.empty(unet.get_submodule(p).to_k.weight.shape),) * 2 for p in cross_attention_layers(unet)}
        install_elite_attention(unet, kv, kv)
    rows, h = [], size // 8
    for c in range(max_concepts + 1):
        with torch.device("meta"):
            latents, t, text = torch.empty(2 * batch, 4, h, h), torch.empty(2 * batch), torch.empty(2 * batch, 77, 768)
            kwargs = None if c == 0 else {"elite_local": torch.empty(batch, c, 256, 768),  # the cond rows'
                                          "elite_index": torch.zeros(batch, c, dtype=torch.long),
                                          "elite_lambda": torch.empty(batch, c)}
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(latents, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs)
        rows.append({"concepts": c, "tflop": counter.get_total_flops() / 1e12})
    one = rows[1]["tflop"]
    for r in rows[1:]:
        r["added_per_extra_concept"] = (r["tflop"] / one - 1) / (r["concepts"] - 1) if r["concepts"] > 1 else 0.0
    return rows


def flop_table(rows: list[dict], size: int) -> str:
    lines = [f"SD 1.4 UNet step FLOPs ([uncond; cond], {size} px; local branch on the conditional row only)", "",
             "| concepts | TFLOP per step | added per extra concept vs C=1 |", "|---:|---:|---:|"]
    for r in rows:
        per = "-" if r["concepts"] < 2 else f"{100 * r['added_per_extra_concept']:+.2f} %"
        lines.append(f"| {r['concepts']} | {r['tflop']:.4f} | {per} |")
    return "\n".join(lines)


def machine(threads: int) -> dict:
    import onnxruntime

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads or "onnxruntime's choice",
            "load_at_start": os.getloadavg()[0], "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}


def measure(bundle_dir: str, batch: int, size: int, warmup: int, reps: int, threads: int,
            max_concepts: int | None = None) -> dict:
    from elite_export.runtime.bundle import Bundle

    bundle = Bundle.open(bundle_dir)
    lo, _, hi = bundle.ranges.concepts
    counts = list(range(lo, min(hi, max_concepts or hi) + 1))
    if len(counts) < 2:
        sys.exit(f"bundle {bundle_dir} runs {lo}..{hi} concepts: nothing to compare (build with --concepts 1 1 3)")
    run = {c: bound_unet(bundle, c, batch, size, threads) for c in counts}
    for _ in range(warmup):
        for c in counts:
            run[c]()
    samples: dict[int, list[float]] = {c: [] for c in counts}
    for _ in range(reps):
        for c in counts:  # interleaved: drift of a shared machine hits every count alike
            t0 = time.perf_counter()
            run[c]()
            samples[c].append(1e3 * (time.perf_counter() - t0))
    base = statistics.median(samples[counts[0]])
    rows = []
    for c in counts:
        med = statistics.median(samples[c])
        added = med / base - 1
        per = added / (c - counts[0]) if c > counts[0] else 0.0
        rows.append({"concepts": c, "median_ms": med, "min_ms": min(samples[c]), "max_ms": max(samples[c]),
                     "added_vs_first": added, "added_per_extra_concept": per,
                     "within_target": per <= TARGET_PER_CONCEPT, "samples_ms": samples[c]})
    return {"bundle": os.path.abspath(bundle_dir), "model": bundle.model.to_dict(), "batch": batch, "size": size,
            "warmup": warmup, "reps": reps, "machine": machine(threads), "target_per_concept": TARGET_PER_CONCEPT,
            "results": rows}


def table(result: dict) -> str:
    m = result["machine"]
    head = (f"UNet step (the graph alone, [uncond; cond] = {2 * result['batch']} rows), {result['size']} px, "
            f"D = {result['model']['text_dim']}; {m['cpu']}, {m['cores']} cores, threads: {m['threads']}, "
            f"load {m['load_at_start']:.2f} at start; onnxruntime {m['onnxruntime']}; {result['warmup']} warm-up + "
            f"{result['reps']} reps, interleaved; {m['date']}")
    lines = [head, "", "| concepts | ms per step: median [min-max] | added vs C=1 | per extra concept "
             f"(target <= {100 * result['target_per_concept']:.0f} %) |", "|---:|---|---:|---:|"]
    for r in result["results"]:
        per = "-" if r["concepts"] == result["results"][0]["concepts"] else \
            f"{100 * r['added_per_extra_concept']:+.1f} % {'ok' if r['within_target'] else 'OVER'}"
        lines.append(f"| {r['concepts']} | {r['median_ms']:,.1f} [{r['min_ms']:,.1f}-{r['max_ms']:,.1f}] | "
                     f"{100 * r['added_vs_first']:+.1f} % | {per} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--bundle", help="an existing bundle whose concept range is 1..C_max (C_max >= 2)")
    where.add_argument("--toy", action="store_true", help="build (once) a toy bundle: a smoke test of the method")
    where.add_argument("--sd14", action="store_true", help="build (once) the SD 1.4-size random bundle")
    where.add_argument("--flops", action="store_true", help="only count the SD 1.4-size UNet's FLOPs vs C")
    p.add_argument("--size", type=int, default=256, help="image side in px (default 256)")
    p.add_argument("--batch", type=int, default=1, help="requests per call (default 1)")
    p.add_argument("--max-concepts", type=int, default=3, help="C_max (default 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its choice)")
    p.add_argument("--cache", default=None, help="checkpoints and bundles (default $ELITE_BENCH_CACHE or "
                   "~/.cache/elite-export)")
    p.add_argument("--json", help="write the result here (and the table beside it, .md)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    if opts.flops:
        rows = sd14_flops(opts.size, opts.max_concepts, opts.batch)
        print(flop_table(rows, opts.size))
        return {"size": opts.size, "batch": opts.batch, "flops": rows}
    bundle = opts.bundle or make_bundle(opts)
    result = measure(bundle, opts.batch, opts.size, opts.warmup, opts.reps, opts.threads, opts.max_concepts)
    text = table(result)
    if opts.sd14:
        result["flops"] = sd14_flops(opts.size, opts.max_concepts, opts.batch)
        text += "\n\n" + flop_table(result["flops"], opts.size)
    print(text)
    if opts.json:
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.splitext(opts.json)[0] + ".md", "w") as f:
            f.write(text + "\n")
        print(f"written to {opts.json} (and .md)")
    return result


if __name__ == "__main__":
    main()
