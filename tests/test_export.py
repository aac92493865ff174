"""ONNX export: every graph against the PyTorch reference on ONNX Runtime; bundles and their manifest."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from conftest import assert_close
from elite_export.parity import Case, ParityChecker
from elite_export.runtime.backends import OrtRunner
from elite_export.runtime.bundle import Bundle
from elite_export.specs import GRAPH_NAMES


@pytest.fixture(scope="module")
def bundle(toy_bundle):
    return Bundle.open(str(toy_bundle))


@pytest.fixture(scope="module")
def checker(bundle):
    return ParityChecker(bundle, ("fp32", "fp16"))


# (requests, height, width, K, concepts): two batch sizes, two resolutions, one non-square, 1 and 3 concepts
POINTS = [(1, 256, 256, 1, 1), (3, 384, 512, 5, 3), (2, 256, 320, 1, 2)]


@pytest.mark.parametrize("graph", GRAPH_NAMES)
@pytest.mark.parametrize("point", POINTS, ids=["b1-256sq-K1-C1", "b3-384x512-K5-C3", "b2-256x320-K1-C2"])
def test_graph_matches_reference(bundle, checker, graph, point):
    b, h, w, k, c = point
    spec = bundle.spec(graph)
    dims = spec.dims(b, h, w, k, c)
    rows = checker.check(Case(graph, str(point), dims, spec.sample_inputs(dims, seed=b)))
    assert {r.precision for r in rows} == {"fp32", "fp16"} and len(rows) == 2 * len(spec.outputs)
    for r in rows:
        assert r.passed, r.cells()
        if r.precision == "fp32":
            assert r.max_abs < 5e-5, r.cells()  # ONNX Runtime fp32 vs PyTorch fp32: ~1e-6 in practice


@torch.no_grad()
def test_unet_lambda_zero_rows_are_the_reference_unconditional_output(bundle, checker):
    """lam = 0 rows of the graph == the reference UNet called without any local branch."""
    spec = bundle.spec("unet")
    dims = spec.dims(2, 256, 320)
    x = spec.sample_inputs(dims, seed=5)
    x["lam"][:] = 0.0  # every concept of every row
    got = OrtRunner(spec, bundle.graph_path("unet"))
    out = got.run(x, dims)["noise_pred"]
    unet = checker.models.unet
    plain = unet(torch.from_numpy(x["latents"]), torch.from_numpy(x["timestep"]),
                 encoder_hidden_states=torch.from_numpy(x["text_embeddings"])).sample  # elite_local=None
    assert_close(out, plain.numpy(), atol=5e-5, what="lambda=0 rows vs unconditional reference")


def test_manifest_round_trips_and_hashes_match(bundle):
    m = bundle.manifest
    assert json.loads(json.dumps(m)) == m
    for precision in ("fp32", "fp16"):
        assert bundle.verify(GRAPH_NAMES, precision) == []
    for name in GRAPH_NAMES:
        assert m["graphs"][name]["spec"] == bundle.spec(name).to_dict()
        onnx_model = onnx.load(bundle.graph_path(name), load_external_data=False)
        assert [i.name for i in onnx_model.graph.input] == [t.name for t in bundle.spec(name).inputs]
        assert [o.name for o in onnx_model.graph.output] == [t.name for t in bundle.spec(name).outputs]
    assert m["sources"]["global_mapper"]["sha256"] and m["versions"]["torch"]
    assert bundle.unconditional_embedding().shape == (1, 77, bundle.model.text_dim)


def test_fp16_graphs_keep_their_fp32_islands(bundle):
    """Softmax / LayerNorm / GroupNorm (InstanceNormalization) and ELITE's m / max m run in fp32."""
    model = onnx.shape_inference.infer_shapes(onnx.load(bundle.graph_path("unet", "fp16")))
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    kept = {"Softmax", "InstanceNormalization", "LayerNormalization", "ReduceMax"}
    seen = {op: 0 for op in kept}
    for node in model.graph.node:
        if node.op_type in kept:
            seen[node.op_type] += 1
            assert types.get(node.input[0]) == f32, (node.name, node.op_type)
    assert all(seen.values()), seen  # each kind is present (ReduceMax: the per-sample max of m)
    assert sum(1 for n in model.graph.node if n.op_type == "Conv" and types.get(n.input[0]) == f16) > 10
    assert {types[i.name] for i in model.graph.input if i.name in ("latents", "lam")} == {f32}  # fp32 I/O
    # an island of several fp32 nodes stays fp32 between them: no fp32 -> fp16 -> fp32 round trip
    producer = {o: n for n in model.graph.node for o in n.output}
    to = {n.name: next(a.i for a in n.attribute if a.name == "to") for n in model.graph.node if n.op_type == "Cast"}
    trips = [n.name for n in model.graph.node if to.get(n.name) == f32 and (p := producer.get(n.input[0])) is not None
             and to.get(p.name) == f16 and types.get(p.input[0]) == f32]
    assert not trips, trips[:5]


