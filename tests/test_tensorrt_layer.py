"""The TensorRT layer on a machine without TensorRT or a GPU: imports stay lazy, the entry points
say how to install TensorRT, profiles and engine keys come from the specs, the fp16 graphs
TensorRT would parse are valid and runnable (Polygraphy with ONNX Runtime), and the TensorRT code
type-checks against tensorrt-stubs."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from elite_export.engines.attention_plugin_spec import ONNX_NODE_ATTRIBUTES, PLUGIN_NAMESPACE, PLUGIN_OP_NAME
from elite_export.engines.trt_build import (TRT_HINT, TrtBuildSettings, build_bundle_engines, build_engine,
                                            engine_key, engine_profile, plugin_fingerprint, timing_cache_path,
                                            uses_attention_plugin)
from elite_export.errors import EliteError
from elite_export.runtime.bundle import FORMAT, FORMAT_VERSION, Bundle, file_sha256
from elite_export.specs import (ConceptEncoderSpec, ModelDims, ShapeRanges, TextEncoderSpec, UnetSpec,
                                VaeDecoderSpec)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TRT_LAYER = ("engines/trt_build.py", "engines/cache.py", "runtime/tensorrt_backend.py")


def real_tensorrt() -> bool:
    return importlib.util.find_spec("tensorrt") is not None and hasattr(__import__("tensorrt"), "Builder")


no_tensorrt = pytest.mark.skipif(real_tensorrt(), reason="TensorRT is installed here")


# --- fp16 ONNX graphs made in code -------------------------------------------------------------
def fp16_model(path: Path) -> Path:
    """y = cast32(cast16(softmax32(cast32(cast16(x) @ W16))) + b16): fp32 I/O, fp16 inside, an fp32
    softmax island, a dynamic batch axis (the shape of the bundle's fp16 graphs, in small)."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float16), "W"),
               numpy_helper.from_array(rng.standard_normal(8).astype(np.float16), "b")]
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["x16", "W"], ["mm"]),
             helper.make_node("Cast", ["mm"], ["mm32"], to=TensorProto.FLOAT),
             helper.make_node("Softmax", ["mm32"], ["p32"], axis=-1),
             helper.make_node("Cast", ["p32"], ["p16"], to=TensorProto.FLOAT16),
             helper.make_node("Add", ["p16", "b"], ["y16"]),
             helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "fp16_island", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8])], weights)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def plugin_model(path: Path, with_plugin: bool = True) -> Path:
    """A graph holding the ELITE attention plugin node as the exporter writes it (not runnable here)."""
    from onnx import TensorProto, helper, save

    names = ("q", "k", "v", "k_l", "v_l", "idx")
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT32 if n == "idx" else TensorProto.FLOAT16, None)
              for n in names]
    node = (helper.make_node(PLUGIN_OP_NAME, list(names), ["out_g", "out_l", "m"], domain=PLUGIN_NAMESPACE,
                             **ONNX_NODE_ATTRIBUTES) if with_plugin
            else helper.make_node("Identity", ["q"], ["out_g"]))
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, None) for n in node.output]
    graph = helper.make_graph([node], "attention", inputs, outputs)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                 helper.make_opsetid(PLUGIN_NAMESPACE, 1)]), str(path))
    return path


def fake_bundle(root: Path, ranges: ShapeRanges, plugin: bool = False) -> Bundle:
    """A manifest with one fp16 graph (unet) whose ONNX file is a small stand-in."""
    rel = "onnx/fp16/unet.onnx"
    (root / "onnx" / "fp16").mkdir(parents=True, exist_ok=True)
    plugin_model(root / rel, with_plugin=plugin)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": ModelDims().to_dict(),
                "ranges": ranges.to_dict(),
                "graphs": {"unet": {"files": {"fp16": {"path": rel, "sha256": file_sha256(str(root / rel))}}}}}
    return Bundle(str(root), manifest)


