"""A row that goes NaN/inf fails alone: the pipelines name the stage (and step), nothing is written for
it, and every other row of the batch is bit-identical to what it is without the bad row."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from PIL import Image

from conftest import concept_files
from elite_export.errors import EliteError
from elite_export.runtime.bundle import Bundle, file_sha256
from elite_export.runtime.pipeline import RuntimePipeline, open_runners
from elite_export.runtime.preprocess import ConceptInputs, load_concept
from elite_export.runtime.requests import EncodedConcept, GenerationSettings, Request

IMAGE, MASK = concept_files(7)
SETTINGS = GenerationSettings(steps=3, height=256, width=256)


@pytest.fixture(scope="module")
def runtime(toy_bundle):
    bundle = Bundle.open(str(toy_bundle))
    return RuntimePipeline(bundle, open_runners(bundle))


def test_runtime_a_nan_concept_fails_its_row_and_leaves_the_others_bit_identical(runtime):
    a, b = load_concept(*concept_files(7)), load_concept(*concept_files(1))
    words, local = runtime.encode_concepts([a])
    poisoned_words = words[0].copy()  # [5,D]
    poisoned_words[0, 3] = np.nan  # w0: what local mode injects into the text encoder, then the UNet
    requests = [Request(EncodedConcept(words[0], local[0]), "a S on the beach", 1),
                Request(EncodedConcept(poisoned_words, local[0], "bad.concept"), "a photo of a S", 2),
                Request(b, "a S in the jungle", 3, mode="global", lams=0.6)]
    with pytest.raises(EliteError, match="request 1: concept 'bad.concept' holds NaN"):
        runtime(requests, SETTINGS)  # validation catches it at the door...
    result = runtime(requests, SETTINGS, validate=False)  # ...here it slipped past
    assert result.errors == [None, "concept encoder: NaN/inf in the words or local tokens", None]
    assert not result.ok and not result.images[1].any()  # nothing to write for it
    for i in (0, 2):
        alone = runtime([requests[i]], SETTINGS)
        assert alone.ok
        np.testing.assert_array_equal(result.images[i], alone.images[0], err_msg=f"row {i}")
    assert result.images[0].std() > 5


def test_runtime_a_batch_where_every_row_fails_stops_early(runtime):
    words, local = runtime.encode_concepts([load_concept(IMAGE, MASK)])
    bad = EncodedConcept(np.full_like(words[0], np.inf), local[0])
    runtime.timer.calls.clear()
    result = runtime([Request(bad, "a S", 0), Request(bad, "a S", 1)], SETTINGS, validate=False)
    assert result.all_failed and "vae_decoder" not in runtime.timer.calls and "unet" not in runtime.timer.calls


def test_reference_a_nan_row_fails_alone(toy_pipeline):
    """The PyTorch reference shares the contract: the same batch with and without a poisoned row (same
    batch size, so the same kernels) gives the other rows bit for bit."""
    a, b, c = (load_concept(*concept_files(n)) for n in (7, 1, 2))
    nan_pixels = b.pixels.copy()
    nan_pixels[:, 100:110, 100:110] = np.nan
    poisoned = ConceptInputs(nan_pixels, b.object_pixels, b.mask)
    settings = GenerationSettings(steps=2, height=64, width=64)
    rows = [Request(a, "a S on the beach", 1), Request(b, "a photo of a S", 2, mode="global"),
            Request(c, "a S in the jungle", 3, lams=1.0)]
    clean = toy_pipeline(rows, settings)
    rows[1] = Request(poisoned, "a photo of a S", 2, mode="global")
    with pytest.raises(EliteError, match="request 1: the concept image's arrays hold NaN"):
        toy_pipeline(rows, settings)
    result = toy_pipeline(rows, settings, validate=False)
    assert clean.ok and result.errors == [None, "concept encoder: NaN/inf in the words or local tokens", None]
    for i in (0, 2):
        np.testing.assert_array_equal(result.images[i], clean.images[i], err_msg=f"row {i}")


def poison_unet(bundle_dir, placeholder_index: int) -> None:
    """Make the fp32 UNet's noise prediction NaN on rows whose (first) placeholder sits at `placeholder_index`
    (x * 1 elsewhere: other rows exactly as before); update the manifest's hash and size."""
    b = Bundle.open(str(bundle_dir))
    entry = b.graph_file("unet", "fp32")
    path = b.path(entry["path"])
    model = onnx.load(path)
    g = model.graph
    producer = next(n for n in g.node if "noise_pred" in n.output)
    producer.output[list(producer.output).index("noise_pred")] = "noise_pred_clean"
    g.initializer.extend([helper.make_tensor("poison_at", TensorProto.INT64, [], [placeholder_index]),
                          helper.make_tensor("poison_nan", TensorProto.FLOAT, [], [float("nan")]),
                          helper.make_tensor("poison_one", TensorProto.FLOAT, [], [1.0]),
                          helper.make_tensor("poison_shape", TensorProto.INT64, [4], [-1, 1, 1, 1]),
                          helper.make_tensor("poison_first", TensorProto.INT64, [], [0])])
    g.node.extend([helper.make_node("Gather", ["placeholder_index", "poison_first"], ["poison_index"], axis=1),
                   helper.make_node("Equal", ["poison_index", "poison_at"], ["poison_rows"]),  # [R]: concept 1's
                   helper.make_node("Where", ["poison_rows", "poison_nan", "poison_one"], ["poison_factor"]),
                   # the UNet runs 2R rows [uncond; cond]: poison both halves of a request
                   helper.make_node("Concat", ["poison_factor", "poison_factor"], ["poison_2r"], axis=0),
                   helper.make_node("Reshape", ["poison_2r", "poison_shape"], ["poison_b1"]),  # [2R,1,1,1]
                   helper.make_node("Mul", ["noise_pred_clean", "poison_b1"], ["noise_pred"])])
    onnx.save(model, path)
    entry["sha256"], entry["bytes"][entry["path"]] = file_sha256(path), os.path.getsize(path)
    with open(bundle_dir / "manifest.json", "w") as f:
        json.dump(b.manifest, f)


