"""`elite-export`: the export side. Reference generation, tiny models, bundles, parity checks.

    elite-export toy OUT                       a tiny random ELITE in the released formats
    elite-export generate --sd ... -o x.png    one image with the PyTorch reference
    elite-export build ... -o BUNDLE           ONNX graphs (+ TensorRT engines) and a manifest
    elite-export check BUNDLE                  every graph against the PyTorch reference
"""
from __future__ import annotations

import time

import click

from elite_export.cli_options import checkpoint_options, checkpoint_paths
from elite_export.runtime.console import EliteGroup
from elite_export.runtime.options import lambdas, sampling_options, settings_from
from elite_export.runtime.prompt import DEFAULT_PLACEHOLDERS


@click.group(cls=EliteGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Turn a trained ELITE (SD 1.4 + CLIP ViT-L/14 + the authors' mappers) into ONNX graphs and
    TensorRT engines, and hold them to the PyTorch reference.

    Start with `elite-export toy /tmp/toy` for a tiny model to try everything on."""


@main.command()
@click.argument("out", type=click.Path())
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
def toy(out: str, seed: int) -> None:
    """Write a tiny random ELITE to OUT: OUT/sd, OUT/image_encoder, OUT/{global,local}_mapper.pt.

    Same architecture and file formats as the released checkpoints, so every loading path
    that real checkpoints take is exercised. Deterministic for a seed."""
    from elite_export.runtime.noise import check_seed
    from elite_export.toy import make_toy

    check_seed(seed)
    make_toy(out, seed)
    click.echo(f"tiny ELITE written to {out}\n  --sd {out}/sd --image-encoder {out}/image_encoder "
               f"--global-mapper {out}/global_mapper.pt --local-mapper {out}/local_mapper.pt")


@main.command()
@checkpoint_options
@click.option("--image", required=True, multiple=True, type=click.Path(),
              help="Concept image (RGB; other modes are converted). Repeat with --mask to compose concepts.")
@click.option("--mask", required=True, multiple=True, type=click.Path(),
              help="Object mask of the --image in the same place, same size; white (> 0) = object.")
@click.option("--prompt", required=True,
              help="Prompt naming concept c by the c-th placeholder, e.g. 'a photo of a S' or 'a S and a V'.")
@click.option("--placeholder", "placeholders", multiple=True, default=DEFAULT_PLACEHOLDERS, show_default=True,
              help="Placeholder word of concept 1, 2, ... (repeat).")
@sampling_options
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16 needs a CUDA device.")
@click.option("--attention", type=click.Choice(["formula", "plugin"]), default="formula", show_default=True,
              help="ELITE cross-attention: the plain formula, or the fused Triton kernel (CUDA).")
@click.option("-o", "--output", default="elite.png", show_default=True, type=click.Path(), help="PNG to write.")
def generate(sd, image_encoder, global_mapper, local_mapper, image, mask, prompt, placeholders, mode, words,
             lam, scheduler, steps, guidance, seed, height, width, dtype, attention, output) -> None:
    """Generate one image with the PyTorch reference (the authors' semantics, batched CFG).

    With --scheduler lms --steps 100 --guidance 5 it reproduces the authors' inference_local.py
    (--mode local) and inference_global.py (--mode global) for the same checkpoints and seed.
    Several --image/--mask pairs compose their concepts in one prompt (one --lambda each, or one for all)."""
    import torch

    from elite_export.checkpoints import load_models
    from elite_export.errors import EliteError
    from elite_export.pipeline import ElitePipeline
    from elite_export.runtime.console import progress
    from elite_export.runtime.images import save_png
    from elite_export.runtime.preprocess import load_concept
    from elite_export.runtime.requests import Request

    settings = settings_from(scheduler, steps, guidance, height, width)
    settings.validate()
    if len(image) != len(mask):
        raise EliteError(f"{len(image)} --image and {len(mask)} --mask: give one --mask per --image")
    request = Request([load_concept(i, m) for i, m in zip(image, mask)], prompt, seed, mode, words, lambdas(lam))
    request.validate()
    t0 = time.perf_counter()
    models = load_models(checkpoint_paths(sd, image_encoder, global_mapper, local_mapper), attention)
    device = "cuda" if dtype == "fp16" or (attention == "plugin" and torch.cuda.is_available()) else "cpu"
    pipe = ElitePipeline(models, device, torch.float16 if dtype == "fp16" else torch.float32, tuple(placeholders))
    t1 = time.perf_counter()
    with progress(steps, "denoising") as bar:
        result = pipe([request], settings, on_step=lambda i, n: bar.update(1), validate=False)
    t2 = time.perf_counter()
    if result.errors[0] is not None:
        raise EliteError(f"{result.errors[0]}; {output} not written")
    img = result.images[0]
    meta = {**request.meta(), "placeholder": placeholders[0] if len(image) == 1 else list(placeholders[:len(image)]),
            "dtype": dtype, "backend": "torch", **settings.to_dict()}
    save_png(output, img, meta)
    click.echo(f"wrote {output} ({width}x{height}; load {t1 - t0:.1f} s, generate {t2 - t1:.1f} s)")


def _add_subcommands() -> None:
    """Commands defined in their own modules (kept short); they do not import this one."""
    from elite_export.bench.cli import bench, bench_ort
    from elite_export.cli_bundle import activations, build, check

    for command in (build, check, activations, bench, bench_ort):
        main.add_command(command)


_add_subcommands()
