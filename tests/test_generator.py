"""runtime.generator.Generator: the one Python API behind elite-run and the HTTP service."""
from __future__ import annotations

import io

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import concept_files
from elite_export.errors import EliteError
from elite_export.runtime.cli import main as elite_run
from elite_export.runtime.concept import concept_bytes, load_concept_bytes, load_concept_file
from elite_export.runtime.generator import Generator
from elite_export.runtime.images import read_png_meta
from elite_export.runtime.requests import GenerationSettings, Request

IMAGE, MASK = concept_files(7)


def test_concept_ids_hash_the_pixels_not_the_file(tmp_path):
    gen = Generator.__new__(Generator)  # concept() reads no graph: no bundle needed
    a = Generator.concept(gen, IMAGE, MASK)
    png = io.BytesIO()
    Image.open(IMAGE).convert("RGB").save(png, format="PNG")  # same pixels, another file format
    b = Generator.concept(gen, png.getvalue(), open(MASK, "rb").read(), source="up.png")
    assert len(a.id) == 32 and a.id == b.id and a.source == IMAGE and b.source == "up.png"
    other = Generator.concept(gen, *concept_files(1))
    assert other.id != a.id
    with pytest.raises(EliteError) as e:
        Generator.concept(gen, b"not an image", open(MASK, "rb").read())
    assert str(e.value) == "image (uploaded, 12 bytes) is not an image PIL can read (cannot identify image file)"
    with pytest.raises(EliteError, match="more than the 1,000 px allowed"):
        Generator.concept(gen, IMAGE, MASK, max_pixels=1000)


def test_generate_is_what_elite_run_writes_and_encode_round_trips(toy_bundle, tmp_path):
    args = ["--bundle", str(toy_bundle), "--image", IMAGE, "--mask", MASK, "--prompt", "a S on the beach",
            "--prompt", "a photo of a S", "--seed", "7", "--steps", "4", "--height", "256", "--width", "320",
            "--quiet", "-o", str(tmp_path / "cli")]
    assert CliRunner().invoke(elite_run, args).exit_code == 0
    files = sorted((tmp_path / "cli").glob("*.png"))

    gen = Generator(str(toy_bundle))
    concept = gen.encode(IMAGE, MASK)
    assert concept.id == gen.concept(IMAGE, MASK).id
    data = concept_bytes(concept, gen.bundle, "7.jpg", "a" * 64, "b" * 64)
    again = load_concept_bytes(data, gen.bundle, "upload")
    assert again.id == concept.id and np.array_equal(again.words, concept.words)
    (tmp_path / "c.concept").write_bytes(data)
    assert load_concept_file(str(tmp_path / "c.concept"), gen.bundle).id == concept.id

    settings = GenerationSettings(steps=4, height=256, width=320)
    results = gen.generate([Request(concept, "a S on the beach", 7), Request(concept, "a photo of a S", 8)], settings)
    for f, r in zip(files, results):
        assert r.error is None
        np.testing.assert_array_equal(np.asarray(Image.open(f)), r.image)
        cli_meta, png_meta = read_png_meta(str(f)), read_png_meta(io.BytesIO(r.png()))
        assert png_meta == r.meta == cli_meta
        assert cli_meta["concept"] == r.meta["concept"] == IMAGE and r.meta["concept_id"] == concept.id
    timer = gen.take_timer()
    assert "concept_encoder" in timer.seconds and timer.calls["unet"] == 4 and not gen.take_timer().seconds


@pytest.mark.parametrize("change,message", [
    (lambda q, s: setattr(q, "lams", [float("nan")]), "lambda must be a finite number in 0..1, got nan"),
    (lambda q, s: setattr(s, "guidance", float("inf")), "guidance must be a finite number in 1..20, got inf"),
    (lambda q, s: setattr(q, "prompt", "a dog"), "no placeholder 'S'"),
    (lambda q, s: setattr(q, "words", "7") or setattr(q, "mode", "global"), "words must be 'all' or a word index"),
    (lambda q, s: setattr(s, "height", 1024), "height 1024 is outside this bundle's range 256..512"),
    (lambda q, s: setattr(s, "scheduler", "heun"), "unknown scheduler 'heun'"),
])
def test_validate_refuses_before_any_graph_loads(toy_bundle, concept, change, message):
    gen = Generator(str(toy_bundle), load=False)
    request, settings = Request(concept, "a S", 0), GenerationSettings(steps=2, height=256, width=256)
    change(request, settings)
    with pytest.raises(EliteError, match=message):
        gen.generate([request], settings)
    assert gen._pipeline is None