# --- imports and install hints -----------------------------------------------------------------
def test_imports_need_neither_tensorrt_nor_cuda_nor_torch():
    code = ("import sys\n"
            "import elite_export.runtime.tensorrt_backend, elite_export.engines.trt_build, elite_export.engines.cache\n"
            "heavy = [m for m in ('tensorrt', 'cuda', 'torch', 'onnx', 'triton') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([PY, "-c", code], check=True, cwd=ROOT)


@no_tensorrt
def test_entry_points_say_how_to_install_tensorrt(tmp_path):
    from elite_export.runtime.tensorrt_backend import open_trt_runners

    bundle = fake_bundle(tmp_path, ShapeRanges())
    spec = UnetSpec(ModelDims())
    calls = [lambda: build_engine(str(tmp_path / "x.onnx"), spec, ShapeRanges(), TrtBuildSettings(),
                                  str(tmp_path / "x.plan")),
             lambda: build_bundle_engines(bundle, TrtBuildSettings(), ("unet",)),
             lambda: open_trt_runners(bundle, ("unet",))]
    for call in calls:
        with pytest.raises(EliteError) as e:
            call()
        assert str(e.value).startswith(TRT_HINT) and "\n" not in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("cuda") is not None, reason="cuda-python is installed here")
def test_missing_cuda_python_is_a_user_error():
    from elite_export.runtime.cuda_device import current_device

    with pytest.raises(EliteError, match=r"cuda-python is not installed: pip install 'elite-export\[trt\]'"):
        current_device()


def test_build_settings_are_checked():
    for bad in (TrtBuildSettings(optimization_level=6), TrtBuildSettings(optimization_level=-1),
                TrtBuildSettings(workspace_mib=0)):
        with pytest.raises(EliteError):
            bad.check()
    TrtBuildSettings(optimization_level=0, workspace_mib=1).check()


def test_timing_cache_lives_beside_the_engines_per_trt_and_gpu():
    assert timing_cache_path(TrtBuildSettings(), "/b/engines", "10.13.0.35", "9.0") == \
        "/b/engines/timing-trt10.13.0.35-sm90.cache"
    assert timing_cache_path(TrtBuildSettings(timing_cache="/t.cache"), "/b/engines", "10.13.0.35", "9.0") == "/t.cache"


# --- profiles ----------------------------------------------------------------------------------
def test_unet_profile_doubles_the_batch_and_divides_pixels_by_8():
    profile = engine_profile(UnetSpec(ModelDims()), ShapeRanges(batch=(1, 2, 4), size=(256, 512, 1024)), False)
    assert profile["latents"] == ((2, 4, 32, 32), (4, 4, 64, 64), (8, 4, 128, 128))  # N = 2B, latent = px/8
    assert profile["text_embeddings"] == ((2, 77, 768), (4, 77, 768), (8, 77, 768))
    # the concept axis: 1 (min, opt) to 3 (max) concepts per prompt by default
    # per request (the conditional rows), with the concept axis: 1 (min, opt) to 3 (max) concepts by default
    assert profile["local_tokens"] == ((1, 1, 256, 768), (2, 1, 256, 768), (4, 3, 256, 768))
    assert profile["placeholder_index"] == ((1, 1), (2, 1), (4, 3)) and profile["lam"] == ((1, 1), (2, 1), (4, 3))
    assert set(profile) == {t.name for t in UnetSpec.inputs}


def test_static_profiles_keep_the_opt_point():
    ranges = ShapeRanges(batch=(1, 2, 4), size=(256, 512, 1024), concepts=(1, 2, 3))
    unet = engine_profile(UnetSpec(ModelDims()), ranges, static=True)
    assert all(lo == opt == hi for lo, opt, hi in unet.values()) and unet["latents"][0] == (4, 4, 64, 64)
    assert unet["local_tokens"][0] == (2, 2, 256, 768)  # the opt requests and concept count
    text = engine_profile(TextEncoderSpec(ModelDims()), ranges, static=True)
    assert text["words"] == ((2, 2, 1, 768), (2, 2, 5, 768), (2, 2, 5, 768))  # K keeps its range: K=1 and K=5
    assert text["input_ids"] == ((2, 77),) * 3
    # a bundle built for one batch, size and concept count is static without the flag
    fixed = ShapeRanges(batch=(2, 2, 2), size=(512, 512, 512), concepts=(2, 2, 2))
    assert engine_profile(UnetSpec(ModelDims()), fixed, False) == engine_profile(UnetSpec(ModelDims()), ranges, True)
    vae = engine_profile(VaeDecoderSpec(ModelDims()), ranges, static=False)
    assert vae == {"latents": ((1, 4, 32, 32), (2, 4, 64, 64), (4, 4, 128, 128))}
    concept = engine_profile(ConceptEncoderSpec(ModelDims()), ranges, static=False)
    assert concept["image"] == ((1, 3, 224, 224), (2, 3, 224, 224), (4, 3, 224, 224))


