"""`--attention plugin`: each ELITE cross-attention exported as one TensorRT plugin node.

The plugin graph, evaluated with onnx.reference and a Python implementation of the node, must
equal the default graph on ONNX Runtime; node counts prove the attention was not left decomposed.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from conftest import assert_close
from elite_export.engines.attention_plugin_spec import ONNX_NODE_ATTRIBUTES, PLUGIN_NAMESPACE, PLUGIN_OP_NAME
from elite_export.plugin_export import CrossAttentionNode, plugin_nodes
from elite_export.runtime.backends import OrtRunner
from elite_export.specs import ShapeRanges, UnetSpec

RANGES = ShapeRanges((1, 1, 1), (64, 64, 128))  # tiny latents keep the reference evaluator quick


@pytest.fixture(scope="module")
def graphs(toy_paths, tmp_path_factory):
    from elite_export.checkpoints import load_models
    from elite_export.export import export_onnx, to_fp16
    from elite_export.graphs import graph_module, model_dims

    out = tmp_path_factory.mktemp("plugin")
    paths = {}
    for attention in ("formula", "plugin"):
        models = load_models(toy_paths, attention)
        spec = UnetSpec(model_dims(models))
        paths[attention] = str(out / f"unet-{attention}.onnx")
        export_onnx(graph_module("unet", models), spec, RANGES, paths[attention])
    paths["plugin-fp16"] = str(out / "unet-plugin-fp16.onnx")
    to_fp16(paths["plugin"], paths["plugin-fp16"])
    return spec, paths


def test_one_plugin_node_per_cross_attention_and_no_decomposed_attention_left(graphs, toy_models):
    from elite_export.attention import cross_attention_layers

    _, paths = graphs
    n_cross = len(cross_attention_layers(toy_models.unet))
    plain, plugin = onnx.load(paths["formula"]), onnx.load(paths["plugin"])
    softmax = {name: [n.name for n in m.graph.node if n.op_type == "Softmax"] for name, m in
               (("formula", plain), ("plugin", plugin))}
    assert len(plugin_nodes(plain)) == 0 and len(plugin_nodes(plugin)) == n_cross
    # formula: attn1 + two softmaxes per attn2; plugin: only attn1's remain, none inside ELITE's processor
    assert len(softmax["formula"]) == 3 * n_cross and len(softmax["plugin"]) == n_cross
    assert not [s for s in softmax["plugin"] if "EliteCrossAttnProcessor" in s]
    for node in plugin_nodes(plugin):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()} == ONNX_NODE_ATTRIBUTES
        assert node.domain == PLUGIN_NAMESPACE and node.op_type == PLUGIN_OP_NAME and len(node.output) == 3
    assert any(o.domain == PLUGIN_NAMESPACE for o in plugin.opset_import)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_plugin_graph_equals_the_default_graph(graphs, precision):
    spec, paths = graphs
    dims = spec.dims(1, 64, 128)
    x = spec.sample_inputs(dims, seed=2)
    expected = OrtRunner(spec, paths["formula"]).run(x, dims)["noise_pred"]
    model = paths["plugin"] if precision == "fp32" else paths["plugin-fp16"]
    got = ReferenceEvaluator(model, new_ops=[CrossAttentionNode]).run(None, x)[0]
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert_close(got, expected, atol=1e-4 if precision == "fp32" else 5e-2, what=f"plugin ({precision}) vs default")
    if precision == "fp16":  # m stays fp32 out of the plugin: the value_info says so
        m_names = {n.output[2] for n in plugin_nodes(onnx.load(model))}
        types = {v.name: v.type.tensor_type.elem_type for v in onnx.load(model).graph.value_info}
        assert {types[m] for m in m_names if m in types} <= {onnx.TensorProto.FLOAT}