def test_fp16_unet_computes_the_timestep_embedding_in_fp32(bundle, toy_dir, tmp_path):
    """t * freq reaches 999 rad, where fp16's spacing is 0.5: the fp16 UNet must compute the sinusoidal
    embedding in fp32 as diffusers does (cast after). Its output against float64 numpy of the formula."""
    import onnxruntime as ort

    model = onnx.load(bundle.graph_path("unet", "fp16"))
    nodes = [n for n in model.graph.node if n.name.split("/", 1)[0] == "diffusers.models.embeddings.Timesteps"]
    assert {"Sin", "Cos"} <= {n.op_type for n in nodes}
    sub = str(tmp_path / "timesteps.onnx")
    onnx.save(model, str(tmp_path / "unet.onnx"))
    onnx.utils.extract_model(str(tmp_path / "unet.onnx"), sub, ["timestep"], [nodes[-1].output[0]])
    t = np.array([0, 1, 250, 500, 751, 999], np.float32)
    got = ort.InferenceSession(sub, providers=["CPUExecutionProvider"]).run(None, {"timestep": t})[0]
    cfg = json.load(open(toy_dir / "sd" / "unet" / "config.json"))
    half = got.shape[1] // 2
    freq = np.exp(-np.log(10000.0) * np.arange(half) / (half - cfg.get("freq_shift", 0)))
    arg = t.astype(np.float64)[:, None] * freq[None]
    expected = np.concatenate([np.sin(arg), np.cos(arg)], axis=1)
    if cfg.get("flip_sin_to_cos", True):
        expected = np.concatenate([expected[:, half:], expected[:, :half]], axis=1)
    assert got.dtype == np.float32 and np.abs(got - expected).max() < 1e-3  # fp16 t * freq: up to 0.25


def test_rebuilding_unchanged_reuses_everything(toy_bundle, tmp_path):
    from elite_export.bundle_build import BuildOptions, build_bundle
    from elite_export.checkpoints import CheckpointPaths
    from elite_export.specs import ShapeRanges
    from conftest import TOY_RANGES

    copy = tmp_path / "b"
    shutil.copytree(toy_bundle, copy)
    src = copy / "toy-source-0"
    paths = CheckpointPaths(f"{src}/sd", f"{src}/image_encoder", f"{src}/global_mapper.pt", f"{src}/local_mapper.pt")
    before = {p: os.stat(p).st_mtime_ns for p in copy.rglob("*.onnx")}
    options = BuildOptions(ranges=ShapeRanges(TOY_RANGES["batch"], TOY_RANGES["size"]))
    result = build_bundle(paths, str(copy), options)
    assert {r.action for r in result.reports} == {"reused"}
    assert {p: os.stat(p).st_mtime_ns for p in copy.rglob("*.onnx")} == before
    # a changed shape range is a changed key: the graphs are exported again, the old files removed
    result = build_bundle(paths, str(copy), BuildOptions(ranges=ShapeRanges((1, 1, 2), (256, 256, 256))),
                          )
    assert {r.action for r in result.reports} == {"exported", "converted"}
    assert not set(before) & set(copy.rglob("*.onnx"))
    assert Bundle.open(str(copy)).verify() == []


def test_interrupted_build_leaves_no_bundle_that_looks_complete(toy_bundle, tmp_path, monkeypatch):
    import elite_export.bundle_build as bb
    from elite_export.cli_bundle import toy_checkpoints

    def fail_in_unet(module, spec, *args, **kwargs):
        if spec.name == "unet":
            raise KeyboardInterrupt  # what Ctrl-C mid-export looks like
        return real(module, spec, *args, **kwargs)

    real = bb.export_onnx
    monkeypatch.setattr(bb, "export_onnx", fail_in_unet)
    fresh = tmp_path / "fresh"
    shutil.copytree(toy_bundle / "toy-source-0", fresh / "toy-source-0")
    with pytest.raises(KeyboardInterrupt):
        bb.build_bundle(toy_checkpoints(str(fresh), 0), str(fresh))
    assert not (fresh / "manifest.json").exists()
    result = CliRunner().invoke(__import__("elite_export.runtime.cli", fromlist=["main"]).main,
                                ["--bundle", str(fresh), "--image", "x", "--mask", "y", "--prompt", "a S"])
    assert result.exit_code == 1 and "is not a bundle" in result.stderr


def test_check_reports_a_corrupted_graph_instead_of_crashing(toy_bundle, tmp_path):
    from elite_export.cli import main

    copy = tmp_path / "b"
    shutil.copytree(toy_bundle, copy)
    entry = Bundle.open(str(copy)).graph_file("text_encoder")
    with open(copy / entry["path"], "r+b") as f:
        f.seek(200)
        f.write(b"\x00" * 64)
    result = CliRunner().invoke(main, ["check", str(copy), "--precision", "fp32"])
    assert result.exit_code == 1, result.output
    assert "does not match its sha256" in result.output and "Traceback" not in result.output
    assert "concept_encoder" in result.output and "pass" in result.output  # the other graphs still checked


def test_check_cli_passes_on_real_concepts(toy_bundle, tmp_path):
    from conftest import concept_files
    from elite_export.cli import main

    image, mask = concept_files(4)
    result = CliRunner().invoke(main, ["check", str(toy_bundle), "--image", image, "--mask", mask,
                                       "--prompt", "a S in the style of Van Gogh"])
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output and "comparisons within tolerance" in result.output
    assert np.all([g in result.output for g in GRAPH_NAMES])
