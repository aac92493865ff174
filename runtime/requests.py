"""What a generation asks for, shared by the PyTorch reference and the runtime (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from elite_export.errors import EliteError
from elite_export.runtime.preprocess import ConceptInputs

MODES = ("local", "global")
WORD_CHOICES = ("all", "0", "1", "2", "3", "4")
NUM_WORDS = 5
SIZE_MULTIPLE = 64  # px: latent divisible by 8, what the UNet's three downsamplings need

# The ELITE paper's sampling settings (inference_local.py / inference_global.py).
PAPER_SCHEDULER_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                          "num_train_timesteps": 1000}
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_LAMBDA = 100, 5.0, 0.8


def words_slice(mode: str, words: str) -> tuple[int, int]:
    """Which of the global mapper's five words are injected: local -> w0; global -> all or one."""
    if mode not in MODES:
        raise EliteError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "local":
        return 0, 1
    if words not in WORD_CHOICES:
        raise EliteError(f"--words must be 'all' or a word index 0..4, got {words!r}")
    return (0, NUM_WORDS) if words == "all" else (int(words), int(words) + 1)


@dataclass
class GenerationSettings:
    scheduler: str = "lms"
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    height: int = 512
    width: int = 512
    scheduler_config: dict = field(default_factory=lambda: dict(PAPER_SCHEDULER_CONFIG))

    def check_size(self, multiple: int = SIZE_MULTIPLE, lo: int | None = None, hi: int | None = None) -> None:
        for name, v in (("height", self.height), ("width", self.width)):
            if v <= 0 or v % multiple:
                raise EliteError(f"--{name} {v} is not a positive multiple of {multiple} px")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise EliteError(f"--{name} {v} is outside this bundle's range {lo}..{hi} px; "
                                 "rebuild the bundle with a wider --min-size/--max-size")
        if self.steps < 1:
            raise EliteError(f"--steps must be at least 1, got {self.steps}")

    def to_dict(self) -> dict:
        return {"scheduler": self.scheduler, "steps": self.steps, "guidance": self.guidance,
                "height": self.height, "width": self.width}


@dataclass
class EncodedConcept:
    """A concept already through the concept encoder (from a .concept file)."""
    words: np.ndarray  # [5,D] float32
    local_tokens: np.ndarray  # [P,D] float32 (masked)
    source: str = ""


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
        if isinstance(self.concepts, (ConceptInputs, EncodedConcept)):
            self.concepts = [self.concepts]
        self.concepts = list(self.concepts)
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