def test_elite_run_writes_the_good_rows_and_exits_1_naming_the_failed_request(toy_bundle, tmp_path):
    from elite_export.runtime.cli import main

    bad_bundle = tmp_path / "bad-bundle"
    shutil.copytree(toy_bundle, bad_bundle)
    poison_unet(bad_bundle, 5)  # "a photo of a S": start, a, photo, of, a, S -> index 5
    args = ["--image", IMAGE, "--mask", MASK, "--prompt", "a S on the beach", "--prompt", "a photo of a S",
            "--prompt", "a S in the jungle", "--seed", "10", "--steps", "2", "--height", "256", "--width", "256",
            "--batch-size", "3", "--quiet"]
    bad = CliRunner().invoke(main, ["--bundle", str(bad_bundle), *args, "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 1, bad.output
    assert bad.stderr.strip() == ("error: request 1 (seed 11, 'a photo of a S'): UNet, step 1 of 2: NaN/inf in "
                                  "the noise prediction; not written")
    assert "wrote 2 image(s)" in bad.stdout
    good = CliRunner().invoke(main, ["--bundle", str(toy_bundle), *args, "-o", str(tmp_path / "good")])
    assert good.exit_code == 0, good.output
    written = sorted(p.name for p in (tmp_path / "bad").glob("*.png"))
    assert written == ["000-a-s-on-the-beach-s10.png", "002-a-s-in-the-jungle-s12.png"]
    for name in written:  # the failed row changed nothing for its batch mates
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "bad" / name)),
                                      np.asarray(Image.open(tmp_path / "good" / name)), err_msg=name)
