"""One declarative spec per graph: names, dtypes, symbolic shapes, profiles, sample inputs, tolerance.

Export, parity checks, TensorRT profiles and the runtime's buffer shapes all read these; nothing
restates them. Torch-free (numpy only): the runtime and the engine builder import this module.

Symbols in shapes: B graph batch (for the UNet, 2x the requests: [uncond; cond]), R requests, K
injected words, NC concepts per prompt, h/w latent size, Y/X image size in px, and the model dims of
`ModelDims` (D, C, T, P, ...).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

import numpy as np

from elite_export.errors import EliteError


@dataclass(frozen=True)
class ModelDims:
    """Sizes read from the loaded configs (never hard-coded): SD 1.4 / ViT-L/14 values as defaults."""
    text_dim: int = 768  # D: text hidden size = UNet cross-attention dim = mapper output
    latent_channels: int = 4  # C
    tokens: int = 77  # T
    patches: int = 256  # P: CLIP patches (224/14)^2
    words: int = 5  # the global mapper's words
    image_size: int = 224  # CLIP input
    vae_factor: int = 8  # px per latent
    latent_multiple: int = 8  # the UNet's downsamplings need h, w divisible by this

    @property
    def size_multiple(self) -> int:  # px
        return self.vae_factor * self.latent_multiple

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ShapeRanges:
    """Min/opt/max request batch, image side (px) and concepts per prompt a bundle is built for;
    min == max is static. Requests with fewer concepts than a graph runs are padded with absent
    ones (lambda 0), so the concept minimum only sets what the graphs are tuned for."""
    batch: tuple[int, int, int] = (1, 1, 4)
    size: tuple[int, int, int] = (256, 512, 1024)
    concepts: tuple[int, int, int] = (1, 1, 3)

    @property
    def static(self) -> bool:
        return self.batch[0] == self.batch[2] and self.size[0] == self.size[2] and self.concepts[0] == self.concepts[2]

    def at_opt(self) -> "ShapeRanges":
        """Every range fixed at its opt value (static shapes)."""
        return ShapeRanges((self.batch[1],) * 3, (self.size[1],) * 3, (self.concepts[1],) * 3)

    def check(self, model: ModelDims) -> None:
        for what, (lo, opt, hi) in (("batch", self.batch), ("size", self.size), ("concepts", self.concepts)):
            if not 1 <= lo <= opt <= hi:
                raise EliteError(f"{what} range {lo}/{opt}/{hi} must satisfy 1 <= min <= opt <= max")
        bad = [s for s in self.size if s % model.size_multiple]
        if bad:
            raise EliteError(f"image size {bad[0]} px is not a multiple of {model.size_multiple} px (the UNet's "
                             f"downsamplings need a latent divisible by {model.latent_multiple})")

    def to_dict(self) -> dict:
        return {"batch": list(self.batch), "size": list(self.size), "concepts": list(self.concepts)}

    @classmethod
    def from_dict(cls, d: dict) -> "ShapeRanges":
        return cls(tuple(d["batch"]), tuple(d["size"]), tuple(d.get("concepts", (1, 1, 1))))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[str | int, ...]  # symbols resolved by GraphSpec.dims
    dtype: str = "float32"  # in every graph: fp16 graphs keep fp32 I/O and cast inside


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def passes(self, actual: np.ndarray, expected: np.ndarray) -> bool:
        return bool(np.all(np.abs(actual.astype(np.float64) - expected) <= self.atol + self.rtol * np.abs(expected)))


@dataclass(frozen=True)
class GraphSpec:
    name: ClassVar[str]
    inputs: ClassVar[tuple[TensorSpec, ...]]
    outputs: ClassVar[tuple[TensorSpec, ...]]
    tolerance: ClassVar[dict[str, Tolerance]]  # per precision: fp32 (ONNX Runtime CPU), fp16
    batch_factor: ClassVar[int] = 1  # graph batch per request
    k_range: ClassVar[tuple[int, int, int]] = (1, 1, 1)
    model: ModelDims = field(default_factory=ModelDims)

    def dims(self, batch: int, height: int = 512, width: int = 512, k: int = 1, concepts: int = 1) -> dict[str, int]:
        """Concrete symbols for `batch` requests at height x width px with K words and `concepts` concepts."""
        m = self.model
        return {"B": batch * self.batch_factor, "R": batch, "K": k, "NC": concepts,
                "h": height // m.vae_factor, "w": width // m.vae_factor,
                "Y": height, "X": width, "D": m.text_dim, "C": m.latent_channels, "T": m.tokens,
                "P": m.patches, "W5": m.words, "I": m.image_size}

    def shape(self, t: TensorSpec, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in t.shape)

    def shapes(self, dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: self.shape(t, dims) for t in self.inputs + self.outputs}

    def dynamic_axes(self, ranges: ShapeRanges) -> dict[str, dict[int, str]]:
        """{tensor: {axis: symbol}} for the axes that vary within `ranges` (none when static)."""
        varying = {"B", "R"} if ranges.batch[0] != ranges.batch[2] else set()
        if ranges.size[0] != ranges.size[2]:
            varying |= {"h", "w", "Y", "X"}
        if self.k_range[0] != self.k_range[2]:
            varying.add("K")
        if ranges.concepts[0] != ranges.concepts[2]:
            varying.add("NC")
        return {t.name: {i: d for i, d in enumerate(t.shape) if d in varying}
                for t in self.inputs + self.outputs}

    def profile(self, ranges: ShapeRanges) -> dict[str, tuple[tuple[int, ...], ...]]:
        """TensorRT optimization profile: {input: (min shape, opt shape, max shape)}."""
        points = [self.dims(b, s, s, k, c) for b, s, k, c in zip(ranges.batch, ranges.size, self.k_range,
                                                                 ranges.concepts)]
        return {t.name: tuple(self.shape(t, d) for d in points) for t in self.inputs}

    def sample_inputs(self, dims: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {t.name: self.sample(t, self.shape(t, dims), rng) for t in self.inputs}

    def sample(self, t: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    def to_dict(self) -> dict:
        return {"inputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.inputs],
                "outputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.outputs],
                "tolerance": {p: asdict(tol) for p, tol in self.tolerance.items()}}


class ConceptEncoderSpec(GraphSpec):
    """CLIP vision (both images in one pass) + global mapper + local mapper x patch mask."""
    name = "concept_encoder"
    inputs = (TensorSpec("image", ("B", 3, "I", "I")), TensorSpec("object_image", ("B", 3, "I", "I")),
              TensorSpec("mask", ("B", "P")))
    outputs = (TensorSpec("words", ("B", "W5", "D")), TensorSpec("local_tokens", ("B", "P", "D")))
    tolerance = {"fp32": Tolerance(1e-4, 1e-3), "fp16": Tolerance(3e-2, 3e-2)}

    def sample(self, t, shape, rng):
        if t.name == "mask":
            return (rng.random(shape) < 0.4).astype(np.float32)
        return rng.uniform(-1.8, 2.1, shape).astype(np.float32)  # the CLIP-normalised range


class TextEncoderSpec(GraphSpec):
    """CLIP text encoder with each concept's K words injected at its placeholder.

    placeholder_index [B,NC]: the placeholder's position in the tokenized prompt (T or more: absent)."""
    name = "text_encoder"
    inputs = (TensorSpec("input_ids", ("B", "T"), "int64"), TensorSpec("words", ("B", "NC", "K", "D")),
              TensorSpec("placeholder_index", ("B", "NC"), "int64"))
    outputs = (TensorSpec("text_embeddings", ("B", "T", "D")),)
    tolerance = {"fp32": Tolerance(1e-4, 1e-3), "fp16": Tolerance(3e-2, 3e-2)}
    k_range = (1, 5, 5)

    def sample(self, t, shape, rng):
        if t.name == "input_ids":  # start token, words, end token padding
            ids = np.full(shape, 49407, dtype=np.int64)
            ids[:, 0] = 49406
            ids[:, 1:12] = rng.integers(0, 49406, (shape[0], 11))
            return ids
        if t.name == "placeholder_index":  # distinct positions per row; the last concept absent when NC > 2
            index = np.stack([rng.permutation(np.arange(1, 11))[: shape[1]] for _ in range(shape[0])])
            if shape[1] > 2:
                index[:, -1] = self.model.tokens
            return index.astype(np.int64)
        return rng.standard_normal(shape).astype(np.float32)


