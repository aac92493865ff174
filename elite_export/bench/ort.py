"""`elite-export bench-ort`: where ONNX Runtime's CPU time goes on the SD-size UNet, and which session
settings serve it best: intra-op threads (and spinning), graph optimisation level, attention fusion.

Works on the fp32 UNet of an *unfused* bundle (`build --no-ort-fusion`); the fused variant is
made beside it by ort_fusion (graph only: it shares the weights file). Each variant is a fresh
session timed on the UNet's sample inputs (the [uncond; cond] batch), with I/O binding as the
runtime does. The profile (ONNX Runtime's own profiler) is aggregated by op type over one run.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from elite_export.bench.measure import summary, timings

LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}  # name -> onnxruntime.GraphOptimizationLevel
OP_GROUPS = {  # op type (after ONNX Runtime's own fusions) -> what it is
    "conv": ("Conv", "FusedConv", "NhwcConv"),
    "matmul": ("MatMul", "FusedMatMul", "Gemm", "MatMulNBits"),
    "attention": ("MultiHeadAttention", "Attention", "Softmax"),
    "norm": ("LayerNormalization", "SkipLayerNormalization", "InstanceNormalization", "GroupNorm",
             "GroupNormalization", "SimplifiedLayerNormalization"),
    "layout": ("ReorderInput", "ReorderOutput", "Transpose", "Reshape", "Concat", "Slice", "Split", "Gather",
               "GatherElements", "Expand", "Unsqueeze", "Squeeze", "Resize", "Shape", "Cast"),
}


@dataclass(frozen=True)
class Variant:
    graph: str  # unfused | fused
    level: str  # one of LEVELS
    threads: int
    spinning: bool = True

    @property
    def label(self) -> str:
        return f"{self.graph}, {self.level}, {self.threads} thr{'' if self.spinning else ', no spin'}"


def session(path: str, v: Variant, profile_prefix: str | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = v.threads
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[v.level])
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if v.spinning else "0")
    opts.log_severity_level = 3
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def bound_run(sess, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]):
    """A call running `sess` on inputs bound once (the runtime's I/O binding, none of its bookkeeping)."""
    binding = sess.io_binding()
    for name, a in inputs.items():
        binding.bind_cpu_input(name, a)
    for name, buf in outputs.items():
        binding.bind_output(name, "cpu", 0, buf.dtype, buf.shape, buf.ctypes.data)
    return lambda: sess.run_with_iobinding(binding)


def fused_copy(unfused: str, folder: str) -> tuple[str, int]:
    """The fused graph in `folder`, its weights the unfused graph's data file, hard-linked (ONNX Runtime
    refuses external data outside the model's folder, symlinks included): `folder` must be on its disk."""
    from elite_export.ort_fusion import fuse_for_ort_file

    data = unfused + ".data"
    if os.path.exists(data):
        os.link(data, os.path.join(folder, os.path.basename(data)))
    dst = os.path.join(folder, os.path.basename(unfused))
    return dst, fuse_for_ort_file(unfused, dst)


def profile_by_op(profile_json: str) -> dict[str, float]:
    """ms per op type in the last run recorded in an ONNX Runtime profile."""
    with open(profile_json) as f:
        events = json.load(f)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = runs[-1]
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and \
                last["ts"] <= e["ts"] <= last["ts"] + last["dur"]:
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def group_ops(per_op: dict[str, float]) -> dict[str, float]:
    groups: dict[str, float] = defaultdict(float)
    for op, ms in per_op.items():
        groups[next((g for g, ops in OP_GROUPS.items() if op in ops), "elementwise/other")] += ms
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def runtime_variant(threads: int) -> Variant:
    """What the runtime runs: the bundle's fused graph, every optimisation, a thread per core."""
    return Variant("fused", "all", threads)


def default_variants(threads: int) -> list[Variant]:
    return [Variant("unfused", "all", 1), Variant("unfused", "all", threads), Variant("fused", "all", 1),
            Variant("fused", "all", threads), Variant("fused", "all", threads, spinning=False),
            Variant("fused", "extended", threads), Variant("fused", "basic", threads),
            Variant("fused", "disable", threads)]


def sweep(bundle_dir: str, variants: list[Variant], profiled: Variant, warmup: int = 2, reps: int = 5,
          log=print) -> dict:
    """Time the bundle's UNet under each variant, profile `profiled` (the runtime's settings). Returns a
    JSON-able dict."""
    from elite_export.runtime.bundle import Bundle

    bundle = Bundle.open(bundle_dir)
    spec = bundle.spec("unet")
    r = bundle.ranges
    dims = spec.dims(r.batch[1], r.size[1], r.size[1])
    inputs = spec.sample_inputs(dims)
    outputs = {t.name: np.empty(spec.shape(t, dims), np.float32) for t in spec.outputs}
    unfused = bundle.graph_path("unet", "fp32")
    rows = []
    with tempfile.TemporaryDirectory(dir=os.path.dirname(unfused), prefix="bench-ort-") as tmp:
        fused, fusions = fused_copy(unfused, tmp)
        paths = {"unfused": unfused, "fused": fused}
        reference = {}
        for v in variants:
            sess = session(paths[v.graph], v)
            run = bound_run(sess, inputs, outputs)
            stats = summary(timings(run, warmup, reps))
            reference.setdefault(v.graph, outputs["noise_pred"].copy())
            rows.append({**asdict(v), "label": v.label, **stats})
            log(f"  {v.label}: {stats['median_ms']:.0f} ms")
            del sess, run
        max_diff = float(np.abs(reference["fused"] - reference["unfused"]).max()) if len(reference) == 2 else None
        per_op = profile(paths[profiled.graph], profiled, inputs, outputs, tmp)
    return {"bundle": bundle_dir, "dims": dims, "fusions": fusions, "fused_vs_unfused_max_abs": max_diff,
            "variants": rows, "profiled": profiled.label, "profile_ms_by_op": per_op,
            "profile_ms_by_group": group_ops(per_op)}


def profile(path: str, v: Variant, inputs: dict, outputs: dict, folder: str) -> dict[str, float]:
    sess = session(path, v, profile_prefix=os.path.join(folder, "ort-profile"))
    run = bound_run(sess, inputs, outputs)
    run()  # warm-up (also profiled; profile_by_op reads the last run)
    run()
    return profile_by_op(sess.end_profiling())
