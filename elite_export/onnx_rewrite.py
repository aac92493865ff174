"""Small ONNX graph surgery for pattern-matching passes (ort_fusion.py): a read-only index of a graph
(producers, consumers, constants, the shapes the exporter recorded) and in-place rewrites that put
new nodes where a matched node was, drop the matched nodes, and clean up what became dead.

Works on models loaded without their external data (weights are only referenced, never read)."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper


class GraphIndex:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.graph = g
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in g.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.initializers = {t.name: t for t in g.initializer}
        self.outputs = {o.name for o in g.output}
        self.shapes = {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                                for d in v.type.tensor_type.shape.dim]
                       for v in [*g.value_info, *g.input, *g.output] if v.type.tensor_type.HasField("shape")}

    def constant(self, name: str) -> onnx.TensorProto | None:
        """The tensor of an initializer or Constant node, else None."""
        t = self.initializers.get(name)
        if t is None:
            node = self.producer.get(name)
            if node is None or node.op_type != "Constant" or node.attribute[0].name != "value":
                return None
            t = node.attribute[0].t
        return t

    def array(self, name: str, max_elements: int | None = None) -> np.ndarray | None:
        """A constant's value (None: not a constant, its data not loaded, or over max_elements)."""
        t = self.constant(name)
        if t is None or t.data_location == onnx.TensorProto.EXTERNAL:
            return None
        if max_elements is not None and np.prod(t.dims, dtype=int) > max_elements:
            return None
        return numpy_helper.to_array(t)

    def scalar(self, name: str) -> float | None:
        """The value of a one-element constant (initializer or Constant node), else None."""
        a = self.array(name, max_elements=1)
        return None if a is None or a.size != 1 else float(a.reshape(()))

    def scalar_operand(self, node: onnx.NodeProto) -> tuple[float, str] | None:
        """(constant, other input) of a binary node with exactly one scalar-constant input."""
        consts = [self.scalar(i) for i in node.input]
        if len(node.input) != 2 or sum(c is not None for c in consts) != 1:
            return None
        return (consts[0], node.input[1]) if consts[0] is not None else (consts[1], node.input[0])

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def op_key(self, node: onnx.NodeProto) -> str:
        """The op type; Transposes with their permutation ("T0213")."""
        if node.op_type == "Transpose":
            perm = next(list(a.ints) for a in node.attribute if a.name == "perm")
            return "T" + "".join(map(str, perm))
        return node.op_type

    def attribute(self, node: onnx.NodeProto, name: str, default=None):
        return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


@dataclass
class Rewrite:
    """Replace `drop` (anchor included) by `nodes`, placed where `anchor` was."""
    anchor: onnx.NodeProto
    nodes: list[onnx.NodeProto]
    drop: tuple[onnx.NodeProto, ...]
    initializers: list[onnx.TensorProto] = field(default_factory=list)


def apply_rewrites(model: onnx.ModelProto, rewrites: list[Rewrite], domain: str | None = None) -> None:
    """Splice the rewrites in (node order stays topological when each anchor comes after its new nodes'
    inputs and before its outputs' users), import `domain`, remove dead nodes."""
    at = {id(r.anchor): r for r in rewrites}
    dropped = {id(n) for r in rewrites for n in r.drop}
    nodes = []
    for n in model.graph.node:
        if id(n) in at:
            nodes += at[id(n)].nodes
        elif id(n) not in dropped:
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(t for r in rewrites for t in r.initializers)
    if domain and not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    remove_dead_nodes(model)


def remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes (and initializers, value_info) nothing reaches from the graph outputs."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    live_tensors = {o.name for o in g.output}
    live_nodes: set[int] = set()
    stack = list(live_tensors)
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in live_nodes:
            continue
        live_nodes.add(id(node))
        for i in node.input:
            if i and i not in live_tensors:
                live_tensors.add(i)
                stack.append(i)
    keep = [n for n in g.node if id(n) in live_nodes]
    del g.node[:]
    g.node.extend(keep)
    for entries in (g.initializer, g.value_info):
        kept = [t for t in entries if t.name in live_tensors]
        del entries[:]
        entries.extend(kept)
