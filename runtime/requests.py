"""What a generation asks for and what it gives back, shared by the PyTorch reference and the runtime
(torch-free).

This is the one place every number a user gives is checked: `GenerationSettings.validate` and
`Request.validate` raise EliteError with one line saying what is allowed. elite-run, `elite-export
generate`, the Python API (both pipelines call them) and the service all go through them; the CLIs
turn the error into exit code 1, the service into a 4xx.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from elite_export.errors import EliteError
from elite_export.runtime.noise import check_seed
from elite_export.runtime.preprocess import ConceptInputs
from elite_export.runtime.schedulers import schedule_config, scheduler_spec
from elite_export.specs import ModelDims, ShapeRanges

MODES = ("local", "global")
WORD_CHOICES = ("all", "0", "1", "2", "3", "4")
NUM_WORDS = 5
SIZE_MULTIPLE = 64  # px: latent divisible by 8, what the UNet's three downsamplings need

# The ELITE paper's sampling settings (inference_local.py / inference_global.py).
PAPER_SCHEDULER_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                          "num_train_timesteps": 1000}
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_LAMBDA = 100, 5.0, 0.8

# What a request may ask for (README "Allowed values"); the fp16 graphs are tested at these edges.
LAMBDA_RANGE = (0.0, 1.0)  # the local branch's weight: 0 = off, the paper uses 0.8 / 0.6
GUIDANCE_RANGE = (1.0, 20.0)  # classifier-free guidance scale: 1 = conditional only
STEPS_RANGE = (1, 500)  # 5x the paper's 100; every scheduler stays finite to 999 (dpm++ and ddim break at 1000)


def check_number(name: str, value, lo: float, hi: float, integer: bool = False) -> None:
    """EliteError unless `value` is a finite number (an integer if `integer`) in lo..hi."""
    kind = "an integer" if integer else "a finite number"
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    if not ok_type or not math.isfinite(value) or not lo <= value <= hi:
        raise EliteError(f"{name} must be {kind} in {lo:g}..{hi:g}, got {value!r}")


def words_slice(mode: str, words: str) -> tuple[int, int]:
    """Which of the global mapper's five words are injected: local -> w0; global -> all or one."""
    if mode not in MODES:
        raise EliteError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "local":
        return 0, 1
    if words not in WORD_CHOICES:
        raise EliteError(f"words must be 'all' or a word index '0'..'4', got {words!r}")
    return (0, NUM_WORDS) if words == "all" else (int(words), int(words) + 1)


