"""The calibration set and `elite-export check --calib`."""
from __future__ import annotations

import os

from click.testing import CliRunner

from elite_export.calib import calibration_set
from elite_export.runtime.preprocess import load_concept


def test_calibration_set_is_complete():
    cs = calibration_set()
    assert len(cs.concepts) >= 10 and len(cs.generation_prompts) >= 4 and len(cs.editing_prompts) >= 4
    assert all(" S" in p or p.startswith("S ") for p in cs.prompts)  # every prompt has the placeholder
    for image, mask in cs.concepts:
        assert os.path.isfile(image) and os.path.isfile(mask)
        c = load_concept(image, mask)  # sizes agree, masks are not empty
        assert 0 < c.mask.sum() < 256


def test_check_calib_sweeps_every_graph_over_the_set(toy_bundle):
    from elite_export.cli import main

    result = CliRunner().invoke(main, ["check", str(toy_bundle), "--calib", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    cs = calibration_set()
    per_concept = 1 + 2 * len(cs.prompts) + 2 * len(cs.timesteps) + 1  # CE, text K1/K5, UNet x2 prompts, VAE
    assert f"over {8 + len(cs.concepts) * per_concept} cases" in result.output
    for output in ("words", "local_tokens", "text_embeddings", "noise_pred", "image"):
        assert output in result.output
