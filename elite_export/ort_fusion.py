"""ONNX Runtime fusions for the fp32 graphs (CPU). The fp16 graphs for TensorRT stay unfused: they are
converted from the unfused export (bundle_build), and TensorRT does its own fusions.

    attention  each plain attention of a dynamo export,
                   q3, k3, v3 [B,S,H*d] -> view(B,S,H,d).transpose(1,2) -> (q k^T) * scale -> Softmax
                   -> @ v -> transpose(1,2).reshape(B,S,H*d)
               -> one com.microsoft.MultiHeadAttention(q3, k3, v3, num_heads=H, scale=scale) (a flash-style
               CPU kernel). Matched: every UNet self-attention (attn1), ELITE's local branch in attn2
               (softmax(q k_l^T) v_l; its output put back in heads layout for the per-row scale), the CLIP
               vision and VAE attentions. Left alone: the attn2 main branch, whose probabilities ELITE
               reads at the placeholder, and masked attention (the text encoder).

Measured on the SD-size UNet (CPU, 256 px): attention fusion 2-4 % faster. Rewriting erf-Gelu into
com.microsoft.Gelu and GEGLU's Split into two half-width matmuls changed nothing measurable, so they
are not done. onnxruntime's own `optimize_model(model_type="unet")` finds no attention in these
exports (its patterns follow TorchScript exports) and adds CUDA-only ops: on the toy UNet, fp32 or fp16,
it fuses 49 NhwcConv and nothing else (no GroupNorm, BiasSplitGelu or BiasAdd either; onnxruntime 1.32).
The CUDA variant's own passes (GroupNorm, BiasSplitGelu, BiasAdd) are in ort_fusion_cuda.py.
Graphs with external data are rewritten without loading their weights (the data file is untouched).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from elite_export.onnx_rewrite import GraphIndex, Rewrite, apply_rewrites

MS_DOMAIN = "com.microsoft"
SPLIT = ("T0213", "Reshape")  # walking back from [B,H,S,d]: transpose(1,2) of view(B,S,H,d)
K_CHAINS = (  # k^T in heads layout [B,H,d,L], walking back from the scores' MatMul
    ("T0132", "T0213", "Reshape"),  # k.transpose(-1,-2) of heads(k)
    ("T0231", "Reshape"),  # heads(k) and the transpose folded into one
    ("Reshape", "T021", "Reshape", "T0213", "Reshape"),  # SDPA's decomposition: via [B*H,L,d]
)


def walk_back(g: GraphIndex, name: str) -> tuple[str, tuple[str, ...], float]:
    """Follow Reshape / Transpose / Mul-by-constant back from `name`: (source tensor, the reshape and
    transpose steps met, product of the constants)."""
    steps, scale = [], 1.0
    while (node := g.producer.get(name)) is not None:
        if node.op_type == "Mul" and (operand := g.scalar_operand(node)) is not None:
            scale *= operand[0]
            name = operand[1]
        elif node.op_type in ("Reshape", "Transpose"):
            steps.append(g.op_key(node))
            name = node.input[0]
        else:
            break
    return name, tuple(steps), scale


def heads_of(g: GraphIndex, name: str) -> tuple[int, int] | None:
    """(H, d) from the [B,H,S,d] shape the exporter recorded for `name`."""
    shape = g.shapes.get(name)
    if shape is None or len(shape) != 4 or not all(isinstance(x, int) and x > 0 for x in shape[1::2]):
        return None
    return shape[1], shape[3]


@dataclass
class Attention:
    q: str
    k: str
    v: str
    heads: int
    head_dim: int
    scale: float
    pv_matmul: onnx.NodeProto  # P @ v [B,H,S,d]: the fused node takes its place
    output: str  # the [B,S,H*d] tensor after it, or P @ v's own output (heads layout) when there is none
    merge_back: tuple[onnx.NodeProto, ...] = ()  # the transpose + reshape to `output`, dropped


def match_attention(g: GraphIndex, softmax: onnx.NodeProto) -> Attention | None:
    pv = g.only_consumer(softmax.output[0])
    if g.attribute(softmax, "axis", -1) not in (-1, 3) or pv is None or pv.op_type != "MatMul" \
            or pv.input[0] != softmax.output[0]:
        return None
    scores, scale = softmax.input[0], 1.0
    while (node := g.producer.get(scores)) is not None and node.op_type == "Mul":
        if (operand := g.scalar_operand(node)) is None:
            return None
        scale, scores = scale * operand[0], operand[1]
    qk, heads = g.producer.get(scores), heads_of(g, pv.output[0])
    if qk is None or qk.op_type != "MatMul" or heads is None:
        return None
    (q, q_steps, q_scale), (k, k_steps, k_scale), (v, v_steps, v_scale) = (
        walk_back(g, qk.input[0]), walk_back(g, qk.input[1]), walk_back(g, pv.input[1]))
    if q_steps != SPLIT or v_steps != SPLIT or k_steps not in K_CHAINS or v_scale != 1.0:
        return None
    a = Attention(q, k, v, heads[0], heads[1], scale * q_scale * k_scale, pv, pv.output[0])
    t = g.only_consumer(pv.output[0])
    r = g.only_consumer(t.output[0]) if t is not None and g.op_key(t) == "T0213" else None
    if r is not None and r.op_type == "Reshape" and len(g.shapes.get(r.output[0], ())) == 3:
        a.output, a.merge_back = r.output[0], (t, r)
    return a


def attention_rewrite(a: Attention) -> Rewrite:
    """MultiHeadAttention (and, where the output stays in heads layout, its view back to [B,H,S,d])."""
    name = a.pv_matmul.name
    out3 = a.output if a.merge_back else f"{a.output}/mha"
    nodes = [helper.make_node("MultiHeadAttention", [a.q, a.k, a.v], [out3], name=f"{name}/MultiHeadAttention",
                              domain=MS_DOMAIN, num_heads=a.heads, scale=a.scale)]
    inits = []
    if not a.merge_back:
        shape = numpy_helper.from_array(np.array([0, 0, a.heads, a.head_dim], np.int64), f"{a.output}/heads_shape")
        inits.append(shape)
        nodes += [helper.make_node("Reshape", [out3, shape.name], [f"{a.output}/heads"], name=f"{name}/split_heads"),
                  helper.make_node("Transpose", [f"{a.output}/heads"], [a.output], name=f"{name}/to_bhsd",
                                   perm=[0, 2, 1, 3])]
    return Rewrite(a.pv_matmul, nodes, (a.pv_matmul, *a.merge_back), inits)


def attention_rewrites(g: GraphIndex) -> list[Rewrite]:
    return [attention_rewrite(a) for n in g.graph.node
            if n.op_type == "Softmax" and (a := match_attention(g, n)) is not None]


PASSES = {"attention": attention_rewrites}


def fuse_for_ort(model: onnx.ModelProto, passes: dict | None = None) -> dict[str, int]:
    """Every pass (default: PASSES, the CPU graphs') on `model`, in place, in order; returns how many places
    each pass rewrote. ort_fusion_cuda.CUDA_PASSES adds the CUDA-only ones."""
    counts = {}
    for name, find in (PASSES if passes is None else passes).items():
        rewrites = find(GraphIndex(model))
        if rewrites:
            apply_rewrites(model, rewrites, MS_DOMAIN)
        counts[name] = len(rewrites)
    return counts


def fuse_for_ort_file(src: str, dst: str) -> dict[str, int]:
    """fuse_for_ort on the graph at `src`, written to `dst` (which may be `src`). Weights in an external
    data file stay where they are: `dst` must be beside it."""
    model = onnx.load(src, load_external_data=False)
    counts = fuse_for_ort(model)
    tmp = dst + ".part"
    onnx.save_model(model, tmp)
    os.replace(tmp, dst)
    return counts


def op_counts(path: str) -> Counter:
    """{op type: count} of a graph's nodes (tests hold the fused ones to expectations)."""
    return Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)
