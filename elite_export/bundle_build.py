"""checkpoints -> bundle folder: ONNX graphs (fp32 for ONNX Runtime, fp16 for TensorRT, opt-in cuda: fused
fp16 graphs for ONNX Runtime's CUDA provider, see cuda_variant.py), tokenizer,
unconditional embedding, manifest. See runtime/bundle.py for the layout.

Re-running with unchanged inputs reuses every graph: each graph's file name carries its content
key (sha256 of the source checkpoints, spec, shape ranges, export settings, precision policy and
library versions), so reuse is decided by content, never by a file merely existing. New files
never overwrite old ones and manifest.json is replaced last and atomically, so an interrupted
build leaves the previous bundle intact (or, for a new bundle, a folder with no manifest, which
nothing mistakes for a bundle). Files no manifest references are removed after a good build.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

import elite_export
from elite_export.checkpoints import CheckpointPaths, EliteModels, load_models
from elite_export.errors import EliteError
from elite_export.export import ExportSettings, Fp16Policy, export_onnx, to_fp16
from elite_export.ort_fusion import fuse_for_ort_file
from elite_export.runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, Bundle, entry_problems, file_sha256
from elite_export.runtime.prompt import PromptTokenizer
from elite_export.runtime.requests import DEFAULT_LAMBDA, PAPER_SCHEDULER_CONFIG
from elite_export.specs import GRAPH_NAMES, ShapeRanges, spec

PRECISIONS = ("fp32", "fp16", "cuda")  # cuda: fused fp16 graphs for ONNX Runtime's CUDA provider (opt-in)
DEFAULT_PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class BuildOptions:
    ranges: ShapeRanges = ShapeRanges()
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    attention: str = "formula"  # or "plugin": ELITE cross-attention as one custom node (TensorRT)
    export: ExportSettings = ExportSettings()
    fp16: Fp16Policy = Fp16Policy()
    placeholder: str = "S"
    force: bool = False


@dataclass
class GraphReport:
    graph: str
    precision: str
    action: str  # exported | converted | fused | reused
    seconds: float
    megabytes: float


@dataclass
class BuildResult:
    manifest: dict
    reports: list[GraphReport] = field(default_factory=list)


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"elite-export": elite_export.__version__}
    for dist in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def graph_key(name: str, precision: str, sources: dict, options: BuildOptions, spec_dict: dict,
              versions: dict) -> str:
    """Everything a graph file's content depends on."""
    from elite_export.cuda_variant import cuda_policy, variant_key

    policy = {"fp16": options.fp16, "cuda": cuda_policy(options.fp16)}.get(precision)
    return sha256_json({"graph": name, "precision": precision, "sources": {k: v["sha256"] for k, v in sources.items()},
                        "spec": spec_dict, "ranges": options.ranges.to_dict(), "attention": options.attention,
                        "export": export_key(options.export, precision),
                        "fp16": policy.to_dict() if policy else None,
                        **({"cuda": variant_key()} if precision == "cuda" else {}), "versions": versions})


def export_key(settings: ExportSettings, precision: str) -> dict:
    """The export settings a graph of `precision` depends on (fp16 graphs are converted unfused)."""
    key = asdict(settings)
    if precision != "fp32":
        del key["ort_fusion"]
    return key


def graph_entry(bundle_dir: str, rel: str, key: str) -> dict:
    """A graph's manifest entry: its file (and external data) with sha256 and size, and its content key."""
    entry = {"path": rel, "sha256": file_sha256(os.path.join(bundle_dir, rel)), "key": key}
    data = rel + ".data"
    if os.path.exists(os.path.join(bundle_dir, data)):
        entry["external_data"] = {data: file_sha256(os.path.join(bundle_dir, data))}
    entry["bytes"] = {f: os.path.getsize(os.path.join(bundle_dir, f)) for f in [rel, *entry.get("external_data", {})]}
    return entry


def reusable(old: dict | None, bundle_dir: str, key: str) -> bool:
    """The previous manifest's entry has this key and its files are intact."""
    return bool(old) and old.get("key") == key and not entry_problems(bundle_dir, old, full=True)


