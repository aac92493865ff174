"""The lean runtime end to end: elite-run on ONNX Runtime vs the PyTorch reference, batches, concept files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import ROOT, concept_files
from elite_export.runtime.bundle import Bundle
from elite_export.runtime.cli import main as elite_run
from elite_export.runtime.images import read_png_meta
from elite_export.runtime.pipeline import RuntimePipeline, open_runners
from elite_export.runtime.preprocess import load_concept
from elite_export.runtime.requests import GenerationSettings, Request

IMAGE, MASK = concept_files(7)


def run(*args: str):
    result = CliRunner().invoke(elite_run, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def only_png(folder: Path) -> np.ndarray:
    (png,) = folder.glob("*.png")
    return np.asarray(Image.open(png)).astype(np.int16)


@pytest.mark.parametrize("mode,scheduler", [("local", "lms"), ("global", "lms"), ("local", "dpm++"),
                                            ("global", "dpm++")])
def test_onnxruntime_matches_the_pytorch_reference(toy_bundle, tmp_path, mode, scheduler):
    common = ["--bundle", str(toy_bundle), "--image", IMAGE, "--mask", MASK, "--prompt", "a S in the style of Van Gogh",
              "--mode", mode, "--scheduler", scheduler, "--steps", "8", "--seed", "123", "--height", "256",
              "--width", "320", "--quiet"]
    run(*common, "--backend", "onnxruntime", "-o", str(tmp_path / "ort"))
    run(*common, "--backend", "torch", "-o", str(tmp_path / "torch"))
    ort, ref = only_png(tmp_path / "ort"), only_png(tmp_path / "torch")
    assert ort.shape == (256, 320, 3)
    assert np.abs(ort - ref).max() <= 1, np.abs(ort - ref).max()
    assert ort.std() > 5  # an image, not a flat field


def test_a_batch_gives_each_request_its_single_request_image(toy_bundle):
    bundle = Bundle.open(str(toy_bundle))
    pipe = RuntimePipeline(bundle, open_runners(bundle))
    a, b = load_concept(*concept_files(7)), load_concept(*concept_files(1))
    requests = [Request(a, "a S in the style of Van Gogh", 1), Request(b, "a photo of a S", 2, mode="global"),
                Request(a, "a S on the beach", 3, mode="global", words="3", lams=0.6)]
    settings = GenerationSettings(steps=6, height=256, width=256)
    result = pipe(requests, settings)
    assert result.errors == [None] * 3
    batch = result.images
    for i, r in enumerate(requests):
        np.testing.assert_array_equal(batch[i], pipe([r], settings).images[0], err_msg=f"request {i}")
    assert np.abs(batch[0].astype(int) - batch[2]).max() > 10  # the rows really differ


def test_seeds_and_png_metadata(toy_bundle, tmp_path):
    args = ["--bundle", str(toy_bundle), "--image", IMAGE, "--mask", MASK, "--steps", "4", "--height", "256",
            "--width", "256", "--quiet"]
    run(*args, "--prompt", "a photo of a S", "--prompt", "a S on the beach", "--seed", "5", "-o", str(tmp_path / "a"))
    files = sorted((tmp_path / "a").glob("*.png"))
    meta = [read_png_meta(str(f)) for f in files]
    assert [m["seed"] for m in meta] == [5, 6] and meta[1]["prompt"] == "a S on the beach"
    assert {k: meta[0][k] for k in ("scheduler", "steps", "guidance", "height", "width", "mode", "lambda")} == \
        {"scheduler": "lms", "steps": 4, "guidance": 5.0, "height": 256, "width": 256, "mode": "local", "lambda": 0.8}
    run(*args, "--prompt", "a photo of a S", "--seed", "5", "-o", str(tmp_path / "b"))  # reproduce the first
    again = np.asarray(Image.open(next((tmp_path / "b").glob("*.png"))))
    np.testing.assert_array_equal(again, np.asarray(Image.open(files[0])))
    run(*args, "--prompt", "a photo of a S", "--seed", "6", "-o", str(tmp_path / "c"))
    assert not np.array_equal(np.asarray(Image.open(next((tmp_path / "c").glob("*.png")))), again)


def test_concept_files_skip_the_vision_encoder_and_refuse_other_bundles(toy_bundle, tmp_path):
    from safetensors.numpy import load_file, save_file

    concept = tmp_path / "cat.concept"
    run("encode", "--bundle", str(toy_bundle), "--image", IMAGE, "--mask", MASK, "-o", str(concept))
    args = ["--bundle", str(toy_bundle), "--prompt", "a S in the jungle", "--steps", "4", "--height", "256",
            "--width", "256", "--quiet"]
    run(*args, "--image", IMAGE, "--mask", MASK, "-o", str(tmp_path / "img"))
    result = run(*args, "--concept", str(concept), "-o", str(tmp_path / "con"), "--json")
    assert '"concept_encoder"' not in result.output  # the vision encoder never ran
    np.testing.assert_array_equal(only_png(tmp_path / "img"), only_png(tmp_path / "con"))
    foreign = tmp_path / "foreign.concept"
    save_file(load_file(str(concept)), str(foreign), metadata={"format": "elite-concept/1", "bundle_id": "0" * 32})
    result = CliRunner().invoke(elite_run, [*args, "--concept", str(foreign), "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "encoded with another model" in result.stderr


@pytest.mark.parametrize("extra,message", [
    (["--height", "1024"], "outside this bundle's range 256..512"),
    (["--width", "300"], "multiple of 64"),
    (["--batch-size", "4"], "outside this bundle's 1..3"),
    (["--prompt", "a dog"], "no placeholder 'S'"),
    (["--mask", concept_files(4)[1]], "but the image is"),
    (["--steps", "0"], "steps must be an integer in 1..500, got 0"),
])
def test_user_errors_are_one_line(toy_bundle, tmp_path, extra, message):
    args = {"--bundle": str(toy_bundle), "--image": IMAGE, "--mask": MASK, "--prompt": "a S", "--height": "256",
            "--width": "256", "-o": str(tmp_path)}
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = v
    result = CliRunner().invoke(elite_run, [x for kv in args.items() for x in kv])
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not list(tmp_path.glob("*.png"))


def test_a_truncated_graph_is_refused_at_start_without_hashing_it(toy_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(toy_bundle, copy)
    entry = Bundle.open(str(copy)).graph_file("unet")
    assert entry["bytes"][entry["path"]] == os.path.getsize(copy / entry["path"])
    with open(copy / entry["path"], "r+b") as f:
        f.truncate(1000)
    result = CliRunner().invoke(elite_run, ["--bundle", str(copy), "--image", IMAGE, "--mask", MASK, "--prompt", "a S",
                                            "--height", "256", "--width", "256", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "truncated or replaced" in result.stderr, result.output


BLOCKER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'diffusers', 'transformers', 'triton', 'tensorrt'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_runtime_runs_where_torch_cannot_be_imported(toy_bundle, tmp_path):
    code = BLOCKER + f"""
from elite_export.runtime.cli import main
main(['--bundle', {str(toy_bundle)!r}, '--image', {IMAGE!r}, '--mask', {MASK!r}, '--prompt', 'a S',
      '--steps', '2', '--height', '256', '--width', '256', '-o', {str(tmp_path)!r}], standalone_mode=False)
assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')]
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(tmp_path.glob("*.png"))) == 1


@pytest.mark.slow
def test_pip_install_into_a_clean_venv_serves_without_torch(toy_bundle, tmp_path):
    """`pip install .` (the base install: the runtime) into a fresh venv, then elite-run on the toy bundle."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-3000:]
    check = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in ('torch','diffusers',"
                            "'transformers') if u.find_spec(m)])"], capture_output=True, text=True, check=True)
    assert check.stdout.strip() == "[]"
    out = tmp_path / "out"
    proc = subprocess.run([str(venv / "bin" / "elite-run"), "--bundle", str(toy_bundle), "--image", IMAGE, "--mask",
                           MASK, "--prompt", "a S", "--steps", "2", "--height", "256", "--width", "256", "-o", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(out.glob("*.png"))) == 1 and "images/s" in proc.stdout