@dataclass
class GenerationSettings:
    scheduler: str = "lms"
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    height: int = 512
    width: int = 512
    scheduler_config: dict = field(default_factory=lambda: dict(PAPER_SCHEDULER_CONFIG))

    def validate(self, model: ModelDims | None = None, ranges: ShapeRanges | None = None) -> None:
        """EliteError (one line: what is allowed) unless every field is usable.

        model: its size multiple (default 64 px); ranges: the bundle's image sizes (None: any size)."""
        scheduler_spec(self.scheduler)
        schedule_config(self.scheduler_config)
        check_number("steps", self.steps, *STEPS_RANGE, integer=True)
        check_number("guidance", self.guidance, *GUIDANCE_RANGE)
        multiple = model.size_multiple if model is not None else SIZE_MULTIPLE
        for name, v in (("height", self.height), ("width", self.width)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0 or v % multiple:
                raise EliteError(f"{name} must be a positive multiple of {multiple} px, got {v!r}")
            lo, hi = (ranges.size[0], ranges.size[2]) if ranges is not None else (multiple, math.inf)
            if lo == hi and v != lo:
                raise EliteError(f"{name} must be {lo} px (this bundle is built for {lo}x{lo} only), got {v}")
            if not lo <= v <= hi:
                raise EliteError(f"{name} {v} is outside this bundle's range {lo}..{hi} px; rebuild the bundle "
                                 "with a wider --size")

    def to_dict(self) -> dict:
        return {"scheduler": self.scheduler, "steps": self.steps, "guidance": self.guidance,
                "height": self.height, "width": self.width}


@dataclass
class EncodedConcept:
    """A concept already through the concept encoder (from a .concept file)."""
    words: np.ndarray  # [5,D] float32
    local_tokens: np.ndarray  # [P,D] float32 (masked)
    source: str = ""
    id: str = ""  # the concept id of the image and mask it was encoded from (preprocess.concept_id)


Concept = ConceptInputs | EncodedConcept


@dataclass
class Request:
    """One image to generate: a row of a batch. Its prompt names concept c by the c-th placeholder
    (S, V, W by default), and concept c's local branch has weight lams[c].

    Request(concepts=[cat, dog], prompt="a S and a V on the beach", seed=0, lams=[0.8, 0.6]).
    One concept may be given bare (Request(cat, "a S", 0, lams=0.8) is Request([cat], ..., lams=[0.8]));
    lams=None gives every concept DEFAULT_LAMBDA."""
    concepts: list[Concept]
    prompt: str
    seed: int
    mode: str = "local"  # local: w0 + local branch; global: words, no local branch
    words: str = "all"  # global mode: "all" or "0".."4"
    lams: list[float] | None = None

    def __post_init__(self) -> None:
        self.concepts = list(self.concepts) if isinstance(self.concepts, (list, tuple)) else [self.concepts]
        if not self.concepts:
            raise EliteError("a request needs at least one concept")
        if self.lams is None:
            self.lams = [DEFAULT_LAMBDA] * len(self.concepts)
        elif isinstance(self.lams, (int, float)):
            self.lams = [float(self.lams)] * len(self.concepts)
        self.lams = [float(x) for x in self.lams]
        if len(self.lams) != len(self.concepts):
            raise EliteError(f"{len(self.lams)} lambdas for {len(self.concepts)} concepts: give one lambda, "
                             "or one per concept")

    @property
    def concept(self) -> Concept:
        """The request's only concept (single-concept code paths)."""
        if len(self.concepts) != 1:
            raise ValueError(f"this request has {len(self.concepts)} concepts; use .concepts")
        return self.concepts[0]

    @property
    def lam(self) -> float:
        """The only concept's lambda (single-concept code paths)."""
        if len(self.lams) != 1:
            raise ValueError(f"this request has {len(self.lams)} concepts; use .lams")
        return self.lams[0]

    def validate(self) -> None:
        """EliteError (one line: what is allowed) unless every field is usable. The placeholders in
        the prompt are checked by the pipeline's tokenizer (it needs the bundle's vocabulary)."""
        words_slice(self.mode, self.words)
        for lam in self.lams:
            check_number("lambda", lam, *LAMBDA_RANGE)
        check_seed(self.seed)
        if not isinstance(self.prompt, str):
            raise EliteError(f"prompt must be a string, got {type(self.prompt).__name__}")
        for c in self.concepts:
            if isinstance(c, EncodedConcept):
                if not all(np.isfinite(a).all() for a in (c.words, c.local_tokens)):
                    what = f"concept {c.source!r}" if c.source else "the encoded concept"
                    raise EliteError(f"{what} holds NaN or inf values; re-encode it with `elite-run encode`")
            elif not all(np.isfinite(a).all() for a in (c.pixels, c.object_pixels, c.mask)):
                raise EliteError("the concept image's arrays hold NaN or inf values")

    @property
    def words_slice(self) -> tuple[int, int]:
        return words_slice(self.mode, self.words)

    @property
    def num_words(self) -> int:
        lo, hi = self.words_slice
        return hi - lo

    @property
    def local_weights(self) -> list[float]:
        """lambda of each concept on the conditional row: the local branch runs in local mode only."""
        return list(self.lams) if self.mode == "local" else [0.0] * len(self.lams)

    def meta(self) -> dict:
        lam: float | list[float] = self.lams[0] if len(self.lams) == 1 else list(self.lams)
        return {"prompt": self.prompt, "seed": self.seed, "mode": self.mode, "words": self.words, "lambda": lam}


def validate_requests(requests: list[Request]) -> None:
    """Request.validate on each; with several, the message starts with which one (request i)."""
    if not requests:
        raise EliteError("no requests: give at least one")
    for i, r in enumerate(requests):
        try:
            r.validate()
        except EliteError as e:
            if len(requests) == 1:
                raise
            raise EliteError(f"request {i}: {e}") from None


def finite_rows(x: np.ndarray) -> np.ndarray:
    """[n,...] float -> bool [n]: which rows hold no NaN or inf (~4 us for SD's [1,4,32,32] latents)."""
    return np.isfinite(x.reshape(len(x), -1)).all(axis=1)


@dataclass
class GenerationResult:
    """One pipeline call: an image per request and, per request, None or why it failed.

    A row fails when a stage gives it NaN or inf (fp16 overflow, a bad graph, a bad input that slipped
    through); its image is zeros and must not be written. Other rows are unaffected: rows of a batch
    never mix."""
    images: np.ndarray  # uint8 [n,H,W,3]
    errors: list[str | None]  # [n]: None = good, else one line naming the stage (and step)

    def __len__(self) -> int:
        return len(self.errors)

    @property
    def ok(self) -> bool:
        return all(e is None for e in self.errors)

    def fail(self, finite: np.ndarray, message: str) -> None:
        """Record `message` for the rows where `finite` (bool [n]) is False and that had not failed yet."""
        for i in np.flatnonzero(~np.asarray(finite)):
            if self.errors[i] is None:
                self.errors[i] = message

    @property
    def all_failed(self) -> bool:
        return all(e is not None for e in self.errors)
