"""numpy implementations of the com.microsoft ops the CUDA variant uses, from their documented semantics
(onnxruntime's ContribOperators schemas), for onnx.reference: the independent expectation for graphs
whose ops have no CPU kernel in ONNX Runtime (GroupNorm, BiasSplitGelu, BiasAdd). Each computes in
float32 and returns its input's dtype, as the CUDA kernels do.

    run_reference(model, inputs) -> outputs (onnx.reference.ReferenceEvaluator with these ops)
"""
from __future__ import annotations

import numpy as np
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from scipy.special import erf

MS = "com.microsoft"


def _f32(*arrays):
    return [a.astype(np.float32) for a in arrays]


def _gelu(x: np.ndarray) -> np.ndarray:
    return x * 0.5 * (1.0 + erf(x / np.sqrt(2.0)))


def group_norm(x, gamma, beta, groups=None, epsilon=1e-5, activation=0, channels_last=1):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta per (sample, group of C/groups channels), then
    SiLU if activation == 1; x is NHWC when channels_last == 1."""
    xf, gf, bf = _f32(x, gamma, beta)
    if not channels_last:
        xf = xf.transpose(0, 2, 3, 1)
    n, c = xf.shape[0], xf.shape[-1]
    grouped = xf.reshape(n, -1, groups, c // groups)  # [N, H*W, G, C/G]
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    var = grouped.var(axis=(1, 3), keepdims=True)
    y = ((grouped - mean) / np.sqrt(var + epsilon)).reshape(xf.shape) * gf + bf
    if activation == 1:
        y = y / (1.0 + np.exp(-y))
    if not channels_last:
        y = y.transpose(0, 3, 1, 2)
    return y.astype(x.dtype)


def bias_split_gelu(x, bias):
    """(x + bias) split in halves on the last axis: left * gelu(right), gelu the erf form."""
    xf, bf = _f32(x, bias)
    left, right = np.split(xf + bf, 2, axis=-1)
    return (left * _gelu(right)).astype(x.dtype)


class BiasAdd(OpRun):
    """x + bias + skip."""
    op_domain = MS

    def _run(self, x, bias, skip):
        xf, bf, sf = _f32(x, bias, skip)
        return ((xf + bf + sf).astype(x.dtype),)


def multi_head_attention(query, key, value, num_heads=None, scale=None):
    """query [B,S,H*d], key [B,L,H*d], value [B,L,H*dv] -> softmax(q k^T * scale) v per head, [B,S,H*dv];
    scale defaults to 1/sqrt(d). (Only the inputs the variant uses: no bias, mask or past.)"""
    q, k, v = _f32(query, key, value)
    b, s, h = q.shape[0], q.shape[1], num_heads
    q = q.reshape(b, s, h, -1).transpose(0, 2, 1, 3)  # [B,H,S,d]
    k = k.reshape(b, k.shape[1], h, -1).transpose(0, 2, 3, 1)  # [B,H,d,L]
    v = v.reshape(b, v.shape[1], h, -1).transpose(0, 2, 1, 3)  # [B,H,L,dv]
    scores = q @ k * (scale if scale else q.shape[-1] ** -0.5)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(b, s, -1).astype(query.dtype)


class GroupNorm(OpRun):
    op_domain = MS

    def _run(self, x, gamma, beta, groups=None, epsilon=1e-5, activation=0, channels_last=1):
        return (group_norm(x, gamma, beta, groups, epsilon, activation, channels_last),)


class BiasSplitGelu(OpRun):
    op_domain = MS

    def _run(self, x, bias):
        return (bias_split_gelu(x, bias),)


class MultiHeadAttention(OpRun):
    op_domain = MS

    def _run(self, query, key, value, *unused, num_heads=None, scale=None, unidirectional=0,
             mask_filter_value=None):
        assert not any(u is not None for u in unused) and not unidirectional
        return (multi_head_attention(query, key, value, num_heads, scale),)


class GatherElements(OpRun):
    """onnx.reference's own refuses indices smaller than the data on a non-gathered axis, which the
    ONNX spec allows (ELITE's m = P[..., idx])."""

    def _run(self, data, indices, axis=0):
        return (np.take_along_axis(data, indices, axis=axis),)


CONTRIB_OPS = [GroupNorm, BiasSplitGelu, BiasAdd, MultiHeadAttention, GatherElements]


def run_reference(model, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ReferenceEvaluator(model, new_ops=CONTRIB_OPS).run(None, inputs)
