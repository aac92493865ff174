"""Several concepts in one prompt (issue 13) through the exported graphs, the runtime and both CLIs.

C = 1 is bit-identical to the graphs exported from the pre-issue-13 code (legacy_single_concept);
absent / lambda-0 concepts change nothing on ONNX Runtime; ONNX Runtime matches torch within 1/255
for C = 2 and 3; permuting concepts with their placeholders and batching requests of different
concept counts leave every image as it is alone."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TOY_RANGES, concept_files
from elite_export.runtime.backends import OrtRunner
from elite_export.runtime.bundle import Bundle
from elite_export.runtime.cli import main as elite_run
from elite_export.runtime.images import read_png_meta
from elite_export.runtime.pipeline import RuntimePipeline, open_runners
from elite_export.runtime.preprocess import load_concept
from elite_export.runtime.requests import GenerationSettings, Request
from test_runtime import only_png, run

BEAR, DOG, THIRD = concept_files(7), concept_files(4), concept_files(1)  # the authors' teddy bear, dog, ...
SETTINGS = GenerationSettings(steps=5, height=256, width=256)


@pytest.fixture(scope="module")
def bundle(toy_bundle):
    return Bundle.open(str(toy_bundle))


@pytest.fixture(scope="module")
def pipe(bundle):
    return RuntimePipeline(bundle, open_runners(bundle))


@pytest.fixture(scope="module")
def concepts():
    return [load_concept(*c) for c in (BEAR, DOG, THIRD)]


# --- graphs ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def legacy_graphs(bundle, tmp_path_factory):
    """The text encoder and UNet exported from the pre-issue-13 code, fused for ONNX Runtime as bundles are."""
    from elite_export.export import export_onnx
    from elite_export.ort_fusion import fuse_for_ort_file
    from elite_export.parity import reference_models
    from elite_export.specs import ShapeRanges
    from legacy_single_concept import (LegacyTextEncoderGraph, LegacyTextEncoderSpec, LegacyUnetGraph,
                                       LegacyUnetSpec, install_legacy_attention)

    out = tmp_path_factory.mktemp("legacy")
    models = reference_models(bundle)  # a private copy: its processors are swapped below
    install_legacy_attention(models.unet)
    ranges = ShapeRanges(TOY_RANGES["batch"], TOY_RANGES["size"], (1, 1, 1))
    graphs = {}
    for name, module, spec in (("text_encoder", LegacyTextEncoderGraph(models.text_encoder), LegacyTextEncoderSpec),
                               ("unet", LegacyUnetGraph(models.unet), LegacyUnetSpec)):
        path = str(out / f"{name}.onnx")
        export_onnx(module.eval(), spec(bundle.model), ranges, path)
        fuse_for_ort_file(path, path)
        graphs[name] = OrtRunner(spec(bundle.model), path)
    return graphs


def legacy_inputs(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concept-axis inputs (C = 1) -> the legacy graphs' inputs: no concept axis, and the UNet's local
    inputs on every [uncond; cond] row (the same tokens and index, lambda 0 on the uncond rows)."""
    out = {k: v[:, 0] if k in ("words", "local_tokens", "placeholder_index", "lam") else v for k, v in x.items()}
    if "lam" in out:
        out["local_tokens"] = np.concatenate([out["local_tokens"]] * 2)
        out["placeholder_index"] = np.concatenate([out["placeholder_index"]] * 2)
        out["lam"] = np.concatenate([np.zeros_like(out["lam"]), out["lam"]])
    return out


@pytest.mark.parametrize("graph,k", [("text_encoder", 1), ("text_encoder", 5), ("unet", 1)])
def test_one_concept_is_bit_identical_to_the_pre_composition_graphs(bundle, legacy_graphs, graph, k):
    spec, legacy = bundle.spec(graph), legacy_graphs[graph]
    dims = spec.dims(2, 256, 320, k, concepts=1)
    x = spec.sample_inputs(dims, seed=7)
    new = OrtRunner(spec, bundle.graph_path(graph)).run(x, dims)
    old = legacy.run(legacy_inputs(x), legacy.spec.dims(2, 256, 320, k))
    for name in new:
        np.testing.assert_array_equal(new[name], old[name], err_msg=f"{graph} {name}")


