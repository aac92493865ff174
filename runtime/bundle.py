"""Reading a bundle (torch-free). The writer is elite_export/bundle_build.py.

BUNDLE/
  manifest.json            format version, bundle id, model dims, shape ranges, graphs (spec, files,
                           sha256), precision settings, tokenizer, scheduler, sources, versions, engines
  tokenizer.json           the CLIP tokenizer for the `tokenizers` library
  uncond_embedding.npy     text-encoder output for "" [1,77,D] float32
  onnx/fp32/<graph>.onnx   for ONNX Runtime on the CPU
  onnx/fp16/<graph>.onnx   for TensorRT (strongly typed; fp32 islands; fp32 I/O)
  onnx/cuda/<graph>.onnx   opt-in: fp16, fused for ONNX Runtime's CUDA provider (com.microsoft ops; fp32 I/O)
  engines/<graph>-<key>.plan   TensorRT engines (only after `build --backend tensorrt`)

manifest.json is written last (temp file + rename): a folder without it is not a bundle.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from elite_export.errors import EliteError
from elite_export.specs import GRAPH_NAMES, GraphSpec, ModelDims, ShapeRanges, spec

FORMAT = "elite-export-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def hash_file_into(h, path: str) -> None:
    """Feed a file's bytes to the hash `h`, 1 MiB at a time."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    hash_file_into(h, path)
    return h.hexdigest()


def entry_problems(root: str, entry: dict, full: bool = True) -> list[str]:
    """Problems with one graph's files: missing, or not the manifest's content.

    full: compare sha256 (what `check` and rebuilds do); otherwise compare sizes, which catches
    missing and truncated files without reading gigabytes at every start (the runtime's check;
    manifests without sizes fall back to sha256)."""
    problems, sizes = [], entry.get("bytes", {})
    for rel, sha in [(entry["path"], entry["sha256"]), *entry.get("external_data", {}).items()]:
        p = os.path.join(root, rel)
        if not os.path.isfile(p):
            problems.append(f"{rel} is missing")
        elif not full and rel in sizes:
            if os.path.getsize(p) != sizes[rel]:
                problems.append(f"{rel} has {os.path.getsize(p)} bytes, the manifest says {sizes[rel]} "
                                "(truncated or replaced)")
        elif file_sha256(p) != sha:
            problems.append(f"{rel} does not match its sha256 in the manifest (corrupted or edited)")
    return problems


@dataclass
class Bundle:
    root: str
    manifest: dict

    @classmethod
    def open(cls, root: str) -> "Bundle":
        path = os.path.join(root, MANIFEST)
        if not os.path.isdir(root):
            raise EliteError(f"bundle {root!r} does not exist; build one with `elite-export build -o {root}`")
        if not os.path.isfile(path):
            raise EliteError(f"{root!r} is not a bundle (no {MANIFEST}; an interrupted build?); "
                             "rebuild it with `elite-export build`")
        try:
            with open(path) as f:
                manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise EliteError(f"{path} is not valid JSON ({e}); rebuild the bundle") from None
        if manifest.get("format") != FORMAT:
            raise EliteError(f"{path} is not an elite-export bundle manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise EliteError(f"bundle {root!r} has format version {manifest.get('format_version')}; this "
                             f"elite-export reads version {FORMAT_VERSION}: rebuild the bundle")
        return cls(root, manifest)

    @property
    def id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def model(self) -> ModelDims:
        return ModelDims(**self.manifest["model"])

    @property
    def ranges(self) -> ShapeRanges:
        return ShapeRanges.from_dict(self.manifest["ranges"])

    def spec(self, name: str) -> GraphSpec:
        return spec(name, self.model)

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def graph_file(self, name: str, precision: str = "fp32") -> dict:
        """{"path", "sha256", ...} of a graph's ONNX file in `precision`."""
        files = self.manifest["graphs"][name]["files"]
        if precision not in files:
            raise EliteError(f"bundle {self.root!r} has no {precision} {name} graph (it has "
                             f"{', '.join(files)}); rebuild with --precision {precision}")
        return files[precision]

    def graph_path(self, name: str, precision: str = "fp32") -> str:
        return self.path(self.graph_file(name, precision)["path"])

    def verify(self, names: tuple[str, ...] = GRAPH_NAMES, precision: str = "fp32", full: bool = True) -> list[str]:
        """Problems with the graph files ([] when sound): see entry_problems."""
        return [p for name in names for p in entry_problems(self.root, self.graph_file(name, precision), full)]

    def tokenizer_path(self) -> str:
        return self.path(self.manifest["tokenizer"]["path"])

    def unconditional_embedding(self) -> np.ndarray:  # [1,77,D] float32
        return np.load(self.path(self.manifest["unconditional_embedding"]["path"]))
