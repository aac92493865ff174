"""The CUDA graph variant (bundle onnx/cuda/): fused-op counts held to expectations counted on the torch
modules, the fp16 types it promises, and its values on the CPU: through onnx.reference with numpy
implementations of the CUDA-only ops (tests/contrib_reference.py), and through ONNX Runtime itself where
every op has a CPU kernel (the concept encoder). A block at Stable Diffusion's widths exercises the
fusions the toy model's widths are below (BiasSplitGelu, BiasAdd)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import TOY_RANGES, assert_close
from contrib_reference import run_reference

from elite_export.ort_fusion_cuda import group_norm_supported

CUDA_ONLY = ("GroupNorm", "BiasSplitGelu", "BiasAdd")


@pytest.fixture(scope="module")
def cuda_bundle(toy_bundle, tmp_path_factory):
    """The shared toy bundle with the CUDA variant added (fp32 and fp16 reused: a rebuild only fuses)."""
    from elite_export.bundle_build import BuildOptions, build_bundle
    from elite_export.cli_bundle import toy_checkpoints
    from elite_export.specs import ShapeRanges

    copy = tmp_path_factory.mktemp("cuda") / "bundle"
    shutil.copytree(toy_bundle, copy)
    options = BuildOptions(ranges=ShapeRanges(TOY_RANGES["batch"], TOY_RANGES["size"]),
                           precisions=("fp32", "fp16", "cuda"))
    result = build_bundle(toy_checkpoints(str(copy), 0), str(copy), options)
    assert {(r.precision, r.action) for r in result.reports} == {("fp32", "reused"), ("fp16", "reused"),
                                                                  ("cuda", "fused")}
    return copy


def graph(bundle, name: str, precision: str = "cuda") -> onnx.ModelProto:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return onnx.load(str(bundle / manifest["graphs"][name]["files"][precision]["path"]))


def count(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


def expected_counts(models) -> dict[str, dict[str, int]]:
    """Per graph, from the torch modules: every fused attention of the CPU graphs (test_ort_fusion), every
    nn.GroupNorm on an image whose shape ORT's CUDA kernel takes (the others, and an attention's GroupNorm
    over [N,C,L] tokens, stay InstanceNormalization), no GEGLU or residual add at the toy's widths; the
    ELITE main branches' Softmax (and the text encoder's) stay."""
    import torch
    from diffusers.models.attention_processor import Attention
    from test_ort_fusion import expected as attention

    def norms(module):
        on_tokens = {id(m.group_norm) for m in module.modules() if isinstance(m, Attention) and m.group_norm}
        found = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
        fused = sum(group_norm_supported(m.num_channels, m.num_groups) and id(m) not in on_tokens for m in found)
        return {"GroupNorm": fused, "InstanceNormalization": len(found) - fused}

    mods = {"concept_encoder": models.vision, "text_encoder": models.text_encoder, "unet": models.unet,
            "vae_decoder": models.vae.decoder}
    return {g: {**a, **norms(mods[g]), "BiasSplitGelu": 0, "BiasAdd": 0} for g, a in attention(models).items()}


@pytest.mark.parametrize("name", ["concept_encoder", "text_encoder", "unet", "vae_decoder"])
def test_fused_op_counts_and_types(cuda_bundle, toy_models, name):
    from elite_export.runtime.bundle import Bundle

    want = expected_counts(toy_models)[name]
    model = graph(cuda_bundle, name)
    assert {op: count(model, op) for op in want} == want
    entry = Bundle.open(str(cuda_bundle)).graph_file(name, "cuda")
    assert entry["fused_ops"] == {op: count(model, op) for op in entry["fused_ops"]}  # the manifest says so
    inits = {t.name: t.data_type for t in model.graph.initializer}
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type == "GroupNorm":  # ORT's kernel reads gamma and beta as float only
            assert [inits[i] for i in n.input[1:]] == [f32, f32]
            assert {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["channels_last"] == 1
        if n.op_type in ("MultiHeadAttention", "LayerNormalization"):  # fp16 math, no island casts before it
            assert all(producer.get(i) is None or producer[i].op_type != "Cast" for i in n.input[:1])
    assert any(t.data_type == f16 for t in model.graph.initializer)
    io = [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]]
    assert f16 not in io  # fp32 (and int64) graph I/O: the spec's, as every precision


def test_onnxruntime_resolves_the_graphs_and_lacks_only_cuda_kernels_here(cuda_bundle):
    """ONNX Runtime type-checks a graph (its contrib schemas) before it looks for kernels: on the CPU the
    variant gets as far as the first op with a CUDA kernel only."""
    import onnxruntime as ort

    from elite_export.runtime.bundle import Bundle

    bundle = Bundle.open(str(cuda_bundle))
    for name in ("unet", "vae_decoder"):
        with pytest.raises(Exception, match=r"NOT_IMPLEMENTED : .*(kernel|implementation) for (com\.microsoft\.)?GroupNorm"):
            ort.InferenceSession(bundle.graph_path(name, "cuda"), providers=["CPUExecutionProvider"])


def sample(bundle, name: str, batch: int = 1, size: int = 256, seed: int = 3) -> tuple[dict, dict]:
    from elite_export.runtime.bundle import Bundle

    spec = Bundle.open(str(bundle)).spec(name)
    dims = spec.dims(batch, size, size)
    return spec, spec.sample_inputs(dims, seed=seed)


def ort_run(path: str, inputs: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]).run(None, inputs)


@pytest.mark.parametrize("name", ["unet", "vae_decoder"])
def test_variant_values_match_the_fp32_graph(cuda_bundle, name):
    """The fp16 variant (numpy CUDA-op semantics) within the spec's fp16 tolerance of the fp32 graph."""
    from elite_export.runtime.bundle import Bundle

    spec, inputs = sample(cuda_bundle, name, batch=1)  # onnx.reference's convolutions are slow
    bundle = Bundle.open(str(cuda_bundle))
    want = ort_run(bundle.graph_path(name, "fp32"), inputs)[0]
    got = run_reference(graph(cuda_bundle, name), inputs)[0]
    tol = spec.tolerance["fp16"]
    assert np.abs(want).max() > 0.1
    assert_close(got, want, tol.atol, tol.rtol, f"{name} CUDA variant (onnx.reference) vs fp32 (ONNX Runtime)")


