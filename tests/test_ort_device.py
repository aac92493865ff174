"""The device-resident ONNX Runtime runner (runtime/ort_device.py) on the CPU provider, where no GPU is:
the same orchestration as on CUDA (slots bound once, conditioning uploaded once per generation, only the
step inputs copied per step) must give images bit-identical to OrtRunner's, move exactly the bytes its
docstring says, and every path that needs a GPU or a static bundle must end in one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import concept_files

from elite_export.errors import EliteError
from elite_export.runtime.bundle import Bundle
from elite_export.specs import GRAPH_NAMES

IMAGE, MASK = concept_files(7)


def device_runners(bundle: Bundle) -> dict:
    from elite_export.runtime.ort_device import OrtDeviceRunner

    return {n: OrtDeviceRunner(bundle.spec(n), bundle.graph_path(n, "fp32"), "cpu") for n in GRAPH_NAMES}


@pytest.fixture(scope="module")
def pipelines(toy_bundle):
    from elite_export.runtime.pipeline import RuntimePipeline, open_runners

    bundle = Bundle.open(str(toy_bundle))
    return RuntimePipeline(bundle, open_runners(bundle)), RuntimePipeline(bundle, device_runners(bundle))


@pytest.mark.parametrize("scheduler,mode", [("lms", "local"), ("dpm++", "global")])
def test_device_runner_images_are_bit_identical_to_ort_runner(pipelines, concept, scheduler, mode):
    from elite_export.runtime.requests import GenerationSettings, Request

    host, device = pipelines
    requests = [Request(concept, "a S on the beach", 3, mode), Request(concept, "a photo of a S", 4, mode)]
    settings = GenerationSettings(scheduler=scheduler, steps=4, height=256, width=320)
    a, b = host(requests, settings), device(requests, settings)
    assert a.ok and b.ok, (a.errors, b.errors)
    assert a.images.shape == (2, 256, 320, 3) and a.images.std() > 1
    np.testing.assert_array_equal(b.images, a.images)


def test_per_step_copies_are_the_step_inputs_and_the_noise_prediction(pipelines, concept):
    """Per generation the conditioning crosses once; per step latents + timestep in, noise_pred out."""
    from elite_export.runtime.requests import GenerationSettings, Request

    _, device = pipelines
    unet, spec = device.runners["unet"], device.bundle.spec("unet")
    dims = spec.dims(1, 256, 256)
    nbytes = {t.name: int(np.prod(spec.shape(t, dims))) * np.dtype(t.dtype).itemsize for t in spec.inputs + spec.outputs}
    steps, before = 5, unet.copied_bytes
    device([Request(concept, "a S", 0)], GenerationSettings(steps=steps, height=256, width=256))
    per_generation = sum(v for k, v in nbytes.items() if k not in ("latents", "timestep", "noise_pred"))
    per_step = nbytes["latents"] + nbytes["timestep"] + nbytes["noise_pred"]
    assert unet.copied_bytes - before == per_generation + steps * per_step
    assert per_step == 2 * 2 * 4 * 32 * 32 * 4 + 2 * 4  # [2,4,32,32] fp32 in and out, 2 timesteps


def test_bound_step_refuses_what_it_was_not_bound_for(toy_bundle):
    bundle = Bundle.open(str(toy_bundle))
    runner = device_runners(bundle)["unet"]
    spec = bundle.spec("unet")
    dims = spec.dims(1, 256, 256)
    inputs = spec.sample_inputs(dims)
    step = runner.bind({k: v for k, v in inputs.items() if k not in ("latents", "timestep")}, dims)
    np.testing.assert_array_equal(step({"latents": inputs["latents"], "timestep": inputs["timestep"]})["noise_pred"],
                                  runner.run(inputs, dims)["noise_pred"])
    with pytest.raises(ValueError, match=r"a bound step takes \['latents', 'timestep'\]"):
        step({"latents": inputs["latents"]})
    with pytest.raises(ValueError, match=r"input 'latents' is float32\[2, 4, 16, 16\], expected float32\[2, 4, 32, 32\]"):
        step({"latents": np.zeros((2, 4, 16, 16), np.float32), "timestep": inputs["timestep"]})


def test_a_captured_graph_refuses_another_shape(toy_bundle):
    """The slot logic a CUDA graph relies on (fixed addresses, one shape), exercised on the CPU runner."""
    bundle = Bundle.open(str(toy_bundle))
    runner = device_runners(bundle)["unet"]
    runner.cuda_graph = True  # as the CUDA runner is: its first shape set is the only one
    spec = bundle.spec("unet")
    runner.run(spec.sample_inputs(spec.dims(1, 256, 256)), spec.dims(1, 256, 256))
    runner.run(spec.sample_inputs(spec.dims(1, 256, 256), seed=1), spec.dims(1, 256, 256))  # same slots: fine
    with pytest.raises(EliteError, match=r"captured for latents \[2, 4, 32, 32\]; this call has latents \[4, 4, 32, 32\]"):
        runner.run(spec.sample_inputs(spec.dims(2, 256, 256)), spec.dims(2, 256, 256))


def run_cli(*args: str):
    from elite_export.runtime.cli import main

    return CliRunner().invoke(main, list(args))


def assert_one_line(result, *phrases: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for p in phrases:
        assert p in lines[0], lines[0]


def test_gpu_paths_end_in_one_line_without_a_gpu(toy_bundle, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here: tests/test_ort_cuda_gpu.py covers the device")
    common = ["--bundle", str(toy_bundle), "--image", IMAGE, "--mask", MASK, "--prompt", "a S", "--steps", "2",
              "--height", "256", "--width", "256", "-o", str(tmp_path / "o"), "--quiet"]
    assert_one_line(run_cli(*common, "--device", "cuda"), "onnxruntime-gpu", "CPUExecutionProvider")
    assert_one_line(run_cli("encode", "--bundle", str(toy_bundle), "--image", IMAGE, "--mask", MASK,
                            "-o", str(tmp_path / "c.concept"), "--device", "cuda"), "onnxruntime-gpu")
    assert_one_line(run_cli(*common, "--device", "cuda", "--cuda-graph"), "needs a static bundle",
                    "batch 1-3 at 256-512 px")
    assert_one_line(run_cli(*common, "--precision", "cuda"), "run on --device cuda only")


def test_cuda_graph_needs_the_cuda_device(toy_bundle, tmp_path):
    from elite_export.runtime.pipeline import open_runners

    copy = tmp_path / "b"
    shutil.copytree(toy_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "static": True}))  # the flag the check reads
    with pytest.raises(EliteError, match="CUDA graphs need --device cuda"):
        open_runners(Bundle.open(str(copy)), cuda_graph=True)


def test_cuda_graph_sessions_name_only_the_cuda_provider(toy_bundle):
    """ONNX Runtime refuses CPU fallback disabled together with the CPU provider named (checked here, so a
    change in a later ONNX Runtime shows), so the CUDA-graph configuration names the CUDA provider alone."""
    import onnxruntime as ort

    from elite_export.runtime.ort_device import session_config

    opts, providers = session_config("cuda", cuda_graph=True)
    assert providers == [("CUDAExecutionProvider", {"device_id": "0", "enable_cuda_graph": "1",
                                                     "cudnn_conv_algo_search": "EXHAUSTIVE",
                                                     "do_copy_in_default_stream": "1"})]
    assert session_config("cuda", cuda_graph=False)[1][1] == "CPUExecutionProvider"
    with pytest.raises(Exception, match="Conflicting session configuration"):
        ort.InferenceSession(Bundle.open(str(toy_bundle)).graph_path("text_encoder"), opts,
                             providers=["CPUExecutionProvider"])
