"""`elite-export build` and `elite-export check`."""
from __future__ import annotations

import os
import sys

import click

from elite_export.cli_options import checkpoint_options, checkpoint_paths
from elite_export.errors import EliteError
from elite_export.runtime.backends import BACKENDS
from elite_export.runtime.console import format_table, progress


def parse_csv(value: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise EliteError(f"{flag} takes a comma-separated list of {', '.join(allowed)}; got {value!r}")
    return items


def toy_checkpoints(bundle: str, seed: int):
    """The tiny model for --toy, written beside the bundle's files (kept: --backend torch reads it)."""
    from elite_export.checkpoints import CheckpointPaths
    from elite_export.runtime.noise import check_seed
    from elite_export.toy import make_toy

    check_seed(seed)
    root = os.path.join(bundle, f"toy-source-{seed}")
    if not os.path.isfile(os.path.join(root, "local_mapper.pt")):
        make_toy(root, seed)
    return CheckpointPaths(f"{root}/sd", f"{root}/image_encoder", f"{root}/global_mapper.pt", f"{root}/local_mapper.pt")


@click.command()
@checkpoint_options
@click.option("--toy", is_flag=True, help="Build from a tiny random ELITE made in code (no checkpoints needed).")
@click.option("--toy-seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(), help="Bundle folder to write.")
@click.option("--precision", default="fp32,fp16", show_default=True,
              help="fp32: graphs for ONNX Runtime on the CPU; fp16: for TensorRT (fp32 islands, fp32 I/O); "
                   "cuda: fp16 graphs fused for ONNX Runtime's CUDA provider (MultiHeadAttention, GroupNorm, "
                   "BiasSplitGelu, BiasAdd; what `elite-run --device cuda` runs).")
@click.option("--batch", "batch", nargs=3, type=int, default=(1, 1, 4), show_default=True,
              metavar="MIN OPT MAX", help="Requests per call (the UNet runs 2x: [uncond; cond]).")
@click.option("--size", nargs=3, type=int, default=(256, 512, 1024), show_default=True, metavar="MIN OPT MAX",
              help="Image height/width range in px, multiples of 64.")
@click.option("--static", is_flag=True, help="Fixed shapes at the OPT batch and size (what CUDA graphs want).")
@click.option("--attention", type=click.Choice(["formula", "plugin"]), default="formula", show_default=True,
              help="plugin: each ELITE cross-attention as one custom node for TensorRT's plugin.")
@click.option("--fp32-ops", default=None, help="Op types kept fp32 in fp16 graphs (comma-separated; default: "
              "Softmax,LayerNormalization,InstanceNormalization,GroupNormalization).")
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--no-fold", is_flag=True, help="Skip constant folding.")
@click.option("--no-ort-fusion", is_flag=True,
              help="fp32 graphs as exported (default: attention fused into com.microsoft.MultiHeadAttention "
                   "for ONNX Runtime; the fp16 graphs for TensorRT are never fused).")
@click.option("--placeholder", default="S", show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime", show_default=True,
              help="tensorrt: also build fp16 TensorRT engines (needs TensorRT and a GPU).")
@click.option("--trt-opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimization level.")
@click.option("--workspace-mib", type=int, default=None, help="TensorRT workspace limit (default: TensorRT's).")
@click.option("--refittable", is_flag=True, help="Build refittable TensorRT engines (weights swappable).")
@click.option("--force", is_flag=True, help="Rebuild every graph even when its inputs are unchanged.")
def build(sd, image_encoder, global_mapper, local_mapper, toy, toy_seed, output, precision, batch, size, static,
          attention, fp32_ops, opset, no_fold, no_ort_fusion, placeholder, backend, trt_opt_level, workspace_mib,
          refittable, force) -> None:
    """Export the checkpoints into a self-contained bundle folder.

    Writes every graph as ONNX (fp32 for ONNX Runtime, fp16 for TensorRT), the tokenizer, the
    unconditional embedding and manifest.json. Re-running with unchanged inputs reuses what
    exists (decided by content hashes); an interrupted build never leaves a bundle that looks
    complete.

    \b
      elite-export build --toy -o bundle
      elite-export build --sd sd-v1-4 --image-encoder clip-vit-large-patch14 \\
          --global-mapper global_mapper.pt --local-mapper local_mapper.pt -o elite-bundle
    """
    from elite_export.bundle_build import PRECISIONS, BuildOptions, build_bundle
    from elite_export.export import ExportSettings, Fp16Policy
    from elite_export.specs import ShapeRanges

    precisions = parse_csv(precision, PRECISIONS, "--precision")
    if backend == "tensorrt" and "fp16" not in precisions:
        raise EliteError("--backend tensorrt builds engines from the fp16 graphs: add fp16 to --precision")
    ranges = ShapeRanges((batch[1],) * 3, (size[1],) * 3) if static else ShapeRanges(tuple(batch), tuple(size))
    policy = Fp16Policy() if fp32_ops is None else Fp16Policy(fp32_ops=tuple(o.strip() for o in fp32_ops.split(",")))
    export = ExportSettings(opset, not no_fold, ort_fusion=not no_ort_fusion)
    options = BuildOptions(ranges, precisions, attention, export, policy, placeholder, force)
    paths = toy_checkpoints(output, toy_seed) if toy else checkpoint_paths(sd, image_encoder, global_mapper,
                                                                           local_mapper)
    with progress(4, "exporting graphs") as bar:
        result = build_bundle(paths, output, options, on_graph=lambda name: (bar.set_postfix_str(name), bar.update()))
    rows = [[r.graph, r.precision, r.action, r.seconds, r.megabytes] for r in result.reports]
    click.echo(format_table(["graph", "precision", "action", "seconds", "MiB"], rows))
    if backend == "tensorrt":
        from elite_export.engines.trt_build import TrtBuildSettings, build_bundle_engines
        from elite_export.runtime.bundle import Bundle

        settings = TrtBuildSettings(optimization_level=trt_opt_level, workspace_mib=workspace_mib,
                                    refittable=refittable, static_shapes=static)
        build_bundle_engines(Bundle.open(output), settings, log=click.echo)
    click.echo(f"bundle written to {output} (id {result.manifest['bundle_id']})")


def cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--precision", default=None, help="Graphs to check (default: every precision in the bundle).")
@click.option("--image", type=click.Path(), multiple=True, help="Also check on this concept image (repeatable).")
@click.option("--mask", type=click.Path(), multiple=True, help="Its object mask (one per --image).")
@click.option("--prompt", multiple=True,
              help="Prompts for the --image cases (default: 'a photo of a S', 'a S in the style of Van Gogh').")
@click.option("--calib", is_flag=True, help="Sweep the calibration set (calib/) and report the worst case per output.")
@click.option("--all-cases", is_flag=True, help="Print every case, not only the worst per graph and output.")
def check(bundle, precision, image, mask, prompt, calib, all_cases) -> None:
    """Run every graph on ONNX Runtime against the PyTorch reference; exit 1 on any failure.

    The reference is loaded from the source checkpoints recorded in the bundle's manifest.
    Prints max abs / max rel error per graph and output against the graph spec's tolerance."""
    from elite_export.calib import calibration_set
    from elite_export.parity import HEADERS, ParityChecker, concept_cases, sample_cases, worst_per_output
    from elite_export.runtime.bundle import Bundle

    b = Bundle.open(bundle)
    precisions = parse_csv(precision, tuple(b.manifest["precisions"]), "--precision") if precision \
        else tuple(b.manifest["precisions"])
    if not precision and "cuda" in precisions and not cuda_provider():
        precisions = tuple(p for p in precisions if p != "cuda")
        click.echo("cuda graphs not checked: they run on ONNX Runtime's CUDA provider (onnxruntime-gpu and a GPU)")
    if len(image) != len(mask):
        raise EliteError("give one --mask per --image")
    checker = ParityChecker(b, precisions)
    cases = list(sample_cases(b))
    concepts = list(zip(image, mask))
    prompts = list(prompt) or (["a photo of a S", "a S in the style of Van Gogh"] if image else [])
    if calib:
        cs = calibration_set()
        concepts, prompts = concepts + list(cs.concepts), prompts + list(cs.prompts)
    if concepts:
        cases += list(concept_cases(b, checker.models, concepts, prompts))
    rows = []
    with progress(len(cases), "checking") as bar:
        for case in cases:
            rows += checker.check(case)
            bar.update()
    shown = rows if all_cases else worst_per_output(rows)
    click.echo(format_table(HEADERS, [r.cells() for r in shown]))
    failed = [r for r in rows if not r.passed]
    click.echo(f"{len(rows) - len(failed)}/{len(rows)} comparisons within tolerance over {len(cases)} cases"
               + ("" if all_cases else " (worst case per graph and output shown)"))
    if failed:
        sys.exit(1)


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
              help="Graphs to run (fp32: what an fp16 build would face).")
@click.option("--steps", type=click.IntRange(1, 100), default=4, show_default=True, help="Steps per generation.")
@click.option("--top", type=click.IntRange(1, 50), default=1, show_default=True,
              help="Largest tensors listed per graph.")
@click.option("--threads", type=click.IntRange(0), default=0, help="onnxruntime intra-op threads (0 = its choice).")
def activations(bundle, precision, steps, top, threads) -> None:
    """The largest |x| of every tensor per graph, generating at the profile's edges on the calibration set.

    Smallest and largest size x batch 1 and max, lambda 0 and 1, guidance 1 and 20 (ONNX Runtime, CPU;
    each tensor in its own dtype, so an fp16 overflow shows as inf). Exit 1 if any stage gives NaN/inf
    or a tensor reaches fp16's 65504."""
    from elite_export.activations import FP16_MAX, HEADERS, sweep
    from elite_export.runtime.bundle import Bundle

    b = Bundle.open(bundle)
    with progress(5, "generating") as bar:
        result = sweep(b, precision, steps, threads, on_run=lambda label: (bar.set_postfix_str(label), bar.update()))
    click.echo(format_table(HEADERS, [g.cells() for g in result.graphs]))
    if top > 1:
        rows = [[g.graph, p.max_abs, p.name, p.op, p.dtype, p.run] for g in result.graphs
                for p in sorted(g.peaks, key=lambda p: -p.max_abs)[:top]]
        click.echo(format_table(["graph", "max |x|", "tensor", "op", "dtype", "reached in"], rows))
    click.echo(f"runs: calibration set (every concept and prompt), {', '.join(result.runs)}; {steps} LMS steps; "
               f"fp16 max {FP16_MAX:g}")
    for line in result.errors:
        click.echo(f"error: {line}", err=True)
    if not result.ok:
        click.echo("FAIL: a stage gave NaN/inf or a tensor reached fp16's limit", err=True)
        sys.exit(1)
