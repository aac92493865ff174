"""Fusions for the CUDA graph variant (bundle onnx/cuda/, ONNX Runtime's CUDA provider only), on top of
ort_fusion's attention -> MultiHeadAttention: com.microsoft ops that have CUDA kernels and no CPU ones.
Applied to the unfused fp32 export, before the fp16 conversion (cuda_variant.py).

    group_norm       x [N,C,H,W] -> Reshape [N,G,-1] -> InstanceNormalization(ones, zeros, eps) -> Reshape
                     back -> Mul gamma [C,1,1] -> Add beta [C,1,1] (-> SiLU: Sigmoid and Mul, when nothing
                     else reads the affine output); not an attention's GroupNorm over [N,C,L] tokens (the
                     VAE's: gamma [C,1]), which stays
                  => Transpose to NHWC -> GroupNorm(gamma [C], beta [C] in fp32, groups G, epsilon,
                     activation 1 with the SiLU absorbed, channels_last 1) -> Transpose back to NCHW
    bias_split_gelu  GEGLU: MatMul -> Add bias [2F] -> Split in halves on the last axis -> left * gelu(right),
                     gelu the exact erf form x * 0.5 * (1 + erf(x / sqrt 2))
                  => BiasSplitGelu(MatMul output, bias) -> [.., F]
    bias_add         MatMul -> Add bias [C] -> Add skip, both [B,S,C]  => BiasAdd(MatMul output, bias, skip)

Each fuses only the shapes ONNX Runtime's CUDA kernels take (contrib_ops/cuda/diffusion: GroupNorm reads
two channels per thread, so C/G even, C/G <= 512, G <= 32; BiasSplitGelu 2F in 2560/5120/10240; BiasAdd
C in 320/640/1280): Stable Diffusion's widths. A graph fused past them would fail at run time, so the toy
model's variant (32-64 channels) keeps its GEGLUs and residual adds and fuses the GroupNorms with an
even C/G only. The kernels have no CPU implementation: tests check these graphs' values with
onnx.reference and numpy implementations of the ops' documented semantics (tests/contrib_reference.py).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from elite_export.onnx_rewrite import GraphIndex, Rewrite

GROUP_NORM_MAX_GROUPS = 32
GROUP_NORM_MAX_CHANNELS_PER_GROUP = 512
BIAS_SPLIT_GELU_WIDTHS = (2560, 5120, 10240)  # 2F: the GEGLU projection's output width
BIAS_ADD_CHANNELS = (320, 640, 1280)


def group_norm_supported(channels: int, groups: int) -> bool:
    per_group = channels // groups if groups else 0
    return (groups <= GROUP_NORM_MAX_GROUPS and channels % groups == 0 and per_group % 2 == 0
            and per_group <= GROUP_NORM_MAX_CHANNELS_PER_GROUP)


def only_used_by(g: GraphIndex, tensors, nodes) -> bool:
    """Every reader of `tensors` is among `nodes`, and none of them is a graph output."""
    ids = {id(n) for n in nodes}
    return all(t not in g.outputs and all(id(c) in ids for c in g.consumers.get(t, [])) for t in tensors)


def constant_operand(g: GraphIndex, node: onnx.NodeProto) -> tuple[np.ndarray, str] | None:
    """(value, other input) of a binary node with exactly one loaded-constant input."""
    if len(node.input) != 2:
        return None
    arrays = [g.array(i) for i in node.input]
    if sum(a is not None for a in arrays) != 1:
        return None
    return (arrays[0], node.input[1]) if arrays[0] is not None else (arrays[1], node.input[0])


# --- GroupNorm ------------------------------------------------------------------------------------
def match_group_norm(g: GraphIndex, norm: onnx.NodeProto) -> Rewrite | None:
    reshape_in, reshape_out = g.producer.get(norm.input[0]), g.only_consumer(norm.output[0])
    if reshape_in is None or reshape_in.op_type != "Reshape" or reshape_out is None or reshape_out.op_type != "Reshape":
        return None
    scale, bias = g.array(norm.input[1]), g.array(norm.input[2])
    if scale is None or bias is None or scale.ndim != 1 or not (np.all(scale == 1) and np.all(bias == 0)):
        return None
    groups, x = int(scale.shape[0]), reshape_in.input[0]
    target = g.array(reshape_in.input[1])  # [0 (or N), G, -1]
    if target is None or target.shape != (3,) or target.tolist()[1:] != [groups, -1]:
        return None
    shape_src = g.producer.get(reshape_out.input[1])
    static_back = g.array(reshape_out.input[1])
    if not ((shape_src is not None and shape_src.op_type == "Shape" and shape_src.input[0] == x)
            or (static_back is not None and list(static_back) == g.shapes.get(x))):
        return None
    mul = g.only_consumer(reshape_out.output[0])
    if mul is None or mul.op_type != "Mul" or (gamma := constant_operand(g, mul)) is None:
        return None
    add = g.only_consumer(mul.output[0])
    if add is None or add.op_type != "Add" or (beta := constant_operand(g, add)) is None:
        return None
    channels = gamma[0].size
    if gamma[0].shape[-2:] != (1, 1) or beta[0].shape != gamma[0].shape or not group_norm_supported(channels, groups):
        return None
    nodes, last, silu = [reshape_in, norm, reshape_out, mul, add], add, 0
    readers = g.consumers.get(add.output[0], [])
    sigmoid = next((c for c in readers if c.op_type == "Sigmoid"), None)
    swish = next((c for c in readers if c.op_type == "Mul" and set(c.input) == {add.output[0],
                                                                                 sigmoid.output[0] if sigmoid else ""}), None)
    if sigmoid is not None and swish is not None and len(readers) == 2 and add.output[0] not in g.outputs \
            and only_used_by(g, [sigmoid.output[0]], [swish]):
        nodes, last, silu = nodes + [sigmoid, swish], swish, 1
    if not only_used_by(g, [n.output[0] for n in nodes[:-1]], nodes):
        return None
    name, out = norm.name, last.output[0]
    w = numpy_helper.from_array(gamma[0].reshape(-1).astype(np.float32), f"{name}/gamma")
    b = numpy_helper.from_array(beta[0].reshape(-1).astype(np.float32), f"{name}/beta")
    eps = g.attribute(norm, "epsilon", 1e-5)
    new = [helper.make_node("Transpose", [x], [f"{out}/nhwc_in"], name=f"{name}/to_nhwc", perm=[0, 2, 3, 1]),
           helper.make_node("GroupNorm", [f"{out}/nhwc_in", w.name, b.name], [f"{out}/nhwc"], name=f"{name}/GroupNorm",
                            domain="com.microsoft", groups=groups, epsilon=eps, activation=silu, channels_last=1),
           helper.make_node("Transpose", [f"{out}/nhwc"], [out], name=f"{name}/to_nchw", perm=[0, 3, 1, 2])]
    return Rewrite(last, new, tuple(nodes), [w, b])


def group_norm_rewrites(g: GraphIndex) -> list[Rewrite]:
    return [r for n in g.graph.node if n.op_type == "InstanceNormalization" and (r := match_group_norm(g, n))]


# --- BiasSplitGelu --------------------------------------------------------------------------------
def erf_gelu_input(g: GraphIndex, name: str) -> tuple[str, list[onnx.NodeProto]] | None:
    """(x, nodes) when `name` is x * 0.5 * (1 + erf(x / sqrt 2)) (the factors in either order)."""
    out = g.producer.get(name)
    if out is None or out.op_type != "Mul":
        return None
    for x, rest in ((out.input[0], out.input[1]), (out.input[1], out.input[0])):
        half = g.producer.get(rest)
        if half is None or half.op_type != "Mul" or (c := g.scalar_operand(half)) is None or abs(c[0] - 0.5) > 1e-6:
            continue
        one = g.producer.get(c[1])
        if one is None or one.op_type != "Add" or (c1 := g.scalar_operand(one)) is None or abs(c1[0] - 1) > 1e-6:
            continue
        erf = g.producer.get(c1[1])
        div = g.producer.get(erf.input[0]) if erf is not None and erf.op_type == "Erf" else None
        c2 = g.scalar_operand(div) if div is not None and div.op_type in ("Div", "Mul") else None
        if c2 is None or c2[1] != x or div.input[0] != x:
            continue
        factor = c2[0] if div.op_type == "Div" else 1 / c2[0]
        if abs(factor - math.sqrt(2)) < 1e-5:
            return x, [div, erf, one, half, out]
    return None


def match_bias_split_gelu(g: GraphIndex, mul: onnx.NodeProto) -> Rewrite | None:
    for left, right in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        gelu = erf_gelu_input(g, right)
        split = g.producer.get(left)
        if gelu is None or split is None or split.op_type != "Split" or list(split.output) != [left, gelu[0]]:
            continue
        add = g.producer.get(split.input[0])
        if add is None or add.op_type != "Add" or (bias := constant_operand(g, add)) is None:
            continue
        matmul = g.producer.get(bias[1])
        width, rank = bias[0].size, len(g.shapes.get(split.input[0], ()))
        axis = g.attribute(split, "axis", 0)
        sizes = g.array(split.input[1]) if len(split.input) > 1 and split.input[1] else None
        halves = (sizes is None and g.attribute(split, "num_outputs", 2) == 2) or \
            (sizes is not None and list(sizes) == [width // 2] * 2)
        if matmul is None or matmul.op_type != "MatMul" or bias[0].ndim != 1 or width not in BIAS_SPLIT_GELU_WIDTHS \
                or rank != 3 or axis not in (-1, 2) or not halves:
            continue
        nodes = [add, split, *gelu[1], mul]
        if not only_used_by(g, [add.output[0], left, gelu[0], *[n.output[0] for n in gelu[1]]], nodes):
            continue
        bias_name = add.input[1] if add.input[0] == bias[1] else add.input[0]
        node = helper.make_node("BiasSplitGelu", [matmul.output[0], bias_name], [mul.output[0]],
                                name=f"{mul.name}/BiasSplitGelu", domain="com.microsoft")
        return Rewrite(mul, [node], tuple(nodes))
    return None


def bias_split_gelu_rewrites(g: GraphIndex) -> list[Rewrite]:
    return [r for n in g.graph.node if n.op_type == "Mul" and (r := match_bias_split_gelu(g, n))]


# --- BiasAdd --------------------------------------------------------------------------------------
def match_bias_add(g: GraphIndex, outer: onnx.NodeProto) -> Rewrite | None:
    if len(outer.input) != 2:
        return None
    for inner_out, skip in ((outer.input[0], outer.input[1]), (outer.input[1], outer.input[0])):
        inner = g.producer.get(inner_out)
        if inner is None or inner.op_type != "Add" or (bias := constant_operand(g, inner)) is None:
            continue
        matmul = g.producer.get(bias[1])
        shape = g.shapes.get(outer.output[0])
        if matmul is None or matmul.op_type != "MatMul" or bias[0].ndim != 1 or shape is None or len(shape) != 3 \
                or bias[0].size not in BIAS_ADD_CHANNELS or g.shapes.get(skip) != shape \
                or g.shapes.get(matmul.output[0]) != shape or not only_used_by(g, [inner_out], [outer]):
            continue
        bias_name = inner.input[1] if inner.input[0] == bias[1] else inner.input[0]
        node = helper.make_node("BiasAdd", [matmul.output[0], bias_name, skip], [outer.output[0]],
                                name=f"{outer.name}/BiasAdd", domain="com.microsoft")
        return Rewrite(outer, [node], (inner, outer))
    return None


def bias_add_rewrites(g: GraphIndex) -> list[Rewrite]:
    """(An inner Add reads a MatMul and a constant, so it is never an outer Add: matches cannot overlap.)"""
    return [r for n in g.graph.node if n.op_type == "Add" and (r := match_bias_add(g, n))]


CUDA_PASSES = {"group_norm": group_norm_rewrites, "bias_split_gelu": bias_split_gelu_rewrites,
               "bias_add": bias_add_rewrites}