def write_json_atomic(path: str, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".part")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def previous_manifest(out: str) -> dict:
    try:
        return Bundle.open(out).manifest
    except EliteError:
        return {}


def export_graphs(models: EliteModels, out: str, options: BuildOptions, sources: dict, versions: dict,
                  old: dict, on_graph: Callable[[str], None]) -> tuple[dict, list[GraphReport]]:
    from elite_export.graphs import graph_module, model_dims

    dims = model_dims(models)
    graphs, reports = {}, []
    for name in GRAPH_NAMES:
        sp = spec(name, dims)
        files = {}
        keys = {p: graph_key(name, p, sources, options, sp.to_dict(), versions) for p in options.precisions}
        prevs = {p: old.get("graphs", {}).get(name, {}).get("files", {}).get(p) for p in options.precisions}
        fresh = {p: options.force or not reusable(prevs[p], out, keys[p]) for p in options.precisions}
        if fresh.get("fp16") and options.export.ort_fusion:
            fresh["fp32"] = True  # the fp16 graph is converted from the unfused fp32 export
        for precision in (p for p in options.precisions if p != "cuda"):  # cuda: from the fused fp32, below
            key, prev = keys[precision], prevs[precision]
            rel = f"onnx/{precision}/{name}-{key[:16]}.onnx"
            t0 = time.perf_counter()
            if not fresh[precision]:
                files[precision], action = prev, "reused"
            else:
                os.makedirs(os.path.join(out, f"onnx/{precision}"), exist_ok=True)
                if precision == "fp32":
                    export_onnx(graph_module(name, models), sp, options.ranges, os.path.join(out, rel), options.export)
                    action = "exported"
                else:  # fp16 from this build's fp32 graph
                    if "fp32" not in files:
                        raise EliteError("--precision fp16 needs fp32 too (the fp16 graph is converted from it)")
                    to_fp16(os.path.join(out, files["fp32"]["path"]), os.path.join(out, rel), options.fp16)
                    action = "converted"
                files[precision] = graph_entry(out, rel, key)
            size = sum(os.path.getsize(os.path.join(out, p)) for p in [files[precision]["path"],
                                                                        *files[precision].get("external_data", {})])
            reports.append(GraphReport(name, precision, action, time.perf_counter() - t0, size / 2**20))
        if fresh.get("fp32") and options.export.ort_fusion:  # after the fp16 conversion: fp32 only
            t0 = time.perf_counter()
            path = os.path.join(out, files["fp32"]["path"])
            fuse_for_ort_file(path, path)
            files["fp32"] = graph_entry(out, files["fp32"]["path"], keys["fp32"])
            next(r for r in reports if (r.graph, r.precision) == (name, "fp32")).seconds += time.perf_counter() - t0
        if "cuda" in options.precisions:
            files["cuda"] = cuda_graph(name, out, files, keys["cuda"], prevs["cuda"] if not fresh["cuda"] else None,
                                       options, reports)
        graphs[name] = {"spec": sp.to_dict(), "files": files}
        on_graph(name)
    return graphs, reports


def cuda_graph(name: str, out: str, files: dict, key: str, prev: dict | None, options: BuildOptions,
               reports: list[GraphReport]) -> dict:
    """The graph's CUDA variant (cuda_variant.py) from this build's fp32 graph; `prev` when reusable."""
    from elite_export.cuda_variant import build_cuda_variant

    t0, entry, action = time.perf_counter(), prev, "reused"
    if entry is None:
        if "fp32" not in files:
            raise EliteError("--precision cuda needs fp32 too (the CUDA variant is made from the fp32 graph)")
        rel = f"onnx/cuda/{name}-{key[:16]}.onnx"
        os.makedirs(os.path.join(out, "onnx/cuda"), exist_ok=True)
        fused = build_cuda_variant(os.path.join(out, files["fp32"]["path"]), os.path.join(out, rel), options.fp16,
                                   options.attention)
        entry, action = {**graph_entry(out, rel, key), "fused_ops": fused}, "fused"
    size = sum(os.path.getsize(os.path.join(out, p)) for p in [entry["path"], *entry.get("external_data", {})])
    reports.append(GraphReport(name, "cuda", action, time.perf_counter() - t0, size / 2**20))
    return entry


