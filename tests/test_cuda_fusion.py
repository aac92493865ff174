"""The CUDA-only fusions (ort_fusion_cuda.py) on a block at Stable Diffusion's widths, where ORT's CUDA
kernels take every fusion (the toy model's widths are below BiasSplitGelu's and BiasAdd's): a diffusers
ResnetBlock2D and Transformer2DModel with 320 channels, 8 heads of 40, GEGLU 2560 wide, exported as the
bundle's graphs are. Counts from the modules; values through onnx.reference with the numpy ops of
contrib_reference.py, whose semantics are first checked against torch and ONNX Runtime's CPU kernels."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_close
from contrib_reference import bias_split_gelu, group_norm, multi_head_attention, run_reference


class SdWidthBlock(torch.nn.Module):
    """x [B,320,4,4], context [B,77,32] -> [B,320,4,4]: GroupNorm+SiLU twice (the resnet), GroupNorm, self-
    and cross-attention, GEGLU, three residual adds after linears (the transformer)."""

    def __init__(self):
        super().__init__()
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        torch.manual_seed(0)
        self.resnet = ResnetBlock2D(in_channels=320, temb_channels=None, groups=32)
        self.transformer = Transformer2DModel(num_attention_heads=8, attention_head_dim=40, in_channels=320,
                                              cross_attention_dim=32, norm_num_groups=32)
        for p in self.parameters():  # random, not the init's zeros/ones, so a swapped input shows
            p.data = torch.randn_like(p) * (0.5 if p.ndim == 1 else p.shape[-1] ** -0.5 / 2)

    def forward(self, x, context):
        return self.transformer(self.resnet(x, None), encoder_hidden_states=context, return_dict=False)[0]


@pytest.fixture(scope="module")
def block_graphs(tmp_path_factory):
    """(inputs, unfused fp32 graph path, fp32 graph with every CUDA fusion, its fp16 CUDA variant path)."""
    from elite_export.cuda_variant import ALL_PASSES, build_cuda_variant
    from elite_export.export import fold_constants, quiet_exporter, save
    from elite_export.ort_fusion import fuse_for_ort

    out = tmp_path_factory.mktemp("sdblock")
    module = SdWidthBlock().eval()
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((2, 320, 4, 4)).astype(np.float32),
              "context": rng.standard_normal((2, 77, 32)).astype(np.float32)}
    unfused = str(out / "block.onnx")
    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(module, tuple(torch.from_numpy(a) for a in inputs.values()), dynamo=True,
                                    input_names=list(inputs), output_names=["y"], opset_version=18)
    save(program.model_proto, unfused)
    fold_constants(unfused)
    fused = onnx.load(unfused)
    counts = fuse_for_ort(fused, ALL_PASSES)
    variant = str(out / "block-cuda.onnx")
    return inputs, unfused, fused, counts, variant, build_cuda_variant(unfused, variant)


def test_every_fusion_applies_at_sd_widths(block_graphs):
    """2 attentions (self, cross), 3 GroupNorms (2 with the resnet's SiLU absorbed), the GEGLU, and the
    residual adds after attn1's, attn2's and the feed-forward's output linears."""
    _, _, fused, counts, variant, fused_ops = block_graphs
    assert counts == {"attention": 2, "group_norm": 3, "bias_split_gelu": 1, "bias_add": 3}
    assert fused_ops == {"MultiHeadAttention": 2, "GroupNorm": 3, "BiasSplitGelu": 1, "BiasAdd": 3}
    silu = sorted(onnx.helper.get_attribute_value(a) for n in fused.graph.node if n.op_type == "GroupNorm"
                  for a in n.attribute if a.name == "activation")
    assert silu == [0, 1, 1]
    ops = {n.op_type for n in onnx.load(variant).graph.node}
    assert not ops & {"Erf", "Split", "InstanceNormalization", "Softmax"}  # all fused away


def test_fused_block_equals_unfused(block_graphs):
    import onnxruntime as ort

    inputs, unfused, fused, *_ = block_graphs
    want = ort.InferenceSession(unfused, providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    got = run_reference(fused, inputs)[0]
    assert np.abs(want).max() > 0.5
    assert_close(got, want, atol=2e-4, rtol=1e-4, what="fused fp32 block (onnx.reference) vs unfused (ORT)")


def test_fp16_variant_of_the_block_within_fp16_error(block_graphs):
    import onnxruntime as ort

    inputs, unfused, *_ , variant, _ = block_graphs
    want = ort.InferenceSession(unfused, providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    got = run_reference(onnx.load(variant), inputs)[0]
    scale = np.abs(want).max()
    assert_close(got, want, atol=1e-2 * scale, what="fp16 CUDA variant of the block vs fp32")


# --- the numpy ops themselves, against independent implementations ---------------------------------
def test_reference_group_norm_and_bias_split_gelu_match_torch():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 64, 3, 5)).astype(np.float32)  # NCHW
    gamma, beta = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    want = torch.nn.functional.group_norm(torch.from_numpy(x), 32, torch.from_numpy(gamma), torch.from_numpy(beta),
                                          eps=1e-5)
    for silu in (0, 1):
        got = group_norm(x.transpose(0, 2, 3, 1), gamma, beta, groups=32, epsilon=1e-5, activation=silu,
                             channels_last=1)
        expect = torch.nn.functional.silu(want) if silu else want
        assert_close(got.transpose(0, 3, 1, 2), expect.numpy(), atol=1e-5, what=f"GroupNorm activation={silu}")
    h = rng.standard_normal((2, 7, 2560)).astype(np.float32)
    bias = rng.standard_normal(2560).astype(np.float32)
    left, right = torch.from_numpy(h + bias).chunk(2, dim=-1)
    assert_close(bias_split_gelu(h, bias), (left * torch.nn.functional.gelu(right)).numpy(), atol=1e-5,
                 what="BiasSplitGelu vs diffusers' GEGLU")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_reference_multi_head_attention_matches_onnxruntime(dtype):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in ((2, 9, 16), (2, 5, 16), (2, 5, 16)))
    t = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=4,
                            scale=0.3)
    model = helper.make_model(helper.make_graph([node], "mha", [helper.make_tensor_value_info(n, t, None)
                                                                 for n in "qkv"],
                                                [helper.make_tensor_value_info("y", t, None)]),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"q": q, "k": k, "v": v})[0]
    got = multi_head_attention(q, k, v, num_heads=4, scale=0.3)
    assert got.dtype == dtype
    assert_close(got, want, atol=1e-6 if dtype == np.float32 else 2e-3, what=f"MultiHeadAttention {dtype.__name__}")
