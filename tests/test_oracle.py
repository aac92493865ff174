"""Against the ELITE authors' own code: the visible oracle case (../shared/oracle), stage by stage.

The fixture (diffusers 0.11.1 / transformers 4.26 folders, the authors' mapper format) and what
their inference produced on it. Skipped where ../shared/oracle/setup.sh has not been run.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import ORACLE_DIR, assert_close, concept_files


@pytest.fixture(scope="module")
def case(oracle):
    expected, fixture = oracle
    spec = json.loads((ORACLE_DIR / "expected_visible.json").read_text())
    return expected, fixture, spec["cases"][0]


@pytest.fixture(scope="module")
def models(case):
    from elite_export.checkpoints import CheckpointPaths, load_models

    _, f, _ = case
    return load_models(CheckpointPaths(f"{f}/sd", f"{f}/image_encoder", f"{f}/global_mapper.pt",
                                       f"{f}/local_mapper.pt"))


def image_paths(c) -> tuple[str, str]:
    return concept_files(int(c["image"].split(".")[0]))


def test_preprocessing_and_tokens(case, models):
    from elite_export.runtime.preprocess import load_concept
    from elite_export.runtime.prompt import PromptTokenizer

    e, _, c = case
    concept = load_concept(*image_paths(c))
    np.testing.assert_array_equal(concept.pixels, e["case0_pixel_values_clip"][0])
    np.testing.assert_array_equal(concept.object_pixels, e["case0_pixel_values_obj"][0])
    seg16 = torch.nn.functional.interpolate(torch.from_numpy(e["case0_pixel_values_seg"]), (16, 16))[0, 0]
    np.testing.assert_array_equal(concept.mask, seg16.reshape(-1).numpy())
    tok = PromptTokenizer(models.tokenizer.backend_tokenizer)
    ids, index = tok.encode(c["text"])
    np.testing.assert_array_equal(ids, e["case0_input_ids"][0])
    assert index == c["index"]


@torch.no_grad()
def test_every_stage(case, models):
    from elite_export.mappers import clip_features

    e, _, c = case
    t = {k: torch.from_numpy(v) for k, v in e.items()}
    words = models.global_mapper(clip_features(models.vision, t["case0_pixel_values_clip"]))
    assert_close(words, e["case0_global_words"], atol=1e-5, what="global words")
    mask16 = torch.nn.functional.interpolate(t["case0_pixel_values_seg"], (16, 16))[:, 0].reshape(1, -1, 1)
    local = models.local_mapper(clip_features(models.vision, t["case0_pixel_values_obj"])) * mask16
    assert_close(local, e["case0_local_tokens"], atol=1e-5, what="local tokens")
    ids, idx = t["case0_input_ids"], torch.tensor([c["index"]])
    assert_close(models.text_encoder(ids, words[:, :1], idx), e["case0_text_w0"], atol=1e-5, what="text w0")
    assert_close(models.text_encoder(ids, words, idx), e["case0_text_full"], atol=1e-5, what="text full")
    uncond_ids = torch.from_numpy(np.array(models.tokenizer("", padding="max_length", max_length=77).input_ids))[None]
    assert_close(models.text_encoder(uncond_ids), e["uncond_text"], atol=1e-5, what="uncond text")

    def unet(text, lam):
        kw = {"elite_local": t["case0_local_tokens"], "elite_index": idx, "elite_lambda": torch.tensor([lam])}
        return models.unet(t["case0_unet_in"], torch.tensor([500.0]), encoder_hidden_states=text,
                           cross_attention_kwargs=kw).sample

    assert_close(unet(t["case0_text_w0"], 0.8), e["case0_unet_t500_local"], atol=1e-5, what="unet local")
    assert_close(unet(t["case0_text_w0"], 0.0), e["case0_unet_t500_global"], atol=1e-5, what="unet global")
    assert_close(unet(t["uncond_text"], 0.0), e["case0_unet_t500_uncond"], atol=1e-5, what="unet uncond")


def test_reference_cli_reproduces_the_local_image(case, tmp_path):
    from elite_export.cli import main

    e, f, c = case
    image, mask = image_paths(c)
    out = tmp_path / "local.png"
    result = CliRunner().invoke(main, [
        "generate", "--sd", f"{f}/sd", "--image-encoder", f"{f}/image_encoder", "--global-mapper",
        f"{f}/global_mapper.pt", "--local-mapper", f"{f}/local_mapper.pt", "--image", image, "--mask", mask,
        "--prompt", c["text"], "--seed", str(c["seed"]), "--steps", "10", "--mode", "local", "-o", str(out)])
    assert result.exit_code == 0, result.output
    diff = np.abs(np.asarray(Image.open(out)).astype(int) - e["case0_image_local_10"])
    assert diff.max() <= 1, diff.max()


@pytest.mark.slow
def test_runtime_reproduces_both_images(case, tmp_path):
    """The exported graphs on ONNX Runtime, 10-step local and 100-step global (all words)."""
    from elite_export.bundle_build import BuildOptions, build_bundle
    from elite_export.checkpoints import CheckpointPaths
    from elite_export.runtime.bundle import Bundle
    from elite_export.runtime.pipeline import RuntimePipeline, open_runners
    from elite_export.runtime.preprocess import load_concept
    from elite_export.runtime.requests import GenerationSettings, Request
    from elite_export.specs import ShapeRanges

    e, f, c = case
    paths = CheckpointPaths(f"{f}/sd", f"{f}/image_encoder", f"{f}/global_mapper.pt", f"{f}/local_mapper.pt")
    build_bundle(paths, str(tmp_path), BuildOptions(ShapeRanges((1, 1, 1), (512, 512, 512)), ("fp32",)))
    bundle = Bundle.open(str(tmp_path))
    pipe = RuntimePipeline(bundle, open_runners(bundle))
    concept = load_concept(*image_paths(c))
    local = pipe([Request(concept, c["text"], c["seed"], "local")], GenerationSettings(steps=10)).images[0]
    assert np.abs(local.astype(int) - e["case0_image_local_10"]).max() <= 1
    full = pipe([Request(concept, c["text"], c["seed"], "global", "all")], GenerationSettings(steps=100)).images[0]
    assert np.abs(full.astype(int) - e["case0_image_global_full"]).max() <= 1