class UnetSpec(GraphSpec):
    """The UNet with ELITE cross-attention on B = 2R rows [uncond; cond] for R requests.

    Per request and concept, for its conditional row: local_tokens [R,NC,P,D], placeholder_index
    [R,NC] (the position of the concept's first word in text_embeddings), lam [R,NC] (0: the concept
    adds nothing). The unconditional rows have no local branch (ELITE's lambda 0 there), so it is not
    computed for them."""
    name = "unet"
    inputs = (TensorSpec("latents", ("B", "C", "h", "w")), TensorSpec("timestep", ("B",)),
              TensorSpec("text_embeddings", ("B", "T", "D")), TensorSpec("local_tokens", ("R", "NC", "P", "D")),
              TensorSpec("placeholder_index", ("R", "NC"), "int64"), TensorSpec("lam", ("R", "NC")))
    outputs = (TensorSpec("noise_pred", ("B", "C", "h", "w")),)
    tolerance = {"fp32": Tolerance(1e-4, 1e-3), "fp16": Tolerance(5e-2, 5e-2)}
    batch_factor = 2

    def sample(self, t, shape, rng):
        if t.name == "timestep":
            return np.full(shape, 500.0, dtype=np.float32)
        if t.name == "placeholder_index":
            return rng.integers(1, 11, shape).astype(np.int64)
        if t.name == "lam":  # concept c: 0.8 * 0.75^c
            return np.tile((0.8 * 0.75 ** np.arange(shape[1])).astype(np.float32), (shape[0], 1))
        return rng.standard_normal(shape).astype(np.float32)


class VaeDecoderSpec(GraphSpec):
    """latents -> image in [0, 1]: decode(latents / 0.18215), then (x/2 + 0.5).clamp(0, 1)."""
    name = "vae_decoder"
    inputs = (TensorSpec("latents", ("B", "C", "h", "w")),)
    outputs = (TensorSpec("image", ("B", 3, "Y", "X")),)
    tolerance = {"fp32": Tolerance(1e-4, 1e-3), "fp16": Tolerance(2e-2, 0.0)}


SPECS: dict[str, type[GraphSpec]] = {s.name: s for s in (ConceptEncoderSpec, TextEncoderSpec, UnetSpec,
                                                          VaeDecoderSpec)}
GRAPH_NAMES = tuple(SPECS)


def spec(name: str, model: ModelDims) -> GraphSpec:
    return SPECS[name](model)
