"""Export benchmark: an SD 1.4-size UNet (real config, random weights, ELITE attention) -> fp32 ONNX -> fp16.

    .venv/bin/python scripts/bench_export.py [--threads 2] [--workdir DIR] [--keep]

Runs the project's own export path (elite_export.export: export_onnx's steps, then to_fp16) on
UnetGraph over a diffusers UNet2DConditionModel with Stable Diffusion 1.4's config (~860M
parameters, made in code: nothing is downloaded), with ELITE's attention processors installed from
random global/local K/V weights. Each stage runs in its own subprocess (this script with --stage), so
its peak RSS is its own and its memory is returned before the next stage starts:

    export          build the UNet, torch.onnx.export (dynamo), name the I/O dims, save
    fold_constants  onnx-graphsurgeon constant folding + cleanup, save
    check           onnx.checker full check (by path)
    to_fp16         fp16 conversion with fp32 islands, tidy, save, check
    trt_support     both graphs against TensorRT 10's ONNX support matrix

export + fold_constants + check are exactly export_onnx with the default ExportSettings, split so
that each is timed alone. Prints a markdown table and writes benchmarks/results/export-sd14-<date>.json.
The parent process imports neither torch nor onnx, so a child's ru_maxrss (which Linux carries over
from the forking parent) is the child's own.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STAGES = ("export", "fold_constants", "check", "to_fp16", "trt_support")
FP32_NAME, FP16_NAME = "unet-fp32.onnx", "unet-fp16.onnx"
BATCH, SIZE = (1, 1, 2), (256, 512, 1024)  # requests (the UNet runs 2x rows) and image side in px

SD14_UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}


@dataclass
class UnetOnly:
    """The one EliteModels field UnetGraph reads."""
    unet: object


def sd14_elite_unet(seed: int = 0):
    """UnetGraph over the SD 1.4 UNet with ELITE's processors; random weights. Returns (graph, parameters)."""
    import torch
    from diffusers import UNet2DConditionModel

    from elite_export.attention import cross_attention_layers, install_elite_attention
    from elite_export.graphs import UnetGraph

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD14_UNET_CONFIG).eval()

    def random_kv(path: str):
        shape = unet.get_submodule(path).to_k.weight.shape  # [inner, D]
        return tuple(torch.randn(shape) * shape[1] ** -0.5 for _ in range(2))

    layers = cross_attention_layers(unet)
    install_elite_attention(unet, {p: random_kv(p) for p in layers}, {p: random_kv(p) for p in layers})
    graph = UnetGraph(UnetOnly(unet)).eval()
    return graph, sum(p.numel() for p in graph.parameters())


def stage_export(workdir: Path) -> dict:
    from elite_export.export import ExportSettings, export_onnx
    from elite_export.specs import ModelDims, ShapeRanges, UnetSpec

    t0 = time.perf_counter()
    graph, parameters = sd14_elite_unet()
    model_seconds = time.perf_counter() - t0
    export_onnx(graph, UnetSpec(ModelDims()), ShapeRanges(BATCH, SIZE), str(workdir / FP32_NAME),
                ExportSettings(fold_constants=False, check=False))
    return {"model_build_seconds": round(model_seconds, 1), "parameters": parameters}


def stage_fold_constants(workdir: Path) -> dict:
    from elite_export.export import fold_constants

    fold_constants(str(workdir / FP32_NAME))
    return {}


def stage_check(workdir: Path) -> dict:
    from elite_export.export import check

    check(str(workdir / FP32_NAME))
    return {}


def stage_to_fp16(workdir: Path) -> dict:
    from elite_export.export import to_fp16

    to_fp16(str(workdir / FP32_NAME), str(workdir / FP16_NAME))
    return {}


def stage_trt_support(workdir: Path) -> dict:
    from elite_export.engines.onnx_support import tensorrt_support_problems

    return {"problems": {name: tensorrt_support_problems(workdir / name) for name in (FP32_NAME, FP16_NAME)}}


STAGE_FUNCTIONS = {"export": stage_export, "fold_constants": stage_fold_constants, "check": stage_check,
                   "to_fp16": stage_to_fp16, "trt_support": stage_trt_support}
STAGE_OUTPUT = {"export": FP32_NAME, "fold_constants": FP32_NAME, "to_fp16": FP16_NAME}


def run_stage_here(name: str, workdir: Path, threads: int) -> None:
    """In the child: run one stage, print its own seconds and peak RSS as one JSON line."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    extra = STAGE_FUNCTIONS[name](workdir)
    seconds = time.perf_counter() - t0
    peak_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_gib": round(peak_kib / 2**20, 2), **extra}))


def file_stats(path: Path) -> dict:
    """Sizes of the graph and its external data, and its node count (the graph read without its weights)."""
    import onnx

    data = path.with_name(path.name + ".data")
    nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
    return {"onnx_mb": round(path.stat().st_size / 2**20, 1),
            "data_mb": round(data.stat().st_size / 2**20, 1) if data.exists() else 0.0, "nodes": nodes}


def run_stage_child(name: str, workdir: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--stage", name, "--workdir", str(workdir), "--threads", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"stage {name} failed with exit code {proc.returncode} (its stderr is above)")
    result = {"stage": name, "process_seconds": round(wall, 1), **json.loads(proc.stdout.strip().splitlines()[-1])}
    if name in STAGE_OUTPUT:  # counted in a child too: the parent stays free of onnx and torch
        stats = subprocess.run([sys.executable, __file__, "--stats", str(workdir / STAGE_OUTPUT[name])],
                               stdout=subprocess.PIPE, text=True, check=True)
        result.update(json.loads(stats.stdout))
    return result


def machine() -> dict:
    import importlib.metadata as md

    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "memory_gib": round(mem / 2**20, 1),
            "python": platform.python_version(),
            "versions": {d: md.version(d) for d in ("torch", "diffusers", "onnx", "onnxscript", "onnxruntime",
                                                   "onnx-graphsurgeon")}}


def markdown_table(stages: list[dict]) -> str:
    head = "| stage | seconds | process s | peak RSS GiB | .onnx MB | .data MB | nodes |"
    rows = [head, "|" + "---|" * 7]
    for s in stages:
        rows.append(f"| {s['stage']} | {s['seconds']} | {s['process_seconds']} | {s['peak_rss_gib']} | "
                    f"{s.get('onnx_mb', '')} | {s.get('data_mb', '')} | {s.get('nodes', '')} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each stage")
    ap.add_argument("--workdir", type=Path, help="where the graphs go (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the exported graphs")
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stats:
        print(json.dumps(file_stats(args.stats)))
        return
    if args.stage:
        run_stage_here(args.stage, args.workdir, args.threads)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-export-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stages = []
    try:
        for name in STAGES:
            stages.append(run_stage_child(name, workdir, args.threads))
            print(f"{name}: {json.dumps(stages[-1])}", file=sys.stderr)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    date = time.strftime("%Y-%m-%d")
    report = {"benchmark": "export-sd14", "date": date, "machine": machine(), "threads": args.threads,
              "unet_config": SD14_UNET_CONFIG, "ranges": {"batch": BATCH, "size": SIZE}, "stages": stages}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"export-sd14-{date}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown_table(stages))
    print(f"\nwritten to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