def write_text_assets(models: EliteModels, out: str, placeholder: str) -> dict:
    """tokenizer.json and the unconditional embedding (text encoder on "" without injection)."""
    import torch

    tok_path, uncond_path = os.path.join(out, "tokenizer.json"), os.path.join(out, "uncond_embedding.npy")
    tokenizer = PromptTokenizer(models.tokenizer.backend_tokenizer, placeholder)  # refuses a multi-token placeholder
    with torch.no_grad():
        uncond = models.text_encoder(torch.from_numpy(tokenizer.ids(""))[None]).numpy().astype(np.float32)
    models.tokenizer.backend_tokenizer.save(tok_path + ".part")
    os.replace(tok_path + ".part", tok_path)
    with open(uncond_path + ".part", "wb") as f:
        np.save(f, uncond)
    os.replace(uncond_path + ".part", uncond_path)
    return {"tokenizer": {"path": "tokenizer.json", "sha256": file_sha256(tok_path)},
            "unconditional_embedding": {"path": "uncond_embedding.npy",
                                        "sha256": file_sha256(os.path.join(out, "uncond_embedding.npy"))}}


def remove_unreferenced(out: str, manifest: dict) -> None:
    keep = {e["path"] for g in manifest["graphs"].values() for e in g["files"].values()}
    keep |= {p for g in manifest["graphs"].values() for e in g["files"].values() for p in e.get("external_data", {})}
    for precision in PRECISIONS:
        folder = os.path.join(out, "onnx", precision)
        for f in os.listdir(folder) if os.path.isdir(folder) else []:
            if f"onnx/{precision}/{f}" not in keep:
                os.remove(os.path.join(folder, f))


def build_bundle(paths: CheckpointPaths, out: str, options: BuildOptions = BuildOptions(),
                 on_graph: Callable[[str], None] = lambda name: None) -> BuildResult:
    """Export every graph of the checkpoints at `paths` into the bundle folder `out`."""
    from elite_export.graphs import model_dims

    if options.attention not in ("formula", "plugin"):
        raise EliteError(f"--attention must be formula or plugin, got {options.attention!r}")
    if "cuda" in options.precisions and ("fp32" not in options.precisions or options.attention != "formula"):
        raise EliteError("--precision cuda needs fp32 too and --attention formula (the CUDA variant is made from "
                         "the fp32 graph; ONNX Runtime cannot run the TensorRT plugin's node)")
    os.makedirs(out, exist_ok=True)
    old = previous_manifest(out)
    sources = paths.sources()
    versions = library_versions()
    models = load_models(paths, options.attention)
    dims = model_dims(models)
    options.ranges.check(dims)
    assets = write_text_assets(models, out, options.placeholder)
    graphs, reports = export_graphs(models, out, options, sources, versions, old, on_graph)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "bundle_id": sha256_json({"sources": {k: v["sha256"] for k, v in sources.items()},
                                  "placeholder": options.placeholder})[:32],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": dims.to_dict(), "ranges": options.ranges.to_dict(), "static": options.ranges.static,
        "attention": options.attention, "precisions": list(options.precisions),
        "fp16_policy": options.fp16.to_dict(), "export": asdict(options.export),
        "graphs": graphs, **assets,
        "scheduler_config": dict(PAPER_SCHEDULER_CONFIG),
        "placeholder": options.placeholder, "default_lambda": DEFAULT_LAMBDA, "default_mode": "local",
        "default_words": "all", "has_local_mapper": models.local_mapper is not None,
        "sources": sources, "versions": versions,
        "engines": old.get("engines", {}),
    }
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    remove_unreferenced(out, manifest)
    return BuildResult(manifest, reports)