def test_profiles_follow_model_dims():
    dims = replace(ModelDims(), text_dim=32, patches=16)
    profile = engine_profile(UnetSpec(dims), ShapeRanges(batch=(1, 1, 1), size=(64, 64, 64), concepts=(2, 2, 2)),
                             False)
    assert profile["local_tokens"] == ((1, 2, 16, 32),) * 3 and profile["latents"] == ((2, 4, 8, 8),) * 3


# --- plugin detection and engine keys ------------------------------------------------------------
def test_plugin_node_is_detected_from_the_graph(tmp_path):
    assert uses_attention_plugin(str(plugin_model(tmp_path / "a.onnx")))
    assert not uses_attention_plugin(str(plugin_model(tmp_path / "b.onnx", with_plugin=False)))
    assert not uses_attention_plugin(str(fp16_model(tmp_path / "c.onnx")))
    assert len(plugin_fingerprint()) == 64 and plugin_fingerprint() == plugin_fingerprint()


def test_engine_key_from_a_bundle(tmp_path):
    ranges = ShapeRanges(batch=(1, 1, 2), size=(256, 512, 512))
    plain = engine_key(fake_bundle(tmp_path / "a", ranges), "unet", TrtBuildSettings(), "10.13.0.35", "9.0")
    assert plain.plugin is None and plain.profile["latents"][2] == (4, 4, 64, 64)
    with_plugin = engine_key(fake_bundle(tmp_path / "b", ranges, plugin=True), "unet", TrtBuildSettings(),
                             "10.13.0.35", "9.0")
    assert with_plugin.plugin == plugin_fingerprint() and with_plugin.digest != plain.digest
    wider = engine_key(fake_bundle(tmp_path / "c", replace(ranges, size=(256, 512, 768))), "unet",
                       TrtBuildSettings(), "10.13.0.35", "9.0")
    assert wider.digest != plain.digest and wider.onnx == plain.onnx  # same graph, new range: new engine
    static = engine_key(fake_bundle(tmp_path / "a", ranges), "unet", TrtBuildSettings(static_shapes=True),
                        "10.13.0.35", "9.0")
    assert static.digest != plain.digest


# --- the graphs TensorRT parses: valid and runnable --------------------------------------------
def polygraphy(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("polygraphy", path=os.path.dirname(PY)) or shutil.which("polygraphy")
    if exe is None:
        pytest.skip("polygraphy is not installed")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def test_polygraphy_inspects_and_runs_an_fp16_graph(tmp_path):
    model = fp16_model(tmp_path / "fp16.onnx")
    inspect = polygraphy("inspect", "model", str(model), "--show", "layers")
    assert inspect.returncode == 0, inspect.stderr
    assert "W [dtype=float16, shape=(16, 8)]" in inspect.stdout and "[Op: Softmax]" in inspect.stdout
    run = polygraphy("run", str(model), "--onnxrt", "--input-shapes", "x:[3,16]", "--save-outputs",
                     str(tmp_path / "out.json"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PASSED" in run.stdout + run.stderr
    from polygraphy.comparator import RunResults

    (_, [outputs]), = RunResults.load(str(tmp_path / "out.json")).items()
    y = outputs["y"]
    assert y.shape == (3, 8) and y.dtype == np.float32 and np.isfinite(y).all()


# --- types: the TensorRT code against tensorrt-stubs -------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_tensorrt_layer_type_checks_against_the_stubs():
    plain = subprocess.run([PY, "-m", "mypy", *TRT_LAYER], capture_output=True, text=True, cwd=ROOT)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    if importlib.util.find_spec("tensorrt_stubs") is None:
        pytest.skip("tensorrt-stubs are not installed")
    real = subprocess.run([PY, "scripts/typecheck_trt.py"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert real.returncode == 0, real.stdout + real.stderr
