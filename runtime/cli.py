"""`elite-run`: generate ELITE images from a bundle (default action), encode concepts once for reuse.

    elite-run --bundle B --image cat.jpg --mask cat_bg.png --prompt "a S on the beach" -o out
    elite-run encode --bundle B --image cat.jpg --mask cat_bg.png -o cat.concept
    elite-run --bundle B --concept cat.concept --prompts prompts.txt --batch-size 4 -o out
    elite-run --bundle B --concept cat.concept --concept dog.concept --compose \
        --prompt "a S and a V on the beach" --lambda 0.8 --lambda 0.6 -o out
"""
from __future__ import annotations

import json
import os
import re

import click

from elite_export.errors import EliteError
from elite_export.runtime.backends import BACKENDS
from elite_export.runtime.console import EliteGroup, format_table, progress
from elite_export.runtime.options import lambdas, sampling_options, settings_from


class RunGroup(EliteGroup):
    default_command = "generate"


@click.group(cls=RunGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Serve ELITE from a bundle built by `elite-export build`: ONNX Runtime (CPU/CUDA) or TensorRT.

    `elite-run [generate] ...` is the default action; `elite-run encode` stores a concept's
    words and local tokens so later runs skip the vision encoder. No torch needed (except
    --backend torch, the PyTorch reference for parity)."""


def read_prompts(prompts: tuple[str, ...], prompts_file: str | None) -> list[str]:
    out = list(prompts)
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise EliteError(f"--prompts {prompts_file!r} does not exist")
        with open(prompts_file) as f:
            out += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        raise EliteError("give at least one --prompt (or --prompts FILE, one prompt per line)")
    return out


def pair(concepts: list, prompts: list[str]) -> list[tuple[object, str]]:
    """One concept x many prompts, many concepts x one prompt, or pairwise when the counts agree."""
    if len(concepts) == 1 or len(prompts) == 1 or len(concepts) == len(prompts):
        n = max(len(concepts), len(prompts))
        return [(concepts[i % len(concepts)], prompts[i % len(prompts)]) for i in range(n)]
    raise EliteError(f"{len(concepts)} concepts and {len(prompts)} prompts: give one concept, one prompt, "
                     "or as many prompts as concepts")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "image"


def open_pipeline(bundle, backend: str, device: str, threads: int):
    if backend == "torch":  # the PyTorch reference, from the bundle's recorded checkpoints
        from elite_export.parity import reference_models
        from elite_export.pipeline import ElitePipeline

        return ElitePipeline(reference_models(bundle), placeholders=tuple(bundle.manifest["placeholders"]))
    from elite_export.runtime.pipeline import RuntimePipeline, open_runners

    return RuntimePipeline(bundle, open_runners(bundle, backend, device, threads))


def load_concepts(bundle, images: tuple[str, ...], masks: tuple[str, ...],
                  concept_files: tuple[str, ...]) -> tuple[list, dict[int, str]]:
    """-> concepts (images first, then files, each in the order given), {id(concept): its name}."""
    from elite_export.runtime.concept import load_concept_file
    from elite_export.runtime.preprocess import load_concept

    if len(images) != len(masks):
        raise EliteError(f"{len(images)} --image and {len(masks)} --mask: give one --mask per --image")
    concepts = [load_concept(i, m) for i, m in zip(images, masks)]
    names = list(images)
    for path in concept_files:
        concepts.append(load_concept_file(path, bundle))
        names.append(concepts[-1].source or os.path.basename(path))
    if not concepts:
        raise EliteError("give a concept: --image X --mask M, or --concept FILE (from `elite-run encode`)")
    return concepts, {id(c): n for c, n in zip(concepts, names)}


def make_requests(concepts: list, prompts: list[str], compose: bool, seed: int, mode: str, words: str,
                  lam: tuple[float, ...]) -> list:
    """compose: every request carries all the concepts (concept c named by the c-th placeholder);
    otherwise one concept per request, paired with the prompts as `pair` says."""
    from elite_export.runtime.requests import Request

    if not compose and len(lam) > 1:
        raise EliteError(f"{len(lam)} --lambda values: one per concept needs --compose (several concepts in "
                         "one prompt); without it give one --lambda")
    groups = [(concepts, p) for p in prompts] if compose else [([c], p) for c, p in pair(concepts, prompts)]
    return [Request(cs, p, seed + i, mode, words, lambdas(lam)) for i, (cs, p) in enumerate(groups)]


backend_option = click.option("--backend", type=click.Choice([*BACKENDS, "torch"]),
                              default="onnxruntime", show_default=True,
                              help="torch = the PyTorch reference (needs the export extra and the source checkpoints).")
device_option = click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                             help="onnxruntime provider (cuda needs onnxruntime-gpu).")
threads_option = click.option("--threads", type=int, default=0, show_default=True,
                              help="onnxruntime intra-op threads (0 = its choice).")


@main.command()
@click.option("--bundle", required=True, type=click.Path(), help="Bundle folder from `elite-export build`.")
@click.option("--image", multiple=True, type=click.Path(), help="Concept image (repeatable).")
@click.option("--mask", multiple=True, type=click.Path(), help="Its object mask, same size, white = object.")
@click.option("--concept", "concept_files", multiple=True, type=click.Path(), help="A .concept file (repeatable).")
@click.option("--prompt", "prompts", multiple=True, help="Prompt with the placeholder (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(), help="File of prompts, one per line.")
@click.option("--compose", is_flag=True,
              help="Every prompt composes all the concepts given: concept c is named by the c-th placeholder "
                   "(S, V, W); one --lambda for all or one per concept.")
@sampling_options
@click.option("--batch-size", type=int, default=None, help="Requests per UNet call (default: the bundle's max).")
@backend_option
@device_option
@threads_option
@click.option("-o", "--output", default="elite_out", show_default=True, type=click.Path(), help="Folder for the PNGs.")
@click.option("--json", "as_json", is_flag=True, help="Print the stage table as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def generate(bundle, image, mask, concept_files, prompts, prompts_file, compose, mode, words, lam, scheduler, steps,
             guidance, seed, height, width, batch_size, backend, device, threads, output, as_json, quiet) -> None:
    """Generate images. Request i gets seed SEED + i; each PNG records every setting that made it.

    One concept per image (paired with the prompts), or with --compose every given concept in every
    prompt: `--image a.jpg --mask a_bg.png --image b.jpg --mask b_bg.png --compose --prompt "a S and a V"`."""
    from elite_export.runtime.bundle import Bundle
    from elite_export.runtime.images import save_png
    from elite_export.runtime.requests import words_slice
    from elite_export.runtime.timing import STAGE_HEADERS, StageTimer

    b = Bundle.open(bundle)
    words_slice(mode, words)
    settings = settings_from(scheduler, steps, guidance, height, width)
    m, r = b.model, b.ranges
    settings.check_size(m.size_multiple, r.size[0], r.size[2])
    concepts, names = load_concepts(b, image, mask, concept_files)
    requests = make_requests(concepts, read_prompts(prompts, prompts_file), compose, seed, mode, words, lam)
    batch = batch_size or min(len(requests), r.batch[2])
    if not 1 <= batch <= r.batch[2]:
        raise EliteError(f"--batch-size {batch} is outside this bundle's 1..{r.batch[2]}")
    pipe = open_pipeline(b, backend, device, threads)
    timer = StageTimer()
    written = []
    with progress(steps * len(requests), "denoising", enabled=not quiet) as bar:
        for start in range(0, len(requests), batch):
            chunk = requests[start:start + batch]
            images = pipe(chunk, settings, on_step=lambda i, n, k=len(chunk): bar.update(k))
            for j, (req, img) in enumerate(zip(chunk, images)):
                path = os.path.join(output, f"{start + j:03d}-{slug(req.prompt)}-s{req.seed}.png")
                named = [names[id(c)] for c in req.concepts]
                save_png(path, img, {**req.meta(), **settings.to_dict(), "backend": backend, "bundle_id": b.id,
                                     "concept": named[0] if len(named) == 1 else named})
                written.append(path)
            timer.merge(pipe.timer)
            pipe.timer = StageTimer()
    if as_json:
        click.echo(json.dumps({"backend": backend, "files": written, **settings.to_dict(),
                               **timer.to_dict(len(written))}, indent=1))
    else:
        click.echo(format_table(STAGE_HEADERS, timer.rows(len(written))))
        click.echo(f"wrote {len(written)} image(s) to {output}/")


@main.command()
@click.option("--bundle", required=True, type=click.Path())
@click.option("--image", required=True, type=click.Path(), help="Concept image.")
@click.option("--mask", required=True, type=click.Path(), help="Its object mask.")
@click.option("-o", "--output", required=True, type=click.Path(), help="The .concept file to write.")
@click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime", show_default=True)
@device_option
def encode(bundle, image, mask, output, backend, device) -> None:
    """Run the concept encoder once and store the words and local tokens (safetensors)."""
    from elite_export.runtime.bundle import Bundle
    from elite_export.runtime.concept import save_concept
    from elite_export.runtime.pipeline import RuntimePipeline, open_runners
    from elite_export.runtime.preprocess import load_concept
    from elite_export.runtime.requests import EncodedConcept

    b = Bundle.open(bundle)
    inputs = load_concept(image, mask)
    pipe = RuntimePipeline(b, open_runners(b, backend, device))
    words, local = pipe.encode_concepts([inputs])
    save_concept(output, EncodedConcept(words[0], local[0]), b, image, mask)
    click.echo(f"wrote {output} (bundle {b.id})")
