"""How close each graph comes to fp16's limit: the largest |x| of every tensor it computes while the
runtime generates at the edges of the bundle's profile on the calibration set.

`PeakRunner` runs a graph on ONNX Runtime (CPU) with a ReduceMax/ReduceMin/ReduceSum added after
every tensor that can hold new values, so each tensor is still materialised in its own dtype (an fp16
tensor past 65504 is inf there, as on a GPU) and keeps, per tensor, the largest |x| and whether it
ever held NaN/inf. Attention logits (what feeds a Softmax, through Casts and reshapes) are masked with
-65504 by design: only their positive side counts. `sweep` runs the calibration set's concepts and
prompts through the conditioning graphs, then `edge_runs` (smallest/largest size x batch 1/max,
lambda 0 and 1, guidance 1 and 20) through a RuntimePipeline of PeakRunners, whose per-row checks
catch any stage output that goes NaN/inf, and summarises one row per graph.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from elite_export.errors import EliteError
from elite_export.runtime.backends import GraphRunner
from elite_export.runtime.bundle import Bundle
from elite_export.runtime.requests import GenerationSettings, Request
from elite_export.specs import GRAPH_NAMES, GraphSpec, ShapeRanges

FP16_MAX = 65504.0
_FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}  # onnx.TensorProto elem types
_PASS_THROUGH = ("Cast", "Reshape", "Transpose", "Identity")  # ops that carry a logit to its Softmax
# Outputs not reduced: they move or select values (|out| <= max |in|, and no NaN their inputs lacked) or
# are bounded by construction; whatever they carry is measured where it was computed.
_MOVES = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split", "Concat", "Expand", "Identity",
          "Gather", "GatherElements", "GatherND", "Flatten", "Tile", "Where", "Max", "Min", "Abs", "Neg"}
_BOUNDED = {"Sigmoid", "Softmax", "Tanh", "Erf", "Clip", "Relu", "LeakyRelu"}


@dataclass
class TensorPeak:
    name: str
    op: str
    dtype: str
    logit: bool  # a Softmax input: only the positive side can overflow
    max_abs: float = 0.0  # largest |x| (logits: largest x) over every call; inf once it overflowed
    nonfinite: bool = False  # ever NaN or inf (logits: +inf; their masks may be -inf)
    run: str = ""  # the call label where max_abs was reached

    def update(self, peak: float, nan: bool, run: str) -> None:
        """One call's reductions: max |x| (a logit: max x; inf on overflow) and whether it held NaN."""
        self.nonfinite |= nan or peak == float("inf")
        if peak > self.max_abs:
            self.max_abs, self.run = peak, run


def _creates_values(node, types: dict[str, int]) -> bool:
    """Whether a node can make a value larger than its inputs' or a new NaN (what PeakRunner measures)."""
    if node.op_type in _MOVES or node.op_type in _BOUNDED:
        return False
    if node.op_type == "Cast":  # widening (fp16 -> fp32) keeps every value; narrowing can overflow
        widths = {10: 2, 16: 2, 1: 4, 11: 8}
        return widths.get(types.get(node.output[0]), 0) < widths.get(types.get(node.input[0]), 0)
    if node.op_type == "Resize":  # nearest and linear interpolate within the input's range; cubic overshoots
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
        return mode == b"cubic"
    return True


