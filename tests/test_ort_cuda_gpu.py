"""GPU-only (skipped without onnxruntime-gpu and a GPU; scripts/gpu_check.sh runs it on a lent H200): ONNX
Runtime's CUDA kernels against the numpy semantics the CPU tests assume (contrib_reference.py), the toy
bundle's cuda variant on the device, the device-resident runner end to end, and CUDA-graph replay.
Bundles: $ELITE_GPU_WORK/{toy,toy-static} (scripts/gpu_prepare.sh), else made from the shared toy bundle
(toy-static tests skip then)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TOY_RANGES, assert_close
from contrib_reference import bias_split_gelu, group_norm, multi_head_attention

from elite_export.errors import EliteError

ort = pytest.importorskip("onnxruntime")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip("onnxruntime-gpu is not installed (its CUDA provider is absent)", allow_module_level=True)

from elite_export.runtime.bundle import Bundle  # noqa: E402
from elite_export.specs import GRAPH_NAMES  # noqa: E402

WORK = os.environ.get("ELITE_GPU_WORK")


@pytest.fixture(scope="module")
def toy(request, tmp_path_factory) -> Bundle:
    if WORK and (Path(WORK) / "toy" / "manifest.json").exists():
        return Bundle.open(f"{WORK}/toy")
    toy_bundle = request.getfixturevalue("toy_bundle")  # only when there is none built: it takes a minute
    from elite_export.bundle_build import BuildOptions, build_bundle
    from elite_export.cli_bundle import toy_checkpoints
    from elite_export.specs import ShapeRanges

    copy = tmp_path_factory.mktemp("gpu") / "toy"
    shutil.copytree(toy_bundle, copy)
    build_bundle(toy_checkpoints(str(copy), 0), str(copy), BuildOptions(
        ranges=ShapeRanges(TOY_RANGES["batch"], TOY_RANGES["size"]), precisions=("fp32", "fp16", "cuda")))
    return Bundle.open(str(copy))


@pytest.fixture(scope="module")
def toy_static() -> Bundle:
    if not (WORK and (Path(WORK) / "toy-static" / "manifest.json").exists()):
        pytest.skip("no static toy bundle ($ELITE_GPU_WORK/toy-static: scripts/gpu_prepare.sh builds it)")
    return Bundle.open(f"{WORK}/toy-static")


def run_node(op: str, inputs: dict[str, np.ndarray], **attrs) -> np.ndarray:
    from onnx import helper

    types = {np.dtype(np.float32): 1, np.dtype(np.float16): 10}
    node = helper.make_node(op, list(inputs), ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info(n, types[a.dtype], a.shape)
                                           for n, a in inputs.items()],
                              [helper.make_tensor_value_info("y", types[next(iter(inputs.values())).dtype], None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    s = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    assert s.get_providers()[0] == "CUDAExecutionProvider"
    return s.run(None, inputs)[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cuda_kernels_compute_what_the_cpu_tests_assume(dtype):
    rng = np.random.default_rng(0)
    tol = {np.float32: 2e-3, np.float16: 2e-2}[dtype]
    for channels in (320, 64):
        x = rng.standard_normal((2, 8, 8, channels)).astype(dtype)  # NHWC
        gamma, beta = rng.standard_normal(channels).astype(np.float32), rng.standard_normal(channels).astype(np.float32)
        for silu in (0, 1):
            got = run_node("GroupNorm", {"x": x, "gamma": gamma, "beta": beta}, groups=32, epsilon=1e-5,
                           activation=silu, channels_last=1)
            assert_close(got, group_norm(x, gamma, beta, 32, 1e-5, silu), tol, tol, f"GroupNorm C{channels} silu{silu}")
    h, b = rng.standard_normal((2, 16, 2560)).astype(dtype), rng.standard_normal(2560).astype(dtype)
    assert_close(run_node("BiasSplitGelu", {"x": h, "bias": b}), bias_split_gelu(h, b), tol, tol, "BiasSplitGelu")
    x, bias, skip = (rng.standard_normal(s).astype(dtype) for s in ((2, 16, 320), (320,), (2, 16, 320)))
    assert_close(run_node("BiasAdd", {"x": x, "bias": bias, "skip": skip}), x.astype(np.float32) + bias + skip, tol, tol,
                 "BiasAdd")
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in ((2, 64, 320), (2, 64, 320), (2, 64, 320)))
    assert_close(run_node("MultiHeadAttention", {"q": q, "k": k, "v": v}, num_heads=8, scale=0.1),
                 multi_head_attention(q, k, v, 8, 0.1), tol, tol, "MultiHeadAttention")


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_cuda_variant_of_every_toy_graph_on_the_gpu(toy, name):
    from elite_export.runtime.backends import OrtRunner
    from elite_export.runtime.ort_device import OrtDeviceRunner

    spec, tol = toy.spec(name), toy.spec(name).tolerance["fp16"]
    dims = spec.dims(2, 384, 256, spec.k_range[2])  # non-square, multiples of 64 within both toy ranges
    inputs = spec.sample_inputs(dims, seed=5)
    want = OrtRunner(spec, toy.graph_path(name, "fp32")).run(inputs, dims)
    got = OrtDeviceRunner(spec, toy.graph_path(name, "cuda"), "cuda").run(inputs, dims)
    for out in want:
        assert np.isfinite(got[out]).all()
        assert_close(got[out], want[out], tol.atol, tol.rtol, f"{name}.{out} cuda variant on the GPU vs fp32 CPU")


def generate(bundle: Bundle, device: str, seed: int = 1, steps: int = 10, **kwargs) -> tuple[np.ndarray, object]:
    from elite_export.calib import calibration_set
    from elite_export.runtime.pipeline import RuntimePipeline, open_runners
    from elite_export.runtime.preprocess import load_concept
    from elite_export.runtime.requests import GenerationSettings, Request

    pipe = kwargs.pop("pipe", None) or RuntimePipeline(bundle, open_runners(bundle, "onnxruntime", device, **kwargs))
    concept = load_concept(*calibration_set().concepts[0])
    result = pipe([Request(concept, "a photo of a S", seed)], GenerationSettings(steps=steps, height=256, width=256))
    assert result.ok, result.errors
    return result.images, pipe


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_device_runner_images_match_the_cpu_runtime(toy):
    ref, _ = generate(toy, "cpu")
    got, pipe = generate(toy, "cuda")
    assert pipe.runners["unet"].session.get_providers()[0] == "CUDAExecutionProvider"
    assert psnr(got, ref) >= 35, f"PSNR {psnr(got, ref):.1f} dB"


def test_cuda_graph_replays_new_inputs(toy_static):
    """The replay reads the slots updated in place: a second generation (other seed) is not the first one
    again, and each equals the run without a graph."""
    plain = [generate(toy_static, "cuda", seed)[0] for seed in (1, 2)]
    first, pipe = generate(toy_static, "cuda", 1, cuda_graph=True)
    second, _ = generate(toy_static, "cuda", 2, pipe=pipe)
    assert np.abs(plain[0].astype(int) - plain[1].astype(int)).max() > 10
    for got, want in zip((first, second), plain):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_cuda_graph_refuses_another_shape_and_a_dynamic_bundle(toy_static, toy):
    from elite_export.runtime.ort_device import OrtDeviceRunner

    spec = toy_static.spec("unet")
    runner = OrtDeviceRunner(spec, toy_static.graph_path("unet", "cuda"), "cuda", cuda_graph=True)
    dims = spec.dims(1, 256, 256)
    runner.run(spec.sample_inputs(dims), dims)
    with pytest.raises(EliteError, match="captured for"):
        runner.run(spec.sample_inputs(spec.dims(2, 256, 256)), spec.dims(2, 256, 256))
    with pytest.raises(EliteError, match="needs a static bundle"):
        generate(toy, "cuda", cuda_graph=True)
