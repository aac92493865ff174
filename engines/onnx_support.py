"""Hold an ONNX graph to TensorRT's ONNX parser support matrix, without TensorRT.

    problems = tensorrt_support_problems("bundle/onnx/fp16/unet-0123.onnx")  # [] when the graph conforms

The matrix, tensorrt_onnx_support.json, is onnx-tensorrt's docs/operators.md as data (TensorRT 10.0:
opsets 9-20; per op: supported, types, restrictions). One line per problem:
  - the model's default-domain opset outside the matrix's range;
  - a node whose op is unsupported or absent from the matrix. Custom ops are excepted by name only:
    the parser's fallback importer looks a plugin up by the node's op type (in any domain), so a node
    passes when its op type is in `plugin_ops`, and any other non-default-domain node is a problem;
  - a node whose data tensors have a type the matrix does not list for the op. Types come from ONNX
    shape inference, value_info, initializers and graph I/O. A node's data tensors are those bound to
    its schema's first type variable and to every other type variable that may hold more than
    integers or more than booleans: Gather's indices (Tind), Equal's BOOL output (T1) and fixed-type
    inputs such as Reshape's shape are not what the matrix's types describe. DOUBLE counts as FP32
    (the matrix: "DOUBLE (cast down)"). A data tensor of unknown type is a problem too;
  - the restrictions that can be checked statically (RESTRICTED_OPS).

"Must be an initializer" (Slice, Squeeze, Pad, Reduce*: `axes`; CumSum: `axis`; Dropout:
`training_mode`) and Unsqueeze's "must be a constant tensor" mean, in the parser's source
(onnxOpImporters.cpp at the matrix's commit), that the input is imported as weights (`is_weights()`,
or a ShapeTensor whose values are all known, which a non-weights input never is). Initializers and
Constant-node outputs are imported as weights; the output of any other node is a tensor, even when it
is computed from constants only (an Identity or Cast of an initializer: the parser folds nothing), so
such an input is a problem.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto

from elite_export.engines.attention_plugin_spec import PLUGIN_OP_NAME

MATRIX_PATH = Path(__file__).with_name("tensorrt_onnx_support.json")
DEFAULT_PLUGIN_OPS = frozenset({PLUGIN_OP_NAME})
DEFAULT_DOMAINS = ("", "ai.onnx")

MATRIX_TYPE_NAMES: dict[int, str] = {
    TensorProto.FLOAT: "FP32", TensorProto.DOUBLE: "FP32", TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16", TensorProto.INT32: "INT32", TensorProto.INT64: "INT64",
    TensorProto.BOOL: "BOOL", TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.INT4: "INT4",
    TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.FLOAT8E4M3FNUZ: "FP8", TensorProto.FLOAT8E5M2: "FP8",
    TensorProto.FLOAT8E5M2FNUZ: "FP8"}
INTEGER_TYPES = {"tensor(int32)", "tensor(int64)"}
BOOL_TYPES = {"tensor(bool)"}

REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
              "ReduceProd", "ReduceSum", "ReduceSumSquare")
# op -> {input index: (input name, the matrix's wording)}
CONSTANT_INPUTS: dict[str, dict[int, tuple[str, str]]] = {
    "Slice": {3: ("axes", "must be an initializer")},
    "Squeeze": {1: ("axes", "must be an initializer")},
    "Pad": {3: ("axes", "must be an initializer")},
    "CumSum": {1: ("axis", "must be an initializer")},
    "Dropout": {2: ("training_mode", "must be an initializer")},
    "Unsqueeze": {1: ("axes", "must be a constant tensor")},
    **{op: {1: ("axes", "must be an initializer")} for op in REDUCE_OPS}}
RESIZE_MODES = ("nearest", "linear")
RESIZE_COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners")
RESIZE_NEAREST_MODES = ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil")
TOPK_MAX_K = 3840


@dataclass(frozen=True)
class OpSupport:
    supported: bool
    types: frozenset[str]
    restrictions: str


@dataclass(frozen=True)
class SupportMatrix:
    opsets: tuple[int, int]  # inclusive
    operators: dict[str, OpSupport]


@cache
def support_matrix(path: str | os.PathLike = MATRIX_PATH) -> SupportMatrix:
    with open(path) as f:
        data = json.load(f)
    ops = {name: OpSupport(op["supported"], frozenset(t for t in op["types"] if t), op["restrictions"])
           for name, op in data["operators"].items()}
    return SupportMatrix(tuple(data["opset_range"]), ops)


@dataclass
class Scope:
    """What one graph (or subgraph, with its outer scope's names) knows about its tensors."""
    types: dict[str, int]  # name -> TensorProto elem type
    ranks: dict[str, int]
    constants: dict[str, TensorProto | onnx.AttributeProto]  # imported as weights: initializers, Constant outputs
    consumed: set[str]  # names read by any node or graph output, anywhere in the model
    base_dir: str = ""  # where external data lives
    problems: list[str] = field(default_factory=list)

    def value(self, name: str) -> np.ndarray | None:
        """The constant's value (None when it has none that TensorRT reads: a string or sparse Constant)."""
        const = self.constants.get(name)
        if isinstance(const, onnx.AttributeProto):
            if const.name not in ("value", "value_float", "value_floats", "value_int", "value_ints"):
                return None
            const = onnx.helper.get_attribute_value(const)
        if isinstance(const, TensorProto):
            return onnx.numpy_helper.to_array(const, self.base_dir)
        return None if const is None else np.asarray(const)


def tensorrt_support_problems(model: onnx.ModelProto | str | os.PathLike,
                              plugin_ops: set[str] | frozenset[str] = DEFAULT_PLUGIN_OPS,
                              matrix: SupportMatrix | None = None) -> list[str]:
    """One line per way `model` (a ModelProto, or a path: weights stay on disk) breaks the matrix."""
    matrix = matrix or support_matrix()
    if isinstance(model, onnx.ModelProto):
        proto, base_dir = model, ""
    else:
        proto, base_dir = onnx.load(model, load_external_data=False), os.path.dirname(os.fspath(model))
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    opset = next((o.version for o in proto.opset_import if o.domain in DEFAULT_DOMAINS), None)
    if opset is None:
        return ["model imports no default-domain opset"]
    problems = []
    lo, hi = matrix.opsets
    if not lo <= opset <= hi:
        problems.append(f"model: default-domain opset {opset} is outside TensorRT's supported range {lo}-{hi}")
    inferred = onnx.shape_inference.infer_shapes(proto)  # a ModelProto past 2 GB raises: pass its path
    scope = Scope({}, {}, {}, consumed_names(inferred.graph), base_dir)
    check_graph(inferred.graph, scope, matrix, frozenset(plugin_ops), opset)
    return problems + scope.problems


def consumed_names(graph: onnx.GraphProto) -> set[str]:
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for g in subgraphs(node):
            names |= consumed_names(g)
    return names


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH] + \
           [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]


