"""Every graph meant for TensorRT against TensorRT 10's ONNX support matrix, and each check firing."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from elite_export.engines.onnx_support import support_matrix, tensorrt_support_problems

# fp16 only: the fp32 graphs are ONNX Runtime's (attention fused into com.microsoft.MultiHeadAttention)
@pytest.mark.parametrize("precision", ["fp16"])
@pytest.mark.parametrize("graph", ["concept_encoder", "text_encoder", "unet", "vae_decoder"])
def test_toy_bundle_graph_conforms(toy_bundle, graph, precision):
    manifest = json.loads((toy_bundle / "manifest.json").read_text())
    path = toy_bundle / manifest["graphs"][graph]["files"][precision]["path"]
    assert tensorrt_support_problems(path) == []


@pytest.fixture(scope="module")
def plugin_unet_fp16(toy_paths, tmp_path_factory) -> str:
    """The toy UNet exported with --attention plugin (one elite.cross_attention node per attn2), in fp16."""
    from elite_export.checkpoints import load_models
    from elite_export.export import export_onnx, to_fp16
    from elite_export.graphs import graph_module, model_dims
    from elite_export.specs import ShapeRanges, UnetSpec

    out = tmp_path_factory.mktemp("plugin-unet")
    models = load_models(toy_paths, "plugin")
    export_onnx(graph_module("unet", models), UnetSpec(model_dims(models)), ShapeRanges((1, 1, 2), (64, 64, 128)),
                str(out / "unet-fp32.onnx"))
    to_fp16(str(out / "unet-fp32.onnx"), str(out / "unet-fp16.onnx"))
    return str(out / "unet-fp16.onnx")


def test_plugin_unet_conforms_with_its_plugin_nodes_excepted(plugin_unet_fp16):
    assert any(n.domain == "elite" for n in onnx.load(plugin_unet_fp16).graph.node)
    assert tensorrt_support_problems(plugin_unet_fp16) == []


def make_model(nodes, inputs, outputs, initializers=(), opset=18, domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=opsets)


def tensor(name, elem=TensorProto.FLOAT, shape=(2, 3, 8, 8)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def ints(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def only_problem(model, **kwargs) -> str:
    problems = tensorrt_support_problems(model, **kwargs)
    assert len(problems) == 1, problems
    return problems[0]


def test_matrix_covers_every_op_up_to_its_opset():
    matrix = support_matrix()
    assert matrix.opsets == (9, 20)
    assert matrix.operators["Conv"].types == {"FP32", "FP16", "BF16"}
    assert not matrix.operators["AffineGrid"].supported


def test_conforming_model_has_no_problems():
    # Squeeze's axes from a Constant node: the parser imports Constant outputs as weights, like initializers
    nodes = [helper.make_node("Constant", [], ["axes"], value=ints("v", [1])),
             helper.make_node("Squeeze", ["x", "axes"], ["y"], name="squeeze")]
    model = make_model(nodes, [tensor("x", shape=(2, 1, 4))], [tensor("y", shape=(2, 4))])
    assert tensorrt_support_problems(model) == []


def test_opset_out_of_range():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x")], [tensor("y")], opset=21)
    assert "default-domain opset 21 is outside TensorRT's supported range 9-20" in only_problem(model)


def test_unsupported_op():
    nodes = [helper.make_node("AffineGrid", ["theta", "size"], ["grid"], name="grid")]
    model = make_model(nodes, [tensor("theta", shape=(1, 2, 3))], [tensor("grid", shape=(1, 4, 4, 2))],
                       [ints("size", [1, 1, 4, 4])], opset=20)
    assert only_problem(model) == "node 'grid' (AffineGrid): op not supported by TensorRT's ONNX parser"


def test_op_missing_from_the_matrix():
    nodes = [helper.make_node("RMSNormalization", ["x", "scale"], ["y"], name="rms")]
    model = make_model(nodes, [tensor("x"), tensor("scale", shape=(8,))], [tensor("y")], opset=23)
    problems = tensorrt_support_problems(model)
    assert "node 'rms' (RMSNormalization): op not in TensorRT's ONNX support matrix" in problems


def test_wrong_tensor_type():
    nodes = [helper.make_node("And", ["a", "b"], ["c"], name="and")]
    model = make_model(nodes, [tensor("a"), tensor("b")], [tensor("c", TensorProto.BOOL)])
    assert only_problem(model) == ("node 'and' (And): tensor types not supported: 'a' FLOAT, 'b' FLOAT "
                                   "(TensorRT: BOOL)")


def test_index_and_mask_tensors_are_not_held_to_the_data_types():
    # Gather's INT64 indices and Equal's BOOL output are not the op's data type
    nodes = [helper.make_node("Gather", ["x", "i"], ["g"], axis=0),
             helper.make_node("Equal", ["g", "g"], ["y"])]
    model = make_model(nodes, [tensor("x", shape=(4, 3)), tensor("i", TensorProto.INT64, (2,))],
                       [tensor("y", TensorProto.BOOL, (2, 3))])
    assert tensorrt_support_problems(model) == []


def test_slice_axes_from_a_graph_input():
    nodes = [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"], name="slice")]
    model = make_model(nodes, [tensor("x"), tensor("axes", TensorProto.INT64, (1,))], [tensor("y")],
                       [ints("starts", [0]), ints("ends", [1])])
    assert only_problem(model) == ("node 'slice' (Slice): `axes` must be an initializer, but 'axes' is neither an "
                                   "initializer nor a Constant node's output")


def test_axes_computed_from_an_initializer_is_not_an_initializer():
    nodes = [helper.make_node("Identity", ["axes0"], ["axes"]),
             helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean")]
    model = make_model(nodes, [tensor("x")], [tensor("y", shape=(2, 1, 8, 8))], [ints("axes0", [1])])
    assert "(ReduceMean): `axes` must be an initializer" in only_problem(model)


def test_unsqueeze_axes_must_be_constant():
    nodes = [helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="unsqueeze")]
    model = make_model(nodes, [tensor("x", shape=(2, 3)), tensor("axes", TensorProto.INT64, (1,))],
                       [tensor("y", shape=(2, 1, 3))])
    assert "`axes` must be a constant tensor" in only_problem(model)


def test_resize_cubic():
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="cubic")]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales")
    model = make_model(nodes, [tensor("x")], [tensor("y", shape=(2, 3, 16, 16))], [scales])
    assert only_problem(model) == "node 'up' (Resize): mode 'cubic' unsupported (TensorRT: nearest, linear)"


def test_layer_norm_statistics_output_used():
    nodes = [helper.make_node("LayerNormalization", ["x", "scale"], ["y", "mean"], name="ln"),
             helper.make_node("Relu", ["mean"], ["m"])]
    model = make_model(nodes, [tensor("x", shape=(2, 8)), tensor("scale", shape=(8,))],
                       [tensor("y", shape=(2, 8)), tensor("m", shape=(2, 1))])
    assert "only the first output `Y` is supported; 'mean' used" in only_problem(model)


def test_one_dimensional_pooling():
    nodes = [helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[2])]
    model = make_model(nodes, [tensor("x", shape=(2, 3, 8))], [tensor("y", shape=(2, 3, 7))])
    assert "2D or 3D pooling only; input rank is 3" in only_problem(model)


def test_dropout_in_training_mode():
    nodes = [helper.make_node("Dropout", ["x", "", "train"], ["y"], name="drop")]
    train = numpy_helper.from_array(np.array(True), "train")
    model = make_model(nodes, [tensor("x")], [tensor("y")], [train])
    assert "`training_mode` must evaluate to False" in only_problem(model)


def test_topk_unsorted():
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", sorted=0)]
    model = make_model(nodes, [tensor("x", shape=(2, 8))],
                       [tensor("v", shape=(2, 3)), tensor("i", TensorProto.INT64, (2, 3))], [ints("k", [3])])
    assert "`sorted` must be 1" in only_problem(model)


def test_custom_ops_are_excepted_by_plugin_name_only():
    nodes = [helper.make_node("cross_attention", ["x"], ["y"], domain="elite"),
             helper.make_node("FusedThing", ["y"], ["z"], name="fused", domain="com.example")]
    model = make_model(nodes, [tensor("x")], [tensor("z")], domains=("elite", "com.example"))
    assert only_problem(model) == ("node 'fused' (FusedThing): custom op in domain 'com.example' that is not one "
                                   "of plugin_ops ['cross_attention']")
    assert tensorrt_support_problems(model, plugin_ops={"cross_attention", "FusedThing"}) == []