@pytest.mark.parametrize("graph", ["text_encoder", "unet"])
def test_an_absent_concept_with_lambda_zero_changes_nothing_on_onnxruntime(bundle, graph):
    spec = bundle.spec(graph)
    runner = OrtRunner(spec, bundle.graph_path(graph))
    one = spec.sample_inputs(spec.dims(2, 256, 256, 1, 1), seed=3)
    two = {k: v.copy() for k, v in one.items()}
    rng = np.random.default_rng(0)
    if graph == "text_encoder":  # concept 2: random words, index past the text (absent)
        two["words"] = np.concatenate([one["words"], rng.standard_normal(one["words"].shape, np.float32)], axis=1)
        two["placeholder_index"] = np.concatenate([one["placeholder_index"], np.full((2, 1), 77)], axis=1)
    else:  # concept 2: random local tokens at the start token's column, lambda 0
        two["local_tokens"] = np.concatenate([one["local_tokens"], rng.standard_normal(one["local_tokens"].shape,
                                                                                          np.float32)], axis=1)
        two["placeholder_index"] = np.concatenate([one["placeholder_index"], np.zeros((2, 1), np.int64)], axis=1)
        two["lam"] = np.concatenate([one["lam"], np.zeros((2, 1), np.float32)], axis=1)
    want = runner.run(one, spec.dims(2, 256, 256, 1, 1))
    want = {k: v.copy() for k, v in want.items()}  # the runner reuses its output buffers
    got = runner.run(two, spec.dims(2, 256, 256, 1, 2))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)


# --- runtime ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("images,prompt,extra", [
    ((BEAR, DOG), "a S and a V on the beach", ["--lambda", "0.8", "--lambda", "0.6"]),
    ((BEAR, DOG, THIRD), "a S, a V and a W in the style of Van Gogh", []),
    ((BEAR, DOG), "a V playing with a S", ["--mode", "global"]),  # K = 5: concept 1's words shifted by 4
], ids=["C2-local", "C3-local", "C2-global"])
def test_onnxruntime_matches_the_pytorch_reference_with_several_concepts(toy_bundle, tmp_path, images, prompt, extra):
    pairs = [a for image, mask in images for a in ("--image", image, "--mask", mask)]
    common = ["--bundle", str(toy_bundle), *pairs, "--compose", "--prompt", prompt, "--steps", "6", "--seed", "11",
              "--height", "256", "--width", "256", "--quiet", *extra]
    run(*common, "--backend", "onnxruntime", "-o", str(tmp_path / "ort"))
    run(*common, "--backend", "torch", "-o", str(tmp_path / "torch"))
    ort, ref = only_png(tmp_path / "ort"), only_png(tmp_path / "torch")
    assert np.abs(ort - ref).max() <= 1, np.abs(ort - ref).max()
    meta = read_png_meta(str(next((tmp_path / "ort").glob("*.png"))))
    assert meta["concept"] == [image for image, _ in images]
    assert meta["lambda"] == ([0.8, 0.6] if "--lambda" in extra else [0.8] * len(images))


def test_reference_cli_composes_image_mask_pairs(toy_dir, toy_bundle, tmp_path):
    from elite_export.cli import main as elite_export

    src = ["--sd", f"{toy_dir}/sd", "--image-encoder", f"{toy_dir}/image_encoder", "--global-mapper",
           f"{toy_dir}/global_mapper.pt", "--local-mapper", f"{toy_dir}/local_mapper.pt"]
    args = ["--prompt", "a S and a V on the beach", "--lambda", "0.8", "--lambda", "0.5", "--steps", "5",
            "--seed", "3", "--height", "256", "--width", "256"]
    result = CliRunner().invoke(elite_export, ["generate", *src, "--image", BEAR[0], "--mask", BEAR[1], "--image", DOG[0],
                                               "--mask", DOG[1], *args, "-o", str(tmp_path / "ref.png")])
    assert result.exit_code == 0, result.output
    run("--bundle", str(toy_bundle), "--image", BEAR[0], "--mask", BEAR[1], "--image", DOG[0], "--mask", DOG[1],
        "--compose", *args, "--quiet", "-o", str(tmp_path / "ort"))
    ref = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(tmp_path / "ref.png")).astype(np.int16)
    assert np.abs(ref - only_png(tmp_path / "ort")).max() <= 1
    meta = read_png_meta(str(tmp_path / "ref.png"))
    assert meta["lambda"] == [0.8, 0.5] and meta["placeholder"] == ["S", "V"]


