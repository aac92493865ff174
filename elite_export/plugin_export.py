"""ELITE cross-attention as one custom ONNX node: the TensorRT plugin's node (see
engines/attention_plugin_spec.py for the wiring TensorRT's parser expects).

The torch op `elite::cross_attention` (engines/attention_op.py) is translated by the dynamo
exporter into `elite.cross_attention(q, k, v, k_l, v_l, idx:int32) -> (out_g, out_l, m:fp32)`
(k_l, v_l [B,C,H,Nl,d], idx [B,C]: one local branch per concept; attention_plugin_spec.py)
with the plugin's attributes; the per-sample max, scale and add that follow stay standard ops.
`CrossAttentionNode` evaluates the node with onnx.reference for tests (the independent formula).
"""
from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import defs
from onnx.reference.op_run import OpRun

from elite_export.engines.attention_plugin_spec import (INPUT_NAMES, ONNX_NODE_ATTRIBUTES, OUTPUT_NAMES,
                                                        PLUGIN_DOMAIN_VERSION, PLUGIN_NAMESPACE, PLUGIN_OP_NAME)


@functools.cache
def register_schema() -> None:
    """Tell onnx (checker, shape inference, the exporter) the node's inputs, outputs and attributes."""
    param = defs.OpSchema.FormalParameter
    attr = defs.OpSchema.Attribute
    types = {"idx": "I", "m": "M"}
    defs.register_schema(defs.OpSchema(
        PLUGIN_OP_NAME, PLUGIN_NAMESPACE, PLUGIN_DOMAIN_VERSION,
        inputs=[param(n, types.get(n, "T")) for n in INPUT_NAMES],
        outputs=[param(n, types.get(n, "T")) for n in OUTPUT_NAMES],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "q, k, v, k_l, v_l, out_g, out_l"),
                          ("I", ["tensor(int32)"], "placeholder index"), ("M", ["tensor(float)"], "m: fp32")],
        attributes=[attr(name, defs.OpSchema.AttrType.STRING if isinstance(v, str) else defs.OpSchema.AttrType.INT,
                         "TensorRT plugin field") for name, v in ONNX_NODE_ATTRIBUTES.items()]))


@functools.cache
def translation_table() -> dict:
    """{torch op: onnxscript function} for torch.onnx.export(custom_translation_table=...)."""
    import onnxscript
    import torch

    import elite_export.engines.attention_op  # noqa: F401 - registers torch.ops.elite.cross_attention

    register_schema()
    elite = onnxscript.values.Opset(PLUGIN_NAMESPACE, PLUGIN_DOMAIN_VERSION)

    def cross_attention(q, k, v, k_l, v_l, idx):
        return getattr(elite, PLUGIN_OP_NAME)(q, k, v, k_l, v_l, idx, **ONNX_NODE_ATTRIBUTES)

    return {torch.ops.elite.cross_attention.default: cross_attention}


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == PLUGIN_NAMESPACE and n.op_type == PLUGIN_OP_NAME]


def keep_m_fp32(model: onnx.ModelProto) -> None:
    """After fp16 conversion: the plugin's m output is fp32 whatever its inputs are."""
    m_names = {n.output[2] for n in plugin_nodes(model)}
    for vi in model.graph.value_info:
        if vi.name in m_names:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class CrossAttentionNode(OpRun):
    """onnx.reference implementation of the plugin node: DESIGN.md's formula in float64."""
    op_domain = PLUGIN_NAMESPACE

    def _run(self, q, k, v, k_l, v_l, idx, plugin_namespace=None, plugin_version=None, aot=None):
        scale = q.shape[-1] ** -0.5
        q64, k64, v64, kl64, vl64 = (a.astype(np.float64) for a in (q, k, v, k_l, v_l))
        p = _softmax(q64 @ k64.swapaxes(-1, -2) * scale)  # [B,H,Nq,Nk]
        p_l = _softmax(q64[:, None] @ kl64.swapaxes(-1, -2) * scale)  # [B,C,H,Nq,Nl]
        m = np.stack([np.stack([p[b, :, :, int(i)] for i in row]) for b, row in enumerate(idx)])  # [B,C,H,Nq]
        return (p @ v64).astype(q.dtype), (p_l @ vl64).astype(q.dtype), m.astype(np.float32)


CrossAttentionNode.__name__ = PLUGIN_OP_NAME  # onnx.reference finds implementations by class name