def check_graph(graph: onnx.GraphProto, outer: Scope, matrix: SupportMatrix, plugin_ops: frozenset[str],
                opset: int) -> None:
    scope = Scope(dict(outer.types), dict(outer.ranks), dict(outer.constants), outer.consumed, outer.base_dir,
                  outer.problems)
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        tt = vi.type.tensor_type
        if tt.elem_type:
            scope.types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            scope.ranks[vi.name] = len(tt.shape.dim)
    for init in graph.initializer:
        scope.types[init.name], scope.ranks[init.name] = init.data_type, len(init.dims)
        scope.constants[init.name] = init
    for index, node in enumerate(graph.node):
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.attribute:
            scope.constants[node.output[0]] = node.attribute[0]
        where = f"node {node.name or f'#{index}'!r} ({node.op_type})"
        scope.problems.extend(f"{where}: {p}" for p in node_problems(node, scope, matrix, plugin_ops, opset))
        for g in subgraphs(node):
            check_graph(g, scope, matrix, plugin_ops, opset)


def node_problems(node: onnx.NodeProto, scope: Scope, matrix: SupportMatrix, plugin_ops: frozenset[str],
                  opset: int) -> list[str]:
    if node.op_type in plugin_ops:
        return []
    if node.domain not in DEFAULT_DOMAINS:
        return [f"custom op in domain {node.domain!r} that is not one of plugin_ops {sorted(plugin_ops)}"]
    op = matrix.operators.get(node.op_type)
    if op is None:
        return ["op not in TensorRT's ONNX support matrix"]
    if not op.supported:
        return ["op not supported by TensorRT's ONNX parser"]
    problem = type_problem(node, scope, op, opset)
    check = RESTRICTED_OPS.get(node.op_type)
    return ([problem] if problem else []) + (check(node, scope) if check else [])


def data_tensors(node: onnx.NodeProto, opset: int) -> list[str]:
    """The node's inputs and outputs bound to the type variables the matrix's types describe."""
    schema = onnx.defs.get_schema(node.op_type, opset, "")
    first = (list(schema.inputs) or list(schema.outputs))[0].type_str
    checked = {c.type_param_str for c in schema.type_constraints
               if c.type_param_str == first
               or not (set(c.allowed_type_strs) <= INTEGER_TYPES or set(c.allowed_type_strs) <= BOOL_TYPES)}
    names = []
    for formals, actuals in ((schema.inputs, node.input), (schema.outputs, node.output)):
        for i, name in enumerate(actuals):
            if name and formals and formals[min(i, len(formals) - 1)].type_str in checked:  # the last may be variadic
                names.append(name)
    return names