def _logit_tensors(graph) -> set[str]:
    """Tensors whose every consumer is a Softmax, or a pass-through op whose output is such a tensor."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    memo: dict[str, bool] = {}

    def logit(t: str) -> bool:
        if t not in memo:  # ONNX graphs are acyclic: the recursion ends
            uses = consumers.get(t, [])
            memo[t] = bool(uses) and all(n.op_type == "Softmax" or (n.op_type in _PASS_THROUGH and n.input[0] == t
                                                                    and logit(n.output[0])) for n in uses)
        return memo[t]

    return {t for t in consumers if logit(t)}


class PeakRunner(GraphRunner):
    """A graph on ONNX Runtime that also reduces every tensor that can hold new values to its max, min
    and sum: its largest |x| (a logit: its largest x) and whether it held NaN (the sum is NaN) or
    overflowed (max or min is inf); `peaks` keeps them per tensor.

    The reductions are nodes added to the graph: each tensor is still materialised in its own dtype (an
    fp16 tensor past 65504 is inf, as on a GPU) while ONNX Runtime keeps reusing its buffers; exposing
    every tensor as a graph output instead costs gigabytes at 512 px."""

    def __init__(self, spec: GraphSpec, path: str, threads: int = 0):
        super().__init__(spec)
        import onnx
        import onnxruntime as ort
        from onnx import helper

        model = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False))
        g = model.graph
        types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
        logits = _logit_tensors(g)
        self.peaks: dict[str, TensorPeak] = {}
        added = []
        for node in list(g.node):
            if not _creates_values(node, types):
                continue
            for t in node.output:
                if not t or types.get(t) not in _FLOAT_TYPES:
                    continue
                i = len(self.peaks)
                self.peaks[t] = TensorPeak(t, node.op_type, _FLOAT_TYPES[types[t]], t in logits)
                for op in ("ReduceMax", "ReduceMin", "ReduceSum"):  # no buffers: three passes over t
                    added.append(helper.make_node(op, [t], [f"peak{i}/{op}"], keepdims=0))
                    g.output.append(helper.make_tensor_value_info(f"peak{i}/{op}", types[t], []))
        g.node.extend(added)
        self.run_label = ""
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = threads, 3
        with tempfile.TemporaryDirectory() as tmp:  # beside links to the external data, where ORT looks
            for init in g.initializer:
                for kv in init.external_data:
                    link = os.path.join(tmp, kv.value)
                    if kv.key == "location" and not os.path.exists(link):
                        os.symlink(os.path.join(os.path.dirname(os.path.abspath(path)), kv.value), link)
            onnx.save(model, os.path.join(tmp, "peaks.onnx"))
            self.session = ort.InferenceSession(os.path.join(tmp, "peaks.onnx"), opts,
                                                providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray], dims: dict[str, int]) -> dict[str, np.ndarray]:
        self.check_inputs(inputs, dims)
        values = self.session.run(None, {t.name: np.ascontiguousarray(inputs[t.name]) for t in self.spec.inputs})
        got = dict(zip(self.names, values))
        for i, p in enumerate(self.peaks.values()):
            hi, lo, total = (float(got[f"peak{i}/{op}"]) for op in ("ReduceMax", "ReduceMin", "ReduceSum"))
            p.update(hi if p.logit else max(hi, -lo), math.isnan(total), self.run_label)
        return {t.name: got[t.name] for t in self.spec.outputs}


@dataclass
class GraphPeak:
    """One graph's summary: the largest |x| over its tensors of the graph's working dtype (fp16 tensors
    in an fp16 graph; all in an fp32 one: what an fp16 build would face) and every non-finite tensor."""
    graph: str
    precision: str
    tensors: int
    top: TensorPeak
    nonfinite: list[str] = field(default_factory=list)
    peaks: list[TensorPeak] = field(default_factory=list, repr=False)  # every measured tensor

    @property
    def headroom(self) -> float:
        return FP16_MAX / self.top.max_abs if self.top.max_abs else float("inf")

    def cells(self) -> list:
        return [self.graph, self.precision, self.tensors, self.top.max_abs, f"{self.top.name} ({self.top.op})",
                self.top.run, f"{self.headroom:,.0f}x", ", ".join(self.nonfinite[:3]) or "none"]


HEADERS = ["graph", "precision", "tensors", "max |x|", "tensor (op)", "reached in", "fp16 headroom", "NaN/inf"]


def summarise(graph: str, precision: str, runner: PeakRunner) -> GraphPeak:
    peaks = list(runner.peaks.values())
    working = [p for p in peaks if p.dtype == "float16"] or peaks
    top = max(working, key=lambda p: p.max_abs)
    return GraphPeak(graph, precision, len(peaks), top, [p.name for p in peaks if p.nonfinite], peaks)


@dataclass(frozen=True)
class EdgeRun:
    """One generation at the profile's edges: rows alternate lambda (lam, 1 - lam); rows 2, 5, ... are
    in global mode (K = 5 words); concepts and prompts cycle through the calibration set from `first`."""
    size: int
    batch: int
    lam: float
    guidance: float

    @property
    def label(self) -> str:
        return f"{self.size}px b{self.batch} lam{self.lam:g} g{self.guidance:g}"

    def requests(self, concepts: list, prompts: tuple[str, ...], first: int) -> list[Request]:
        out = []
        for j in range(self.batch):
            k = first + j
            lam = self.lam if j % 2 == 0 else 1.0 - self.lam
            mode = "global" if j % 3 == 2 else "local"
            out.append(Request(concepts[k % len(concepts)], prompts[k % len(prompts)], k, mode, "all", lam))
        return out


def edge_runs(ranges: ShapeRanges) -> list[EdgeRun]:
    """Smallest/largest size x batch 1/max; lambda 0 and 1 at both sizes; guidance 1 and 20."""
    lo, hi, bmax = ranges.size[0], ranges.size[2], ranges.batch[2]
    return [EdgeRun(lo, 1, 1.0, 1.0), EdgeRun(lo, bmax, 0.0, 20.0), EdgeRun(hi, 1, 0.0, 20.0),
            EdgeRun(hi, bmax, 1.0, 20.0)]


@dataclass
class Sweep:
    graphs: list[GraphPeak]
    errors: list[str]  # rows the pipeline refused to finish (a stage gave NaN/inf)
    runs: list[str]

    @property
    def ok(self) -> bool:
        return not self.errors and all(not g.nonfinite and g.top.max_abs < FP16_MAX for g in self.graphs)


def sweep(bundle: Bundle, precision: str = "fp16", steps: int = 4, threads: int = 0,
          on_run: Callable[[str], None] | None = None) -> Sweep:
    """The calibration set through every graph of `precision`, at the profile's edges (module doc)."""
    from elite_export.calib import calibration_set
    from elite_export.runtime.pipeline import RuntimePipeline
    from elite_export.runtime.preprocess import load_concept

    for name in GRAPH_NAMES:
        problems = bundle.verify((name,), precision, full=False)
        if problems:
            raise EliteError(f"bundle {bundle.root!r}: {problems[0]}; rebuild it with `elite-export build`")
    runners = {name: PeakRunner(bundle.spec(name), bundle.graph_path(name, precision), threads)
               for name in GRAPH_NAMES}
    pipe = RuntimePipeline(bundle, runners)
    cs = calibration_set()
    concepts = [load_concept(*c) for c in cs.concepts]

    def label(text: str) -> None:
        for r in runners.values():
            r.run_label = text
        if on_run is not None:
            on_run(text)

    label("calibration set")
    words, _ = pipe.encode_concepts(concepts)  # every concept through the concept encoder
    bmax = bundle.ranges.batch[2]
    for mode in ("local", "global"):  # every prompt through the text encoder, K = 1 and 5
        reqs = [Request(concepts[i % len(concepts)], p, 0, mode) for i, p in enumerate(cs.prompts)]
        for s in range(0, len(reqs), bmax):
            chunk = reqs[s:s + bmax]
            pipe.encode_text(chunk, words[[i % len(concepts) for i in range(s, s + len(chunk))]])
    errors, runs, first = [], [], 0
    for run in edge_runs(bundle.ranges):
        label(run.label)
        runs.append(run.label)
        settings = GenerationSettings(steps=steps, guidance=run.guidance, height=run.size, width=run.size)
        result = pipe(run.requests(concepts, cs.prompts, first), settings)
        errors += [f"{run.label}, row {i}: {e}" for i, e in enumerate(result.errors) if e is not None]
        first += run.batch
    return Sweep([summarise(name, precision, runners[name]) for name in GRAPH_NAMES], errors, runs)
