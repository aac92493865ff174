"""The Python API that `elite-run`, the HTTP service (`elite-run serve`) and the tests share: one code path.

    from elite_export.runtime.generator import Generator
    from elite_export.runtime.requests import GenerationSettings, Request

    gen = Generator("elite-bundle", backend="onnxruntime", device="cpu", threads=0)  # loads every graph
    cat = gen.encode("cat.jpg", "cat_bg.png")   # EncodedConcept; cat.id = the image's and mask's content hash
    settings = GenerationSettings(steps=25, height=512, width=512)
    results = gen.generate([Request(cat, "a S on the beach", seed=0),
                            Request(cat, "a S in the snow", seed=1, mode="global")], settings)
    results[0].image   # uint8 [512,512,3]
    results[0].meta    # every setting that made it: the PNG's `elite` chunk
    results[0].png()   # the PNG's bytes, exactly what elite-run writes
    results[0].error   # None, or why this row failed (a stage gave it NaN/inf; its batch mates are unaffected)

One call shares one GenerationSettings (what one UNet call shares: size, steps, scheduler, guidance);
each Request has its own concept (image inputs or an EncodedConcept), prompt, seed, mode, words and
lambda. More requests than the bundle's batch run in chunks. Rows are independent: every image is
what its request gives alone, whatever else shares its batch. The pipeline is not thread-safe: call a
Generator from one thread at a time (the service runs it on one worker thread per replica).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from elite_export.errors import EliteError
from elite_export.runtime.bundle import Bundle
from elite_export.runtime.images import png_bytes
from elite_export.runtime.preprocess import ConceptInputs, Source, concept_inputs, load_concept
from elite_export.runtime.prompt import PromptTokenizer
from elite_export.runtime.requests import EncodedConcept, GenerationSettings, Request, validate_requests
from elite_export.runtime.timing import StageTimer


@dataclass
class Result:
    """One generated image and the settings that made it, or why it failed."""
    image: np.ndarray  # uint8 [H,W,3] (zeros when failed: never write it)
    meta: dict  # the `elite` PNG chunk: request, settings, backend, bundle id, concept
    error: str | None = None  # one line naming the stage (and step) that gave this row NaN/inf

    def png(self) -> bytes:
        if self.error is not None:
            raise ValueError(f"no image to encode: {self.error}")
        return png_bytes(self.image, self.meta)


def open_pipeline(bundle: Bundle, backend: str, device: str, threads: int, precision: str = "auto",
                  cuda_graph: bool = False):
    """The runtime's pipeline on `backend`, or the PyTorch reference for backend "torch" (parity runs).
    precision (auto: the bundle's cuda graphs on a GPU, else fp32) and cuda_graph: onnxruntime only."""
    if backend == "torch":  # the PyTorch reference, from the bundle's recorded checkpoints
        from elite_export.parity import reference_models
        from elite_export.pipeline import ElitePipeline

        return ElitePipeline(reference_models(bundle), placeholder=bundle.manifest["placeholder"])
    from elite_export.runtime.pipeline import RuntimePipeline, open_runners

    return RuntimePipeline(bundle, open_runners(bundle, backend, device, threads,
                                                None if precision == "auto" else precision, cuda_graph))


class Generator:
    """A bundle's graphs, loaded once: encode concepts, generate images.

    bundle: a folder from `elite-export build` (or an open Bundle). backend: onnxruntime | tensorrt |
    torch (the PyTorch reference). device: cpu | cuda (onnxruntime's provider). threads: onnxruntime
    intra-op threads (0: its choice). precision: auto | fp32 | fp16 | cuda (which of the bundle's graphs
    onnxruntime runs); cuda_graph: replay the UNet step as a CUDA graph (static bundles). load=False defers loading the graphs to the first call that needs
    them (elite-run checks its inputs first)."""

    def __init__(self, bundle: str | Bundle, backend: str = "onnxruntime", device: str = "cpu", threads: int = 0,
                 load: bool = True, precision: str = "auto", cuda_graph: bool = False):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.backend, self.device, self.threads = backend, device, threads
        self.precision, self.cuda_graph = precision, cuda_graph
        self.placeholder = self.bundle.manifest["placeholder"]
        self.tokenizer = PromptTokenizer.from_file(self.bundle.tokenizer_path(), self.placeholder)
        self.timer = StageTimer()  # every stage of every call since the last take_timer()
        self._pipeline = None
        if load:
            self.load()

    @property
    def max_batch(self) -> int:
        """Requests per pipeline call this bundle takes."""
        return self.bundle.ranges.batch[2]

    def load(self) -> None:
        if self._pipeline is None:
            self._pipeline = open_pipeline(self.bundle, self.backend, self.device, self.threads, self.precision,
                                           self.cuda_graph)

    @property
    def pipeline(self):
        self.load()
        return self._pipeline

    # -- concepts ---------------------------------------------------------------------------------
    def concept(self, image: Source, mask: Source, source: str | None = None,
                max_pixels: int | None = None) -> ConceptInputs:
        """Image + mask (paths or bytes) -> the concept encoder's inputs, with the concept id. No graph runs."""
        return load_concept(image, mask, source, max_pixels)

    def encode(self, image: Source, mask: Source) -> EncodedConcept:
        """Run the concept encoder once: words and local tokens to reuse (see concept.concept_bytes)."""
        return self.encode_inputs(self.concept(image, mask))

    def encode_inputs(self, inputs: ConceptInputs) -> EncodedConcept:
        if self.backend == "torch":
            raise EliteError("encoding concepts needs --backend onnxruntime or tensorrt")
        words, local = self.pipeline.encode_concepts([inputs])
        self._collect_timer()
        return EncodedConcept(words[0], local[0], source=inputs.source, id=inputs.id)

    # -- generation -------------------------------------------------------------------------------
    def validate(self, requests: list[Request], settings: GenerationSettings) -> None:
        """Every user error a pipeline call would raise, raised before any graph runs (EliteError): the
        runtime's own checks (GenerationSettings.validate, Request.validate), the placeholder in each
        prompt, and local mode against this bundle."""
        settings.validate(self.bundle.model, self.bundle.ranges)
        validate_requests(requests)
        for i, q in enumerate(requests):
            try:
                self.tokenizer.placeholder_index(q.prompt)
            except EliteError as e:
                raise EliteError(f"request {i}: {e}" if len(requests) > 1 else str(e)) from None
        if any(q.mode == "local" for q in requests) and not self.bundle.manifest["has_local_mapper"]:
            raise EliteError("local mode needs a bundle built with --local-mapper; use --mode global")

    def meta(self, request: Request, settings: GenerationSettings) -> dict:
        """What the PNG of `request` records (elite-run and the service alike)."""
        c = request.concept
        return {**request.meta(), **settings.to_dict(), "backend": self.backend, "device": self.device,
                "bundle_id": self.bundle.id,
                "concept": getattr(c, "source", ""), "concept_id": getattr(c, "id", "")}

    def chunks(self, requests: list[Request], settings: GenerationSettings, batch_size: int | None = None,
               on_step: Callable[[int, int, int], None] | None = None) -> Iterator[list[Result]]:
        """generate() one pipeline call at a time. on_step(step, steps, rows) after every denoising step."""
        self.validate(requests, settings)
        b = batch_size or min(len(requests), self.max_batch)
        if not 1 <= b <= self.max_batch:
            raise EliteError(f"--batch-size {b} is outside this bundle's 1..{self.max_batch}")
        for start in range(0, len(requests), b):
            chunk = requests[start:start + b]
            step = None if on_step is None else (lambda i, n, k=len(chunk): on_step(i, n, k))
            pipeline = self.pipeline  # loads the graphs on first use
            try:
                out = pipeline(chunk, settings, on_step=step, validate=False)  # validated above
            finally:  # an on_step that raises (the service dropping a call nobody waits for) still counts
                self._collect_timer()
            yield [Result(img, self.meta(req, settings), err)
                   for req, img, err in zip(chunk, out.images, out.errors)]

    def generate(self, requests: list[Request], settings: GenerationSettings, batch_size: int | None = None,
                 on_step: Callable[[int, int, int], None] | None = None) -> list[Result]:
        """One Result per request, in order (batch_size: requests per call, default the bundle's max). A
        row that went NaN/inf has .error set and no image; the others are unaffected."""
        return [r for chunk in self.chunks(requests, settings, batch_size, on_step) for r in chunk]

    def take_timer(self) -> StageTimer:
        """The stage times since the last take_timer() (and start anew)."""
        timer, self.timer = self.timer, StageTimer()
        return timer

    def _collect_timer(self) -> None:
        self.timer.merge(self._pipeline.timer)
        self._pipeline.timer = StageTimer()

    def warmup(self) -> None:
        """One concept encoding and a one-step generation at the smallest size: every graph runs once, so
        the first real request pays no session or allocator start-up. Not counted in the timer."""
        if self.backend == "torch":
            return
        r, static = self.bundle.ranges, self.bundle.manifest.get("static")
        size = r.size[1] if static else r.size[0]
        image = np.full((64, 64, 3), 128, np.uint8)
        mask = np.zeros((64, 64), bool)
        mask[16:48, 16:48] = True
        concept = self.encode_inputs(concept_inputs(image, mask, "warm-up"))
        mode = "local" if self.bundle.manifest["has_local_mapper"] else "global"
        request = Request(concept, f"a {self.placeholder}", 0, mode=mode)
        self.pipeline([request], GenerationSettings(steps=1, height=size, width=size))
        self._collect_timer()
        self.take_timer()

    def close(self) -> None:
        for runner in getattr(self._pipeline, "runners", {}).values():
            runner.close()
        self._pipeline = None