def images(result) -> np.ndarray:
    """The pipeline's images, every row of which must have come through (GenerationResult)."""
    assert result.ok, result.errors
    return result.images


def test_permuting_concepts_with_their_placeholders_gives_the_same_image(pipe, concepts):
    bear, dog, third = concepts
    a = images(pipe([Request([bear, dog, third], "a S and a V with a W", 5, lams=[0.8, 0.6, 0.7])], SETTINGS))[0]
    b = images(pipe([Request([third, bear, dog], "a V and a W with a S", 5, lams=[0.7, 0.8, 0.6])], SETTINGS))[0]
    assert np.abs(a.astype(int) - b).max() <= 1
    c = images(pipe([Request([dog, bear, third], "a S and a V with a W", 5, lams=[0.6, 0.8, 0.7])], SETTINGS))[0]
    assert np.abs(a.astype(int) - c).max() > 10  # the placeholders do matter


def test_a_batch_of_different_concept_counts_gives_each_request_its_alone_image(pipe, concepts):
    bear, dog, third = concepts
    requests = [Request(bear, "a S in the style of Van Gogh", 1),
                Request([bear, dog], "a S and a V on the beach", 2, lams=[0.8, 0.6]),
                Request([third, bear, dog], "a S, a V and a W", 3, mode="global", words="0")]
    batch = images(pipe(requests, SETTINGS))
    for i, r in enumerate(requests):
        np.testing.assert_array_equal(batch[i], images(pipe([r], SETTINGS))[0], err_msg=f"request {i}")
    alone = images(pipe([Request(bear, "a S on the beach", 2)], SETTINGS))[0]
    assert np.abs(batch[1].astype(int) - alone).max() > 10  # the second concept shows


def test_compose_with_one_concept_is_the_plain_run(toy_bundle, tmp_path):
    args = ["--bundle", str(toy_bundle), "--image", BEAR[0], "--mask", BEAR[1], "--prompt", "a S on the beach",
            "--steps", "4", "--height", "256", "--width", "256", "--quiet"]
    run(*args, "-o", str(tmp_path / "a"))
    run(*args, "--compose", "-o", str(tmp_path / "b"))
    np.testing.assert_array_equal(only_png(tmp_path / "a"), only_png(tmp_path / "b"))


@pytest.mark.parametrize("extra,message", [
    (["--lambda", "0.5", "--lambda", "0.6"], "one per concept needs --compose"),
    (["--compose", "--prompt", "a S on the beach"], "no placeholder 'V' for concept 2"),
    (["--compose", "--lambda", "0.5", "--lambda", "0.6", "--lambda", "0.7"], "3 lambdas for 2 concepts"),
    (["--compose", "--image", THIRD[0], "--mask", THIRD[1], "--image", BEAR[0], "--mask", BEAR[1]],
     "at most 3 per prompt"),
])
def test_composition_user_errors_are_one_line(toy_bundle, tmp_path, extra, message):
    args = ["--bundle", str(toy_bundle), "--image", BEAR[0], "--mask", BEAR[1], "--image", DOG[0], "--mask", DOG[1],
            "--height", "256", "--width", "256", "-o", str(tmp_path), *extra]
    if "--prompt" not in extra:
        args += ["--prompt", "a S and a V and a W"]
    result = CliRunner().invoke(elite_run, args)
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not list(tmp_path.glob("*.png"))


def test_build_checks_the_placeholders(toy_paths, tmp_path):
    from elite_export.bundle_build import BuildOptions, build_bundle
    from elite_export.cli import main as elite_export
    from elite_export.errors import EliteError

    with pytest.raises(EliteError, match="3 concepts per prompt need as many placeholders"):
        build_bundle(toy_paths, str(tmp_path / "a"), BuildOptions(placeholders=("S",)))
    result = CliRunner().invoke(elite_export, ["build", "--sd", toy_paths.sd, "--image-encoder", toy_paths.image_encoder,
                                               "--global-mapper", toy_paths.global_mapper, "--placeholder", "S",
                                               "--placeholder", "S2", "--concepts", "1", "1", "2",
                                               "-o", str(tmp_path / "b")])
    assert result.exit_code == 1 and "placeholder 'S2' is 2 tokens" in result.stderr, result.output
