"""Every graph of a bundle on ONNX Runtime against the PyTorch reference, as a table of rows.

Cases: the spec's sample inputs at two points of the bundle's range (one non-square), real
concepts (--image/--mask) run through the whole chain, or the calibration set (--calib).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from elite_export.checkpoints import CheckpointPaths, EliteModels, load_models
from elite_export.errors import EliteError
from elite_export.graphs import graph_module
from elite_export.runtime.backends import OrtRunner
from elite_export.runtime.bundle import Bundle
from elite_export.runtime.preprocess import ConceptInputs, load_concept
from elite_export.runtime.prompt import PromptTokenizer
from elite_export.specs import GRAPH_NAMES, Tolerance


@dataclass
class ParityRow:
    graph: str
    output: str
    precision: str
    case: str
    max_abs: float
    max_rel: float  # max_abs / max |expected|
    tolerance: Tolerance | None
    passed: bool
    note: str = ""

    def cells(self) -> list:
        tol = f"{self.tolerance.atol:g}+{self.tolerance.rtol:g}|x|" if self.tolerance else "-"
        return [self.graph, self.output, self.precision, self.case, self.max_abs, self.max_rel, tol,
                "pass" if self.passed else "FAIL", self.note]


HEADERS = ["graph", "output", "precision", "case", "max abs", "max rel", "tolerance", "result", "note"]


@dataclass
class Case:
    graph: str
    name: str
    dims: dict[str, int]
    inputs: dict[str, np.ndarray]


def compare(case: Case, output: str, precision: str, actual: np.ndarray, expected: np.ndarray,
            tol: Tolerance) -> ParityRow:
    if not np.all(np.isfinite(actual)):
        return ParityRow(case.graph, output, precision, case.name, float("nan"), float("nan"), tol, False,
                         "non-finite values")
    diff = np.abs(actual.astype(np.float64) - expected)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    return ParityRow(case.graph, output, precision, case.name, max_abs, max_abs / scale if scale else 0.0, tol,
                     tol.passes(actual, expected))


def reference_models(bundle: Bundle) -> EliteModels:
    src = bundle.manifest["sources"]
    paths = CheckpointPaths(src["sd"]["path"], src["image_encoder"]["path"], src["global_mapper"]["path"],
                            src.get("local_mapper", {}).get("path"))
    return load_models(paths, "formula")


class ParityChecker:
    def __init__(self, bundle: Bundle, precisions: tuple[str, ...] = ("fp32",), models: EliteModels | None = None):
        self.bundle, self.precisions = bundle, precisions
        self.models = models if models is not None else reference_models(bundle)
        self.modules = {name: graph_module(name, self.models) for name in GRAPH_NAMES}
        self.runners: dict[tuple[str, str], object] = {}  # OrtRunner / OrtDeviceRunner, or why none

    def runner(self, graph: str, precision: str) -> OrtRunner | str:
        """The graph's session, or why there is none (a missing/corrupt file, a load failure)."""
        key = (graph, precision)
        if key not in self.runners:
            problems = self.bundle.verify((graph,), precision)
            if problems:
                self.runners[key] = problems[0]
            else:
                try:
                    spec, path = self.bundle.spec(graph), self.bundle.graph_path(graph, precision)
                    if precision == "cuda":  # the CUDA variant's fused ops run on the CUDA provider only
                        from elite_export.runtime.ort_device import OrtDeviceRunner

                        self.runners[key] = OrtDeviceRunner(spec, path, "cuda")
                    else:
                        self.runners[key] = OrtRunner(spec, path)
                except EliteError as e:
                    self.runners[key] = str(e)
        return self.runners[key]

    @torch.no_grad()
    def reference(self, case: Case) -> dict[str, np.ndarray]:
        out = self.modules[case.graph](*[torch.from_numpy(a) for a in case.inputs.values()])
        out = out if isinstance(out, tuple) else (out,)
        return {t.name: o.numpy() for t, o in zip(self.bundle.spec(case.graph).outputs, out)}

    def check(self, case: Case) -> list[ParityRow]:
        expected = self.reference(case)
        spec = self.bundle.spec(case.graph)
        rows = []
        for precision in self.precisions:
            runner = self.runner(case.graph, precision)
            if isinstance(runner, str):
                rows.append(ParityRow(case.graph, "-", precision, case.name, float("nan"), float("nan"), None,
                                      False, runner))
                continue
            actual = runner.run(case.inputs, case.dims)
            tol = spec.tolerance["fp16" if precision == "cuda" else precision]  # the CUDA variant is fp16
            for name, exp in expected.items():
                rows.append(compare(case, name, precision, actual[name], exp, tol))
        return rows


