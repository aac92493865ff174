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
import sys

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


def load_concepts(gen, images: tuple[str, ...], masks: tuple[str, ...], concept_files: tuple[str, ...]) -> list:
    """-> concepts: images first, then files, each in the order given."""
    from elite_export.runtime.concept import load_concept_file

    if len(images) != len(masks):
        raise EliteError(f"{len(images)} --image and {len(masks)} --mask: give one --mask per --image")
    concepts = [gen.concept(i, m) for i, m in zip(images, masks)]
    concepts += [load_concept_file(c, gen.bundle) for c in concept_files]
    if not concepts:
        raise EliteError("give a concept: --image X --mask M, or --concept FILE (from `elite-run encode`)")
    return concepts


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
                             help="onnxruntime provider (cuda needs onnxruntime-gpu: inputs and outputs stay in "
                                  "device memory).")
precision_option = click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "cuda"]), default="auto",
                                show_default=True, help="onnxruntime graphs: auto = the bundle's cuda variant on "
                                "--device cuda (else fp16, else fp32), fp32 on the CPU.")
cuda_graph_option = click.option("--cuda-graph", is_flag=True,
                                 help="Replay the UNet step as a CUDA graph (--device cuda, static bundles).")
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
@precision_option
@cuda_graph_option
@threads_option
@click.option("-o", "--output", default="elite_out", show_default=True, type=click.Path(), help="Folder for the PNGs.")
@click.option("--json", "as_json", is_flag=True, help="Print the stage table as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def generate(bundle, image, mask, concept_files, prompts, prompts_file, compose, mode, words, lam, scheduler, steps,
             guidance, seed, height, width, batch_size, backend, device, precision, cuda_graph, threads, output,
             as_json, quiet) -> None:
    """Generate images. Request i gets seed SEED + i; each PNG records every setting that made it.

    One concept per image (paired with the prompts), or with --compose every given concept in every
    prompt: `--image a.jpg --mask a_bg.png --image b.jpg --mask b_bg.png --compose --prompt "a S and a V"`."""
    from elite_export.runtime.generator import Generator
    from elite_export.runtime.images import save_png
    from elite_export.runtime.timing import STAGE_HEADERS

    # the graphs load once the inputs are checked
    gen = Generator(bundle, backend, device, threads, load=False, precision=precision, cuda_graph=cuda_graph)
    settings = settings_from(scheduler, steps, guidance, height, width)
    settings.validate(gen.bundle.model, gen.bundle.ranges)
    concepts = load_concepts(gen, image, mask, concept_files)
    requests = make_requests(concepts, read_prompts(prompts, prompts_file), compose, seed, mode, words, lam)
    written, failed = [], []
    with progress(steps * len(requests), "denoising", enabled=not quiet) as bar:
        for results in gen.chunks(requests, settings, batch_size, on_step=lambda i, n, rows: bar.update(rows)):
            for r in results:
                k, seed, prompt = len(written) + len(failed), r.meta["seed"], r.meta["prompt"]
                if r.error is not None:  # nothing written for it; the other rows are unaffected
                    failed.append(f"request {k} (seed {seed}, {prompt!r}): {r.error}; not written")
                    continue
                path = os.path.join(output, f"{k:03d}-{slug(prompt)}-s{seed}.png")
                save_png(path, r.image, r.meta)
                written.append(path)
    timer = gen.take_timer()
    if as_json:
        click.echo(json.dumps({"backend": backend, "files": written, "failed": failed, **settings.to_dict(),
                               **timer.to_dict(len(written))}, indent=1))
    else:
        click.echo(format_table(STAGE_HEADERS, timer.rows(len(written))))
        click.echo(f"wrote {len(written)} image(s) to {output}/")
    for line in failed:
        click.echo(f"error: {line}", err=True)
    if failed:
        sys.exit(1)


@main.command()
@click.option("--bundle", required=True, type=click.Path())
@click.option("--image", required=True, type=click.Path(), help="Concept image.")
@click.option("--mask", required=True, type=click.Path(), help="Its object mask.")
@click.option("-o", "--output", required=True, type=click.Path(), help="The .concept file to write.")
@click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime", show_default=True)
@device_option
@precision_option
def encode(bundle, image, mask, output, backend, device, precision) -> None:
    """Run the concept encoder once and store the words and local tokens (safetensors)."""
    from elite_export.runtime.concept import save_concept
    from elite_export.runtime.generator import Generator

    gen = Generator(bundle, backend, device, load=False, precision=precision)
    save_concept(output, gen.encode(image, mask), gen.bundle, image, mask)
    click.echo(f"wrote {output} (bundle {gen.bundle.id})")


@main.command()
@click.option("--bundle", required=True, type=click.Path(), help="Bundle folder from `elite-export build`.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=int, default=8000, show_default=True, help="Port (0: a free one, printed).")
@click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime", show_default=True)
@device_option
@precision_option
@cuda_graph_option
@threads_option
@click.option("--replicas", type=int, default=1, show_default=True, help="Copies of the graphs (each a Ray actor; "
              "one GPU each with --device cuda).")
@click.option("--max-batch", type=int, default=0, show_default=True,
              help="Images per pipeline call; 0: the bundle's max; 1: no batching.")
@click.option("--batch-wait-ms", type=float, default=10.0, show_default=True,
              help="How long a batch waits for compatible requests to fill it.")
@click.option("--max-queue", type=int, default=16, show_default=True,
              help="Images waiting per replica; past it requests get 503 with Retry-After.")
@click.option("--timeout-s", type=float, default=300.0, show_default=True,
              help="Per request, from its arrival; past it 504 and its work is dropped.")
@click.option("--concept-cache", type=int, default=128, show_default=True, help="Encoded concepts kept per replica.")
@click.option("--max-upload-mb", type=float, default=16.0, show_default=True, help="Largest request body.")
def serve(bundle, host, port, backend, device, precision, cuda_graph, threads, replicas, max_batch, batch_wait_ms,
          max_queue, timeout_s, concept_cache, max_upload_mb) -> None:
    """Serve the bundle over HTTP (Ray Serve, started in this process): POST /v1/encode, POST /v1/generate,
    GET /health /ready /metrics, API docs at /docs. Ready once every graph is loaded and warmed.

    \b
      elite-run serve --bundle demo_out/bundle --port 8000
      curl -F image=@cat.jpg -F mask=@cat_bg.png -F prompt="a S on the beach" -F steps=25 \\
           -F height=256 -F width=256 http://127.0.0.1:8000/v1/generate -o beach.png

    Needs the serve extra: pip install 'elite-export[serve]'."""
    from elite_export.runtime.serve.launch import serve_until_stopped
    from elite_export.runtime.serve.options import ServeOptions

    opts = ServeOptions(bundle=bundle, backend=backend, device=device, precision=precision, cuda_graph=cuda_graph,
                        threads=threads, replicas=replicas,
                        max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_queue=max_queue, timeout_s=timeout_s,
                        concept_cache=concept_cache, max_upload_mb=max_upload_mb)
    serve_until_stopped(opts, host, port, click.echo)
