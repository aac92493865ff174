"""The CUDA variant of a bundle's graph: onnx/cuda/<graph>-<key>.onnx, for ONNX Runtime's CUDA provider
(`elite-export build --precision fp32,cuda`; `elite-run --device cuda` runs it). The fp16 graphs for
TensorRT stay plain ONNX; this one is made from the bundle's fp32 graph (so adding it to a bundle
reuses the graphs already there):

    fp32 graph (weights loaded; as exported, or with the CPU graphs' attention fusion already done)
      -> attention -> MultiHeadAttention (ort_fusion: UNet self-attentions, ELITE's local branch, CLIP
         vision, VAE), GroupNorm (NHWC, SiLU absorbed), BiasSplitGelu, BiasAdd (ort_fusion_cuda)
      -> fp16 with fp32 islands and fp32 graph I/O (export.fp16_model), the islands of the bundle's
         Fp16Policy less LayerNormalization

LayerNormalization needs no island here: ONNX computes its statistics in `stash_type` (float32 unless
said otherwise) whatever the input type, as ONNX Runtime's CUDA kernel does, and the island's Casts would
only cost two passes over each tensor. The fused GroupNorm and MultiHeadAttention accumulate in fp32 by
themselves (their CUDA kernels), so the InstanceNormalization and Softmax islands disappear with the
nodes they fuse; the Softmax of ELITE's main cross-attention branch (whose probabilities ELITE reads at
the placeholder) and LocalScale's m / max m keep theirs.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import onnx

from elite_export.errors import EliteError
from elite_export.export import Fp16Policy, check, fp16_model, save
from elite_export.ort_fusion import PASSES, fuse_for_ort
from elite_export.ort_fusion_cuda import CUDA_PASSES

ALL_PASSES = {**PASSES, **CUDA_PASSES}  # attention first: GroupNorm's pattern never overlaps it


def cuda_policy(policy: Fp16Policy) -> Fp16Policy:
    return replace(policy, fp32_ops=tuple(op for op in policy.fp32_ops if op != "LayerNormalization"))


FUSED_OPS = ("MultiHeadAttention", "GroupNorm", "BiasSplitGelu", "BiasAdd")


def variant_key() -> dict:
    """What a CUDA variant's content depends on besides the fp32 graph's own key (bundle_build.graph_key)."""
    return {"passes": list(ALL_PASSES), "fused_ops": list(FUSED_OPS)}


def build_cuda_variant(src: str, dst: str, policy: Fp16Policy = Fp16Policy(), attention: str = "formula") -> dict[str, int]:
    """The CUDA variant of the fp32 graph at `src` (as exported, or already fused for the CPU: the attention
    pass finds nothing left then) written to `dst`; returns {fused op: count} in the result."""
    if attention != "formula":
        raise EliteError("--precision cuda needs --attention formula: ONNX Runtime cannot run the TensorRT "
                         "plugin's node")
    model = onnx.load(src)  # with its weights: the fp16 conversion needs them
    fuse_for_ort(model, ALL_PASSES)
    model = fp16_model(model, cuda_policy(policy))
    counts = Counter(n.op_type for n in model.graph.node)
    save(model, dst)  # a new content-keyed name: nothing reads it yet
    check(dst)
    return {op: counts[op] for op in FUSED_OPS}
