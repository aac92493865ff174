"""ONNX Runtime attention fusion of the fp32 graphs: how many attentions each graph fuses (a fusion
silently lost fails here), the fp16 graphs for TensorRT untouched, fused == unfused on ONNX Runtime."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TOY_RANGES, assert_close

from elite_export.ort_fusion import MS_DOMAIN, fuse_for_ort_file, op_counts


def graph_path(bundle, graph: str, precision: str = "fp32") -> str:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return str(bundle / manifest["graphs"][graph]["files"][precision]["path"])


def expected(models) -> dict[str, dict[str, int]]:
    """Per graph: MultiHeadAttention for every UNet attn1 and ELITE's local branch of every attn2 (the
    main branch's Softmax stays: ELITE reads its probabilities), every CLIP vision layer, the VAE's
    attention; the text encoder's causal attention is masked and stays."""
    from diffusers.models.attention_processor import Attention

    from elite_export.attention import cross_attention_layers

    blocks = len(cross_attention_layers(models.unet))
    vae = sum(isinstance(m, Attention) for m in models.vae.decoder.modules())
    return {"unet": {"MultiHeadAttention": 2 * blocks, "Softmax": blocks},
            "concept_encoder": {"MultiHeadAttention": models.vision.config.num_hidden_layers, "Softmax": 0},
            "vae_decoder": {"MultiHeadAttention": vae, "Softmax": 0},
            "text_encoder": {"MultiHeadAttention": 0, "Softmax": len(models.text_encoder.encoder.layers)}}


@pytest.mark.parametrize("graph", ["concept_encoder", "text_encoder", "unet", "vae_decoder"])
def test_fused_op_counts_per_graph(toy_bundle, toy_models, graph):
    counts = op_counts(graph_path(toy_bundle, graph))
    assert {op: counts[op] for op in expected(toy_models)[graph]} == expected(toy_models)[graph]


@pytest.mark.parametrize("graph", ["concept_encoder", "unet", "vae_decoder"])
def test_fp16_graphs_for_tensorrt_stay_unfused(toy_bundle, graph):
    import onnx

    model = onnx.load(graph_path(toy_bundle, graph, "fp16"), load_external_data=False)
    assert not [n for n in model.graph.node if n.domain == MS_DOMAIN]
    assert any(n.op_type == "Softmax" for n in model.graph.node)


@pytest.fixture(scope="module")
def unet_pair(toy_models, tmp_path_factory):
    """The toy UNet exported unfused (the bundle's ranges), and the same graph fused."""
    from elite_export.export import export_onnx
    from elite_export.graphs import graph_module, model_dims
    from elite_export.specs import ShapeRanges, UnetSpec

    out = tmp_path_factory.mktemp("fusion")
    spec = UnetSpec(model_dims(toy_models))
    unfused, fused = str(out / "unet.onnx"), str(out / "unet-fused.onnx")
    export_onnx(graph_module("unet", toy_models), spec, ShapeRanges(TOY_RANGES["batch"], TOY_RANGES["size"]), unfused)
    return spec, unfused, fused, fuse_for_ort_file(unfused, fused)


def test_the_pass_reports_what_it_fused(unet_pair, toy_models):
    assert unet_pair[3] == {"attention": expected(toy_models)["unet"]["MultiHeadAttention"]}


@pytest.mark.parametrize("batch,size", [(1, 256), (3, 512)])
def test_fused_unet_equals_unfused_on_onnxruntime(unet_pair, batch, size):
    import onnxruntime as ort

    spec, unfused, fused, _ = unet_pair
    inputs = spec.sample_inputs(spec.dims(batch, size, size), seed=batch)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    want, got = (ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]).run(None, inputs)[0]
                 for p in (unfused, fused))
    assert np.abs(want).max() > 0.1  # a real signal, not zeros
    assert_close(got, want, atol=1e-5, what=f"fused vs unfused UNet, batch {batch}, {size} px")


def test_an_fp16_graph_rebuilt_alone_is_converted_from_a_fresh_unfused_export(toy_bundle, tmp_path):
    """The bundle's fp32 graphs are fused, so an fp16 rebuild (here: another fp32-island policy) must not
    convert them: the fp32 graphs are exported again, the fp16 ones converted before the fusion."""
    import shutil

    from elite_export.bundle_build import BuildOptions, build_bundle
    from elite_export.cli_bundle import toy_checkpoints
    from elite_export.export import Fp16Policy
    from elite_export.specs import ShapeRanges

    copy = tmp_path / "b"
    shutil.copytree(toy_bundle, copy)
    options = BuildOptions(ranges=ShapeRanges(TOY_RANGES["batch"], TOY_RANGES["size"]),
                           fp16=Fp16Policy(fp32_ops=("Softmax", "LayerNormalization")))
    result = build_bundle(toy_checkpoints(str(copy), 0), str(copy), options)
    assert {(r.precision, r.action) for r in result.reports} == {("fp32", "exported"), ("fp16", "converted")}
    assert op_counts(graph_path(copy, "unet", "fp16"))["MultiHeadAttention"] == 0
    assert op_counts(graph_path(copy, "unet"))["MultiHeadAttention"] > 0
