"""Every number a user gives is checked in one place (GenerationSettings/Request.validate), with one line
that says what is allowed: through the types, both pipelines, elite-run and `elite-export generate`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import concept_files
from elite_export.errors import EliteError
from elite_export.runtime.noise import check_seed, randn
from elite_export.runtime.preprocess import load_concept
from elite_export.runtime.requests import (GUIDANCE_RANGE, LAMBDA_RANGE, PAPER_SCHEDULER_CONFIG, STEPS_RANGE,
                                           EncodedConcept, GenerationSettings, Request, validate_requests)
from elite_export.runtime.schedulers import SCHEDULER_NAMES, make_scheduler
from elite_export.specs import ModelDims, ShapeRanges

IMAGE, MASK = concept_files(7)
NAN, INF = float("nan"), float("inf")
RANGES = ShapeRanges((1, 2, 3), (256, 384, 512))


@pytest.fixture(scope="module")
def concept():
    return load_concept(IMAGE, MASK)


def refused(fn, *fragments) -> str:
    with pytest.raises(EliteError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg
    return msg


@pytest.mark.parametrize("field,value,fragment", [
    ("guidance", NAN, "guidance must be a finite number in 1..20, got nan"),
    ("guidance", INF, "got inf"), ("guidance", -INF, "got -inf"), ("guidance", 0.99, "in 1..20"),
    ("guidance", 20.01, "in 1..20"), ("guidance", "5", "in 1..20, got '5'"), ("guidance", True, "got True"),
    ("steps", 0, "steps must be an integer in 1..500, got 0"), ("steps", 501, "got 501"),
    ("steps", 2.0, "integer"), ("steps", NAN, "got nan"), ("steps", True, "got True"),
    ("height", 100, "height must be a positive multiple of 64 px, got 100"), ("width", 0, "positive multiple"),
    ("width", -64, "got -64"), ("height", 256.0, "got 256.0"), ("height", 192, "outside this bundle's range 256..512"),
    ("width", 576, "range 256..512"), ("scheduler", "plms", "unknown scheduler 'plms'; choose one of lms"),
])
def test_settings_refuse_what_is_not_allowed(field, value, fragment):
    s = GenerationSettings(steps=4, height=256, width=256)
    setattr(s, field, value)
    refused(lambda: s.validate(ModelDims(), RANGES), fragment)


def test_settings_accept_the_edges_of_every_range():
    for guidance in GUIDANCE_RANGE:
        for steps in STEPS_RANGE:
            for size in (RANGES.size[0], RANGES.size[2]):
                GenerationSettings("dpm++", steps, guidance, size, size).validate(ModelDims(), RANGES)
    GenerationSettings(guidance=np.float32(7.5), steps=np.int64(30)).validate()  # numpy numbers are numbers
    GenerationSettings(height=2048, width=64).validate()  # no bundle: any multiple of 64
    static = ShapeRanges((2, 2, 2), (384, 384, 384))
    refused(lambda: GenerationSettings(height=256, width=384).validate(ModelDims(), static),
            "height must be 384 px (this bundle is built for 384x384 only), got 256")


@pytest.mark.parametrize("field,value,fragment", [
    ("lams", [NAN], "lambda must be a finite number in 0..1, got nan"), ("lams", [INF], "got inf"),
    ("lams", [-0.01], "in 0..1"), ("lams", [1.01], "in 0..1"), ("lams", [None], "got None"),
    ("seed", 2**64, "seed must be an integer in -2**63..2**64-1 (what torch.manual_seed takes), got 18446744073709551616"),
    ("seed", -2**63 - 1, "got -9223372036854775809"), ("seed", 1.0, "got 1.0"), ("seed", True, "got True"),
    ("mode", "both", "mode must be one of local, global, got 'both'"),
    ("words", 3, "words must be 'all' or a word index '0'..'4', got 3"), ("words", "5", "got '5'"),
    ("prompt", None, "prompt must be a string"),
])
def test_requests_refuse_what_is_not_allowed(concept, field, value, fragment):
    r = Request(concept, "a S", 0, mode="global")
    setattr(r, field, value)
    refused(r.validate, fragment)


def test_requests_accept_the_edges_and_refuse_non_finite_concepts(concept):
    for lam in LAMBDA_RANGE:
        for seed in (-2**63, -1, 0, 2**64 - 1, np.uint64(2**64 - 1)):
            Request(concept, "a S", seed, lams=lam).validate()
    words = np.zeros((5, 8), np.float32)
    local = np.zeros((256, 8), np.float32)
    local[3, 4] = INF
    refused(Request(EncodedConcept(words, local, "cat.jpg"), "a S", 0).validate,
            "concept 'cat.jpg' holds NaN or inf values; re-encode it with `elite-run encode`")
    pixels = concept.pixels.copy()
    pixels[0, 0, 0] = NAN
    bad = type(concept)(pixels, concept.object_pixels, concept.mask)
    refused(Request(bad, "a S", 0).validate, "the concept image's arrays hold NaN or inf values")
    # several requests: the message says which one
    refused(lambda: validate_requests([Request(concept, "a S", 2**64 - 1), Request(concept, "a S", 2**64)]),
            "request 1: seed must be")
    refused(lambda: validate_requests([]), "no requests")


def test_the_seed_range_is_what_torch_manual_seed_takes_and_randn_agrees():
    """torch is the independent judge: the seeds it takes, ours take, with its noise bit for bit."""
    for seed in (-2**63, -2**31 - 7, -1, 2**63, 2**64 - 1):
        expected = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed)).numpy()
        np.testing.assert_array_equal(randn((1, 4, 8, 8), seed), expected, err_msg=f"seed {seed}")
        check_seed(seed)
    for seed in (-2**63 - 1, 2**64, 2**80):
        with pytest.raises((RuntimeError, ValueError)):
            torch.Generator().manual_seed(seed)
        with pytest.raises(EliteError, match="what torch.manual_seed takes"):
            randn((1, 4, 8, 8), seed)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_stays_finite_through_the_largest_step_count(name):
    """STEPS_RANGE's upper bound is sane: each scheduler's timesteps stay in the training range and its
    latents finite (dpm++ and ddim break at 1000 steps: duplicate timesteps, an index past the schedule)."""
    steps = STEPS_RANGE[1]
    s = make_scheduler(name, PAPER_SCHEDULER_CONFIG, steps)
    assert len(s.timesteps) == steps and 0 <= s.timesteps.min() and s.timesteps.max() <= 999
    x = randn((1, 4, 4, 4), 0) * np.float32(s.init_noise_sigma)  # [1,4,4,4]
    for i in range(steps):
        x = s.step(np.float32(0.5) * s.scale_model_input(x, i), i, x)  # a smooth stand-in for the UNet
    assert np.isfinite(x).all() and np.abs(x).max() < 100


def test_both_pipelines_validate_before_any_graph_runs(toy_bundle, toy_pipeline, concept):
    from elite_export.runtime.bundle import Bundle
    from elite_export.runtime.pipeline import RuntimePipeline, open_runners

    bundle = Bundle.open(str(toy_bundle))
    runtime = RuntimePipeline(bundle, open_runners(bundle))
    ok = GenerationSettings(steps=2, height=256, width=256)
    for pipe in (runtime, toy_pipeline):
        calls = dict(pipe.timer.calls)
        refused(lambda: pipe([Request(concept, "a S", 0, lams=NAN)], ok), "lambda must be a finite number")
        refused(lambda: pipe([Request(concept, "a S", 0)], GenerationSettings(steps=2, guidance=INF, height=256,
                                                                              width=256)), "guidance")
        refused(lambda: pipe([Request(concept, "a S", 0), Request(concept, "a S", 2**64)], ok), "request 1: seed")
        assert pipe.timer.calls == calls  # refused before any graph ran
    refused(lambda: open_runners(bundle, threads=-1), "threads must be 0")


def run_elite(toy_bundle, tmp_path, *extra: str):
    from elite_export.runtime.cli import main

    args = ["--bundle", str(toy_bundle), "--image", IMAGE, "--mask", MASK, "--prompt", "a S", "--steps", "2",
            "--height", "256", "--width", "256", "-o", str(tmp_path), "--quiet", *extra]
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize("extra,message", [
    (["--lambda", "nan"], "error: lambda must be a finite number in 0..1, got nan"),
    (["--lambda", "1.5"], "in 0..1, got 1.5"),
    (["--guidance", "inf"], "error: guidance must be a finite number in 1..20, got inf"),
    (["--guidance", "-5"], "got -5.0"),
    (["--steps", "100000"], "steps must be an integer in 1..500, got 100000"),
    (["--seed", str(2**64)], "seed must be an integer in -2**63..2**64-1"),
    (["--seed", str(2**64 - 1), "--prompt", "a S on the beach"], "error: request 1: seed must be an integer"),
    (["--threads", "-2"], "threads must be 0"),
])
def test_elite_run_refuses_in_one_line_and_writes_nothing(toy_bundle, tmp_path, extra, message):
    result = run_elite(toy_bundle, tmp_path, *extra)
    err = result.stderr.strip()
    assert result.exit_code == 1 and "\n" not in err and message in err, (result.exit_code, err)
    assert not list(tmp_path.glob("*.png"))


def test_elite_run_takes_the_extreme_seeds(toy_bundle, tmp_path):
    from elite_export.runtime.images import read_png_meta

    result = run_elite(toy_bundle, tmp_path, "--seed", str(2**64 - 2), "--prompt", "a S on the beach",
                       "--lambda", "1", "--guidance", "1")
    assert result.exit_code == 0, result.output
    meta = [read_png_meta(str(p)) for p in sorted(tmp_path.glob("*.png"))]
    assert [m["seed"] for m in meta] == [2**64 - 2, 2**64 - 1]
    assert (meta[0]["lambda"], meta[0]["guidance"]) == (1.0, 1.0)


def test_toy_seeds_take_the_same_range(tmp_path):
    from elite_export.cli import main

    result = CliRunner().invoke(main, ["toy", str(tmp_path / "toy"), "--seed", str(2**64)])
    assert result.exit_code == 1 and result.stderr.strip().startswith("error: seed must be an integer in -2**63")
    assert not (tmp_path / "toy").exists()