def sample_cases(bundle: Bundle) -> Iterator[Case]:
    """Each graph at the range's smallest batch, size and concept count, and at a larger, non-square
    point with the most concepts."""
    r, m = bundle.ranges, bundle.model
    big_b = min(max(2, r.batch[0]), r.batch[2])
    narrow = max(r.size[0], r.size[1] - m.size_multiple) if r.size[0] != r.size[2] else r.size[1]
    points = [("min", r.batch[0], r.size[0], r.size[0]), ("non-square", big_b, r.size[1], narrow)]
    for graph in GRAPH_NAMES:
        spec = bundle.spec(graph)
        has_concepts = any("NC" in t.shape for t in spec.inputs)
        for i, (label, b, hgt, wid) in enumerate(points):
            k = spec.k_range[0] if i == 0 else spec.k_range[2]
            c = r.concepts[0] if i == 0 else r.concepts[2]
            dims = spec.dims(b, hgt, wid, k, c)
            name = f"{label} b{b} {hgt}x{wid}" + (f" K{k}" if spec.k_range[2] > 1 else "") + \
                (f" C{c}" if has_concepts else "")
            yield Case(graph, name, dims, spec.sample_inputs(dims, seed=i))


def concept_cases(bundle: Bundle, models: EliteModels, concepts: list[tuple[str, str]], prompts: list[str],
                  timesteps: tuple[int, ...] = (999, 500, 21)) -> Iterator[Case]:
    """Real data through the chain: concept -> words/local -> text (K=1, K=5) -> UNet -> VAE."""
    from elite_export.graphs import ConceptEncoderGraph, TextEncoderGraph

    tok = PromptTokenizer.from_file(bundle.tokenizer_path(), bundle.manifest["placeholders"])
    model = bundle.model
    size = bundle.ranges.size[0]
    ce_spec, te_spec, un_spec, vae_spec = (bundle.spec(g) for g in GRAPH_NAMES)
    rng = np.random.default_rng(0)
    encoder, text_encoder = ConceptEncoderGraph(models).eval(), TextEncoderGraph(models).eval()
    for ci, (image, mask) in enumerate(concepts):
        c: ConceptInputs = load_concept(image, mask)
        tag = image.rsplit("/", 1)[-1]
        ce_in = {"image": c.pixels[None], "object_image": c.object_pixels[None], "mask": c.mask[None]}
        yield Case("concept_encoder", tag, ce_spec.dims(1), ce_in)
        with torch.no_grad():
            words, local = (t.numpy() for t in encoder(*[torch.from_numpy(a) for a in ce_in.values()]))
        for pi, prompt in enumerate(prompts):
            ids, idx = tok.encode(prompt)
            for k in (1, model.words):
                te_in = {"input_ids": ids[None], "words": words[:, None, :k], "placeholder_index": np.array([[idx]])}
                yield Case("text_encoder", f"{tag} '{prompt}' K{k}", te_spec.dims(1, k=k), te_in)
            if pi % max(1, len(prompts) // 2):  # the UNet on two prompts per concept
                continue
            with torch.no_grad():
                text = text_encoder(*[torch.from_numpy(a) for a in te_in.values()]).numpy()
            uncond = bundle.unconditional_embedding()
            h = size // model.vae_factor
            for t in timesteps:
                un_in = {"latents": rng.standard_normal((2, model.latent_channels, h, h)).astype(np.float32),
                         "timestep": np.full(2, t, np.float32), "text_embeddings": np.concatenate([uncond, text]),
                         "local_tokens": local[:, None],  # [1,1,P,D]: one concept, the conditional row
                         "placeholder_index": np.array([[idx]]),
                         "lam": np.array([[bundle.manifest["default_lambda"]]], np.float32)}
                yield Case("unet", f"{tag} '{prompt}' t{t}", un_spec.dims(1, size, size), un_in)
        h = size // model.vae_factor
        lat = (rng.standard_normal((1, model.latent_channels, h, h)) * 0.8).astype(np.float32)
        yield Case("vae_decoder", f"{tag} latents#{ci}", vae_spec.dims(1, size, size), {"latents": lat})


def worst_per_output(rows: list[ParityRow]) -> list[ParityRow]:
    """One row per (graph, output, precision): the case with the largest max abs (failures first)."""
    worst: dict[tuple, ParityRow] = {}
    for r in rows:
        key = (r.graph, r.output, r.precision)
        cur = worst.get(key)
        if cur is None or (cur.passed and not r.passed) or (cur.passed == r.passed and r.max_abs > cur.max_abs):
            worst[key] = r
    return list(worst.values())