def test_concept_encoder_variant_runs_on_onnxruntime(cuda_bundle):
    """Every op of this variant has a CPU kernel (MultiHeadAttention in fp16 too): the real thing."""
    from elite_export.runtime.bundle import Bundle

    spec, inputs = sample(cuda_bundle, "concept_encoder", batch=2)
    bundle = Bundle.open(str(cuda_bundle))
    want = ort_run(bundle.graph_path("concept_encoder", "fp32"), inputs)
    got = ort_run(bundle.graph_path("concept_encoder", "cuda"), inputs)
    tol = spec.tolerance["fp16"]
    for g, w, t in zip(got, want, spec.outputs):
        assert_close(g, w, tol.atol, tol.rtol, f"concept encoder CUDA variant {t.name}")


def test_cuda_variant_needs_fp32_and_the_formula_attention(toy_bundle, tmp_path):
    from click.testing import CliRunner

    from elite_export.cli import main

    copy = tmp_path / "b"
    shutil.copytree(toy_bundle, copy)
    for extra in (["--precision", "fp16,cuda"], ["--precision", "fp32,cuda", "--attention", "plugin"]):
        result = CliRunner().invoke(main, ["build", "--toy", "-o", str(copy), *extra])
        assert result.exit_code == 1, result.output
        assert "needs" in result.stderr and "Traceback" not in result.output


def test_check_skips_the_cuda_graphs_without_a_gpu_and_says_so(cuda_bundle):
    import onnxruntime as ort
    from click.testing import CliRunner

    from elite_export.cli import main

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu here: check runs the cuda graphs")
    result = CliRunner().invoke(main, ["check", str(cuda_bundle)])
    assert result.exit_code == 0, result.output
    precisions = {line.split()[2] for line in result.output.splitlines() if line.split()[:1] in (["unet"], ["vae_decoder"])}
    assert "cuda graphs not checked" in result.output and precisions == {"fp32", "fp16"}
    result = CliRunner().invoke(main, ["check", str(cuda_bundle), "--precision", "cuda"])
    assert result.exit_code == 1 and "onnxruntime-gpu" in result.output  # asked for: a failing row that says why
