"""ELITE generation entirely through a bundle's graphs (no torch, diffusers or transformers).

Per batch of requests: concept encoder once per concept (skipped for .concept files), text encoder
once per number of injected words, then one UNet call per step on [uncond; cond] rows (the local
branch on the conditional rows only), the numpy scheduler, and the VAE decoder. Noise is torch.randn's, bit for bit.
Requests may carry several concepts each: the graphs run the batch's largest count, the other rows
padded with absent concepts (composition.py), so each row gets what it would get alone.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from elite_export.errors import EliteError
from elite_export.runtime.backends import GraphRunner
from elite_export.runtime.bundle import Bundle
from elite_export.runtime.composition import ConceptLayout, layout
from elite_export.runtime.noise import randn
from elite_export.runtime.preprocess import ConceptInputs
from elite_export.runtime.prompt import PromptTokenizer
from elite_export.runtime.requests import (EncodedConcept, GenerationResult, GenerationSettings, Request,
                                           finite_rows, validate_requests)
from elite_export.runtime.schedulers import make_scheduler
from elite_export.runtime.timing import StageTimer
from elite_export.specs import GRAPH_NAMES

STEP_INPUTS = ("latents", "timestep")  # the UNet inputs that change per step; the rest is bound per generation


def open_runners(bundle: Bundle, backend: str = "onnxruntime", device: str = "cpu", threads: int = 0,
                 precision: str | None = None, cuda_graph: bool = False) -> dict[str, GraphRunner]:
    """precision, cuda_graph: ONNX Runtime only (see ort_device.open_ort_runners)."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise EliteError(f"threads must be 0 (onnxruntime's choice) or a positive integer, got {threads!r}")
    if backend == "onnxruntime":
        from elite_export.runtime.ort_device import open_ort_runners

        return open_ort_runners(bundle, device, threads, precision, cuda_graph)
    if backend == "tensorrt":
        from elite_export.runtime.tensorrt_backend import open_trt_runners

        return open_trt_runners(bundle, GRAPH_NAMES)
    raise EliteError(f"unknown backend {backend!r}; choose onnxruntime or tensorrt")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B,3,H,W] in [0,1] (the VAE graph clamps) -> uint8 [B,H,W,3], rounded as the authors' th2image."""
    return np.round(images.transpose(0, 2, 3, 1) * 255).astype(np.uint8)


