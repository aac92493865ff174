"""`elite-export bench` (the three ways at the real sizes, run.py) and `bench-ort`; elite_export/cli.py adds them."""
from __future__ import annotations

import json
import os

import click


@click.command()
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: the PyTorch ways in fp16, models made in memory.")
@click.option("--size", type=int, default=None, help="Image side in px [default: 256 on the CPU, 512 on CUDA].")
@click.option("--batch", type=int, default=1, show_default=True, help="Requests per call.")
@click.option("--steps", type=int, default=None, help="Steps of the end-to-end runs [default: 4 CPU, 20 CUDA].")
@click.option("--warmup", type=int, default=None, help="Untimed calls first [default: 1 CPU, 2 CUDA].")
@click.option("--reps", type=int, default=None, help="Timed calls per stage [default: 3 CPU, 10 CUDA].")
@click.option("--threads", type=int, default=0, show_default=True, help="Intra-op threads; 0: one per core.")
@click.option("--ways", default="authors,reference,runtime", show_default=True,
              help="(a) authors, (b) reference, (b') compiled (torch.compile reduce-overhead, CUDA only), (c) runtime "
                   "(ONNX Runtime, on CUDA with and without a CUDA graph; TensorRT where it opens).")
@click.option("--schedulers", default=None, help="Schedulers of the end-to-end runs, comma-separated "
              "[default: lms on the CPU, lms,dpm++ on CUDA].")
@click.option("--no-cuda-graph", is_flag=True, help="On CUDA, skip (c) with the UNet step as a CUDA graph.")
@click.option("--cache", type=click.Path(), default=None,
              help="Random checkpoints and bundles go here [default: $ELITE_BENCH_CACHE, ~/.cache/elite-export].")
@click.option("--bundle", type=click.Path(), default=None, help="Run (c) on this bundle instead of building one.")
@click.option("--no-ort-fusion", is_flag=True, help="Build (c)'s bundle without ONNX Runtime attention fusion.")
@click.option("--no-toy-overhead", is_flag=True, help="Skip the runtime-overhead figure on the toy bundle.")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write the result (with the machine) here.")
@click.option("--markdown", "md_path", type=click.Path(), default=None, help="Append the tables as markdown here.")
def bench(device, size, batch, steps, warmup, reps, threads, ways, schedulers, no_cuda_graph, cache, bundle,
          no_ort_fusion, no_toy_overhead, json_path, md_path) -> None:
    """Time ELITE at the real sizes (random weights made in code, nothing downloaded) three ways in one
    process: (a) the authors' loop (two unbatched UNet calls per step), (b) the batched PyTorch
    reference, (c) the torch-free runtime. Per stage and end to end: median, min and max of the
    repetitions after warm-up, peak memory, speedups, and the runtime's per-step overhead.

    \b
      elite-export bench --json benchmarks/results/cpu-256.json
      elite-export bench --device cuda --ways authors,reference
    """
    from elite_export.bench.run import WAYS, BenchOptions, run_bench
    from elite_export.bench.report import markdown, text_report
    from elite_export.cli_bundle import parse_csv
    from elite_export.runtime.schedulers import SCHEDULERS
    from elite_export.sd14 import default_cache

    gpu = device == "cuda"
    opts = BenchOptions(size=size or (512 if gpu else 256), batch=batch, steps=steps or (20 if gpu else 4),
                        warmup=warmup if warmup is not None else (2 if gpu else 1),
                        reps=reps or (10 if gpu else 3), threads=threads, device=device,
                        ways=parse_csv(ways, WAYS, "--ways"), cache=cache or default_cache(), bundle=bundle,
                        ort_fusion=not no_ort_fusion, toy_overhead=not no_toy_overhead,
                        schedulers=parse_csv(schedulers or ("lms,dpm++" if gpu else "lms"), tuple(SCHEDULERS), "--schedulers"),
                        cuda_graph=not no_cuda_graph)

    def write_json(result: dict) -> None:  # after every way: a run stopped midway keeps what it measured
        if json_path:
            os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
            with open(json_path + ".part", "w") as f:
                json.dump(result, f, indent=1)
            os.replace(json_path + ".part", json_path)

    result = run_bench(opts, write_json)
    click.echo(text_report(result))
    if json_path:
        write_json(result)
        click.echo(f"written to {json_path}")
    if md_path:
        with open(md_path, "a") as f:
            f.write(markdown(result) + "\n")


@click.command("bench-ort")
@click.option("--bundle", type=click.Path(), default=None,
              help="An fp32 bundle built with --no-ort-fusion [default: the SD-size one, built in --cache].")
@click.option("--size", type=int, default=256, show_default=True, help="Image side in px of the default bundle.")
@click.option("--batch", type=int, default=1, show_default=True, help="Requests of the default bundle.")
@click.option("--threads", type=int, default=0, show_default=True, help="The multi-thread variants' threads; 0: cores.")
@click.option("--warmup", type=int, default=2, show_default=True)
@click.option("--reps", type=int, default=5, show_default=True)
@click.option("--cache", type=click.Path(), default=None, help="As for `bench`.")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write the result here.")
def bench_ort(bundle, size, batch, threads, warmup, reps, cache, json_path) -> None:
    """ONNX Runtime on the CPU, SD-size UNet step: threads (and spinning), graph optimisation levels,
    attention fused into com.microsoft.MultiHeadAttention or not; then the profile of the runtime's own
    settings by op type (Conv, MatMul, attention, norms, layout, elementwise)."""
    from elite_export.bench.run import BenchOptions, sd14_bundle, sd14_paths
    from elite_export.bench.measure import machine
    from elite_export.bench.ort import default_variants, runtime_variant, sweep
    from elite_export.runtime.console import format_table
    from elite_export.sd14 import default_cache

    opts = BenchOptions(size=size, batch=batch, threads=threads, cache=cache or default_cache(), ort_fusion=False)
    bundle = bundle or sd14_bundle(opts, sd14_paths(opts.cache))
    result = {"machine": machine(opts.n_threads, False),
              **sweep(bundle, default_variants(opts.n_threads), runtime_variant(opts.n_threads), warmup, reps,
                      log=lambda s: click.echo(s, err=True))}
    rows = [[r["label"], r["median_ms"], r["min_ms"], r["max_ms"]] for r in result["variants"]]
    click.echo(format_table(["UNet step variant", "median ms", "min ms", "max ms"], rows))
    click.echo(f"fusions: {result['fusions']}; fused vs unfused max abs diff: "
               f"{result['fused_vs_unfused_max_abs']}")
    total = sum(result["profile_ms_by_op"].values())
    click.echo(f"\nprofile of {result['profiled']} (one run, {total:.0f} ms in kernels)")
    click.echo(format_table(["group", "ms", "share"], [[g, ms, f"{100 * ms / total:.1f}%"]
                                                       for g, ms in result["profile_ms_by_group"].items()]))
    top = list(result["profile_ms_by_op"].items())[:12]
    click.echo(format_table(["op", "ms", "share"], [[op, ms, f"{100 * ms / total:.1f}%"] for op, ms in top]))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
        click.echo(f"written to {json_path}")