def type_problem(node: onnx.NodeProto, scope: Scope, op: OpSupport, opset: int) -> str | None:
    bad = []
    for name in dict.fromkeys(data_tensors(node, opset)):
        elem = scope.types.get(name)
        if elem is None:
            bad.append(f"{name!r} of unknown type")
        elif MATRIX_TYPE_NAMES.get(elem) not in op.types:
            bad.append(f"{name!r} {TensorProto.DataType.Name(elem)}")
    if not bad:
        return None
    return f"tensor types not supported: {', '.join(bad)} (TensorRT: {', '.join(sorted(op.types))})"


def attr(node: onnx.NodeProto, name: str, default=None):
    found = [a for a in node.attribute if a.name == name]
    value = onnx.helper.get_attribute_value(found[0]) if found else default
    return value.decode() if isinstance(value, bytes) else value


def input_at(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if i < len(node.input) else ""


def constant_input_problems(node: onnx.NodeProto, scope: Scope) -> list[str]:
    return [f"`{what}` {wording}, but {input_at(node, i)!r} is neither an initializer nor a Constant node's output"
            for i, (what, wording) in CONSTANT_INPUTS[node.op_type].items()
            if input_at(node, i) and input_at(node, i) not in scope.constants]


def used_extra_outputs(node: onnx.NodeProto, scope: Scope) -> list[str]:
    return [o for o in node.output[1:] if o and o in scope.consumed]


def resize_problems(node: onnx.NodeProto, scope: Scope) -> list[str]:
    problems = []
    for name, allowed, default in (("mode", RESIZE_MODES, "nearest"),
                                   ("coordinate_transformation_mode", RESIZE_COORDINATE_MODES, "half_pixel"),
                                   ("nearest_mode", RESIZE_NEAREST_MODES, "round_prefer_floor"),
                                   ("keep_aspect_ratio_policy", ("stretch",), "stretch")):
        value = attr(node, name, default)
        if value not in allowed:
            problems.append(f"{name} {value!r} unsupported (TensorRT: {', '.join(allowed)})")
    if attr(node, "antialias", 0):
        problems.append("antialiasing is not supported")
    scales, axes, rank = input_at(node, 2), attr(node, "axes"), scope.ranks.get(input_at(node, 0))
    if scales and scales not in scope.constants and axes is not None and list(axes) != list(range(rank or -1)):
        problems.append(f"`axes` {list(axes)} must be an iota vector of length rank(input) when `scales` is a tensor")
    return problems


def pool_problems(node: onnx.NodeProto, scope: Scope) -> list[str]:
    problems = []
    rank = scope.ranks.get(node.input[0])
    if node.op_type != "LpPool" and rank not in (4, 5):
        problems.append(f"2D or 3D pooling only; input rank is {rank if rank is not None else 'unknown'}")
    if any(d != 1 for d in attr(node, "dilations", [])):
        problems.append(f"`dilations` must be empty or all ones, got {list(attr(node, 'dilations'))}")
    if node.op_type == "MaxPool" and used_extra_outputs(node, scope):
        problems.append("the `Indices` output is unsupported")
    return problems


def dropout_problems(node: onnx.NodeProto, scope: Scope) -> list[str]:
    problems = constant_input_problems(node, scope)
    mode = scope.value(input_at(node, 2))
    if mode is not None and mode.any():
        problems.append("`training_mode` must evaluate to False")
    return problems


def topk_problems(node: onnx.NodeProto, scope: Scope) -> list[str]:
    problems = [] if attr(node, "sorted", 1) == 1 else ["`sorted` must be 1"]
    k = scope.value(input_at(node, 1))
    if k is not None and int(k.reshape(-1)[0]) >= TOPK_MAX_K:
        problems.append(f"`K` must be less than {TOPK_MAX_K}, got {int(k.reshape(-1)[0])}")
    return problems


def constant_problems(node: onnx.NodeProto, scope: Scope) -> list[str]:
    return [f"the `{a.name}` attribute is unsupported" for a in node.attribute
            if a.name in ("sparse_value", "value_string", "value_strings")]


def layer_norm_problems(node: onnx.NodeProto, scope: Scope) -> list[str]:
    used = used_extra_outputs(node, scope)
    return [f"only the first output `Y` is supported; {', '.join(map(repr, used))} used"] if used else []


RESTRICTED_OPS = {
    **{op: constant_input_problems for op in CONSTANT_INPUTS},
    "Resize": resize_problems, "AveragePool": pool_problems, "MaxPool": pool_problems, "LpPool": pool_problems,
    "Dropout": dropout_problems, "TopK": topk_problems, "Constant": constant_problems,
    "LayerNormalization": layer_norm_problems}