class RuntimePipeline:
    def __init__(self, bundle: Bundle, runners: dict[str, GraphRunner]):
        self.bundle, self.runners = bundle, runners
        self.model, self.ranges = bundle.model, bundle.ranges
        self.tokenizer = PromptTokenizer.from_file(bundle.tokenizer_path(), bundle.manifest["placeholders"])
        self.uncond = bundle.unconditional_embedding()  # [1,77,D]
        self.timer = StageTimer()

    def run(self, graph: str, inputs: dict[str, np.ndarray], dims: dict[str, int]) -> dict[str, np.ndarray]:
        with self.timer.stage(graph):
            return self.runners[graph].run(inputs, dims)

    def batch_size(self, n: int) -> int:
        """Graph batch for n requests: static bundles run exactly their batch (padded)."""
        lo, _, hi = self.ranges.batch
        if n > hi:
            raise EliteError(f"{n} requests in one batch; this bundle takes at most {hi} (--batch-size {hi})")
        return hi if self.bundle.manifest.get("static") else max(n, lo)

    def encode_concepts(self, concepts: list[ConceptInputs | EncodedConcept]) -> tuple[np.ndarray, np.ndarray]:
        """-> words [n,5,D], local tokens [n,P,D].

        Images go through the concept encoder one at a time: a concept's words are then bit-identical
        whatever batch it arrives in (the mappers' small matmuls take other kernels at other batch
        sizes), and the concept encoder is a small share of a generation."""
        n, m = len(concepts), self.model
        words = np.empty((n, m.words, m.text_dim), np.float32)
        local = np.empty((n, m.patches, m.text_dim), np.float32)
        b = self.batch_size(1)
        dims = self.bundle.spec("concept_encoder").dims(b)
        first: dict[int, int] = {}  # id(concept) -> its row: a concept shared by requests is encoded once
        for i, c in enumerate(concepts):
            if isinstance(c, EncodedConcept):
                words[i], local[i] = c.words, c.local_tokens
                continue
            if id(c) in first:
                words[i], local[i] = words[first[id(c)]], local[first[id(c)]]
                continue
            first[id(c)] = i
            inputs = {"image": np.stack([c.pixels] * b), "object_image": np.stack([c.object_pixels] * b),
                      "mask": np.stack([c.mask] * b)}
            out = self.run("concept_encoder", inputs, dims)
            words[i], local[i] = out["words"][0], out["local_tokens"][0]
        return words, local

    def layout(self, requests: list[Request]) -> ConceptLayout:
        """The batch's concepts on the graphs' concept axis, within the bundle's concept range."""
        lo, _, hi = self.ranges.concepts
        return layout(requests, self.tokenizer, lo, hi)

    def encode_text(self, requests: list[Request], words: np.ndarray, lay: ConceptLayout | None = None) -> np.ndarray:
        """Conditional text embeddings [n,77,D]: one text-encoder call per number of words K.

        words: [len(lay.concepts),5,D], the requests' concepts in order (encode_concepts(lay.concepts))."""
        lay = lay or self.layout(requests)
        n, spec = len(requests), self.bundle.spec("text_encoder")
        text = np.empty((n, self.model.tokens, self.model.text_dim), np.float32)
        per_slot = lay.take(words)  # [n,C,5,D]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.words_slice, []).append(i)
        for (lo, hi), rows in groups.items():
            b = self.batch_size(len(rows))
            pad = rows + [rows[-1]] * (b - len(rows))
            inputs = {"input_ids": np.stack([self.tokenizer.ids(requests[i].prompt) for i in pad]),
                      "words": np.ascontiguousarray(per_slot[pad, :, lo:hi]),  # [b,C,K,D]
                      "placeholder_index": lay.text_index[pad]}  # [b,C]
            dims = spec.dims(b, k=hi - lo, concepts=lay.num_concepts)
            text[rows] = self.run("text_encoder", inputs, dims)["text_embeddings"][: len(rows)]
        return text

    def __call__(self, requests: list[Request], settings: GenerationSettings,
                 on_step: Callable[[int, int], None] | None = None, validate: bool = True) -> GenerationResult:
        """-> an image per request, and per request None or why it failed (a stage gave it NaN/inf).

        Rows are independent: each gets what it would get alone, a failed row included. validate=False
        skips GenerationSettings/Request.validate, for callers that ran them already (the service)."""
        m, r = self.model, self.ranges
        if validate:
            settings.validate(m, r)
            validate_requests(requests)
        if any(q.mode == "local" for q in requests) and not self.bundle.manifest["has_local_mapper"]:
            raise EliteError("local mode needs a bundle built with --local-mapper; use --mode global")
        n = len(requests)
        b = self.batch_size(n)
        t_start = time.perf_counter()
        lay = self.layout(requests)  # user errors (placeholders, concept counts) before any graph
        result = GenerationResult(np.zeros((n, settings.height, settings.width, 3), np.uint8), [None] * n)
        words, local = self.encode_concepts(lay.concepts)
        result.fail(lay.rows_ok(finite_rows(words) & finite_rows(local)),
                    "concept encoder: NaN/inf in the words or local tokens")
        text = self.encode_text(requests, words, lay)
        result.fail(finite_rows(text), "text encoder: NaN/inf in the text embeddings")
        local = lay.take(local)  # [n,C,P,D]
        pad = list(range(n)) + [n - 1] * (b - n)
        idx, lam = lay.word_index[pad], lay.lam[pad]  # [b,C]
        unet_spec, h, w = self.bundle.spec("unet"), settings.height // m.vae_factor, settings.width // m.vae_factor
        dims = unet_spec.dims(b, settings.height, settings.width, concepts=lay.num_concepts)
        feed = {"latents": np.empty((2 * b, m.latent_channels, h, w), np.float32),
                "timestep": np.empty(2 * b, np.float32),
                "text_embeddings": np.concatenate([np.repeat(self.uncond, b, axis=0), text[pad]]),
                "local_tokens": local[pad],  # [b,C,P,D]: the conditional rows' (the uncond rows have none)
                "placeholder_index": idx, "lam": lam}  # [b,C]
        step_feed = {k: feed.pop(k) for k in STEP_INPUTS}
        unet = self.runners["unet"].bind(feed, dims)  # the conditioning: on a device, uploaded once here
        scheduler = make_scheduler(settings.scheduler, self.bundle.manifest["scheduler_config"], settings.steps)
        noise = np.concatenate([randn((1, m.latent_channels, h, w), requests[i].seed) for i in pad])
        latents = noise * np.float32(scheduler.init_noise_sigma)
        guidance = np.float32(settings.guidance)
        guided = np.empty_like(latents)  # eps_u + g (eps_c - eps_u), mixed in place (schedulers keep no eps)
        for i, t in enumerate(scheduler.timesteps):
            if result.all_failed:
                break
            t0 = time.perf_counter()
            x = scheduler.scale_model_input(latents, i)
            step_feed["latents"][:b], step_feed["latents"][b:] = x, x
            step_feed["timestep"][:] = t
            with self.timer.stage("unet"):
                eps = unet(step_feed)["noise_pred"]  # [2b,C,h,w], the runner's own buffer
            np.subtract(eps[b:], eps[:b], out=guided)
            guided *= guidance
            guided += eps[:b]
            latents = scheduler.step(guided, i, latents)
            ok = finite_rows(latents[:n])  # ~4 us a step at SD's 256 px: the cost of never shipping NaN
            if not ok.all():
                unet_ok = finite_rows(eps[:n]) & finite_rows(eps[b:b + n])
                where = f"step {i + 1} of {settings.steps}"
                result.fail(unet_ok, f"UNet, {where}: NaN/inf in the noise prediction")
                result.fail(ok, f"scheduler, {where}: NaN/inf in the latents")
            self.timer.add("step", time.perf_counter() - t0)
            if on_step is not None:
                on_step(i + 1, settings.steps)
        if not result.all_failed:
            out = self.run("vae_decoder", {"latents": latents},
                           self.bundle.spec("vae_decoder").dims(b, settings.height, settings.width))["image"][:n]
            result.fail(finite_rows(out), "VAE decoder: NaN/inf in the image")
            good = [i for i, e in enumerate(result.errors) if e is None]
            result.images[good] = to_uint8(out[good])
        self.timer.add("total", time.perf_counter() - t_start)
        return result
