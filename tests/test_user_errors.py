"""Bad input to `elite-export generate`: one line on stderr, exit code 1, no traceback."""
from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

from conftest import concept_files
from elite_export.cli import main

IMAGE, MASK = concept_files(7)


def run_generate(toy_dir, tmp_path, **overrides):
    args = {"--sd": str(toy_dir / "sd"), "--image-encoder": str(toy_dir / "image_encoder"),
            "--global-mapper": str(toy_dir / "global_mapper.pt"), "--local-mapper": str(toy_dir / "local_mapper.pt"),
            "--image": IMAGE, "--mask": MASK, "--prompt": "a photo of a S", "--steps": "1",
            "--height": "64", "--width": "64", "-o": str(tmp_path / "out.png")}
    args.update(overrides)
    argv = ["generate"] + [x for k, v in args.items() if v is not None for x in (k, v)]
    return CliRunner().invoke(main, argv)


def assert_user_error(result, *fragments):
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in result.output, err
    for f in fragments:
        assert f in err, (f, err)


def broken_mapper(toy_dir, tmp_path, edit) -> str:
    state = torch.load(toy_dir / "global_mapper.pt", weights_only=True)
    edit(state)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    return str(path)


def test_generate_writes_an_image(toy_dir, tmp_path):
    result = run_generate(toy_dir, tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.png").exists()


def test_missing_files(toy_dir, tmp_path):
    assert_user_error(run_generate(toy_dir, tmp_path, **{"--global-mapper": str(tmp_path / "nope.pt")}),
                      "--global-mapper", "does not exist")
    assert_user_error(run_generate(toy_dir, tmp_path, **{"--image": str(tmp_path / "nope.jpg")}), "does not exist")
    assert_user_error(run_generate(toy_dir, tmp_path, **{"--sd": str(tmp_path)}), "no unet/ subfolder")
    assert_user_error(run_generate(toy_dir, tmp_path, **{"--sd": None}), "--sd is required")


def test_not_an_elite_mapper(toy_dir, tmp_path):
    (tmp_path / "text.pt").write_text("not a checkpoint")
    assert_user_error(run_generate(toy_dir, tmp_path, **{"--global-mapper": str(tmp_path / "text.pt")}),
                      "not a PyTorch checkpoint")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    assert_user_error(run_generate(toy_dir, tmp_path, **{"--local-mapper": str(tmp_path / "other.pt")}),
                      "--local-mapper", "is not an ELITE mapper")


def test_mapper_keys_that_do_not_match_the_unet(toy_dir, tmp_path):
    first = "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.weight"

    def edit(state):
        state["mid_block_attentions_7_attn2_to_k.weight"] = state.pop(first)

    result = run_generate(toy_dir, tmp_path, **{"--global-mapper": broken_mapper(toy_dir, tmp_path, edit)})
    assert_user_error(result, f"first missing key '{first}'", "first unexpected key 'mid_block_attentions_7_attn2_to_k")


def test_dimensions_that_disagree(toy_dir, tmp_path):
    def wider_input(state):
        state["mapping_0.0.weight"] = torch.zeros(state["mapping_0.0.weight"].shape[0], 48)

    result = run_generate(toy_dir, tmp_path, **{"--global-mapper": broken_mapper(toy_dir, tmp_path, wider_input)})
    assert_user_error(result, "48-dim image features", "hidden size is 32")

    def wrong_kv(state):
        k = "up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.weight"
        state[k] = torch.zeros(state[k].shape[0], 40)

    result = run_generate(toy_dir, tmp_path, **{"--global-mapper": broken_mapper(toy_dir, tmp_path, wrong_kv)})
    assert_user_error(result, "up_blocks.0.attentions.0.transformer_blocks.0.attn2 to_k is")

    def malformed(state):
        state["mapping_3.3.weight"] = torch.zeros(5, 5)

    result = run_generate(toy_dir, tmp_path, **{"--global-mapper": broken_mapper(toy_dir, tmp_path, malformed)})
    assert_user_error(result, "malformed mapper", "mapping_3.3.weight")


def test_bad_prompt_mask_and_sizes(toy_dir, tmp_path):
    assert_user_error(run_generate(toy_dir, tmp_path, **{"--prompt": "a photo of a cat"}), "no placeholder 'S'")
    other_mask = concept_files(4)[1]  # 399x396, the image is 236x236
    assert_user_error(run_generate(toy_dir, tmp_path, **{"--mask": other_mask}), "but the image is 236x236")
    assert_user_error(run_generate(toy_dir, tmp_path, **{"--height": "100"}), "multiple of 64")
    if not torch.cuda.is_available():
        assert_user_error(run_generate(toy_dir, tmp_path, **{"--dtype": "fp16"}), "needs a CUDA device")
    assert_user_error(run_generate(toy_dir, tmp_path, **{"--steps": "0"}), "steps must be an integer in 1..500")


@pytest.mark.parametrize("flag,value,message", [
    ("--lambda", "nan", "lambda must be a finite number in 0..1, got nan"),
    ("--guidance", "inf", "guidance must be a finite number in 1..20, got inf"),
    ("--seed", str(2**64), "seed must be an integer in -2**63..2**64-1"),
    ("--steps", "501", "steps must be an integer in 1..500"),
    ("--words", "3", None),  # with --mode local the word choice is unused, not an error
])
def test_numbers_out_of_range_are_refused_before_loading_anything(toy_dir, tmp_path, flag, value, message):
    result = run_generate(toy_dir, tmp_path, **{flag: value, "--sd": str(tmp_path)})  # models never load
    if message is None:  # got past validation: fails on the (deliberately) missing checkpoint instead
        assert_user_error(result, "no unet/ subfolder")
        return
    assert_user_error(result, message)
    assert not (tmp_path / "out.png").exists()


def test_global_mode_without_local_mapper_works_and_local_mode_says_what_is_missing(toy_dir, tmp_path):
    result = run_generate(toy_dir, tmp_path, **{"--local-mapper": None, "--mode": "global"})
    assert result.exit_code == 0, result.output
    assert_user_error(run_generate(toy_dir, tmp_path, **{"--local-mapper": None}), "needs --local-mapper")


def test_sd_folder_with_bad_weights(toy_dir, tmp_path):
    sd = tmp_path / "sd"
    shutil.copytree(toy_dir / "sd", sd)
    for f in (sd / "unet").glob("*.safetensors"):
        f.write_bytes(b"garbage")
    result = run_generate(toy_dir, tmp_path, **{"--sd": str(sd)})
    assert_user_error(result, "cannot load the UNet")
