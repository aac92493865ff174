"""The ways a benchmark runs ELITE, each behind the same five measurable stages.

    authors     (a) the authors' inference: PyTorch eager, two unbatched UNet calls per step
                    (conditional with the local branch, unconditional without), self-attention as
                    explicit softmax(q k^T) v matmuls (their replacement CrossAttention.__call__)
    reference   (b) this project's PyTorch reference: one batched [uncond; cond] call per step, SDPA
    compiled    (b') the reference with its UNet under torch.compile(mode="reduce-overhead"): inductor
                    kernels replayed as CUDA graphs, the best PyTorch a user could pick (CUDA only)
    runtime     (c) the torch-free runtime on a bundle's graphs (ONNX Runtime on the CPU or CUDA, with
                    or without a CUDA graph of the UNet step; or TensorRT)

Stages: concept_encoder (the batch's concepts), text_encoder (their prompts), unet_step (one
denoising step's UNet work), vae_decoder, generate (end to end, `steps` steps, LMS), and
generate_<scheduler> for each further scheduler asked for (generate_dpm++).
Every way gets the same inputs: one concept, prompt and seed per request, sample tensors per spec.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np

from elite_export.errors import EliteError
from elite_export.runtime.requests import GenerationResult, GenerationSettings, Request
from elite_export.specs import UnetSpec, VaeDecoderSpec

STAGES = ("concept_encoder", "text_encoder", "unet_step", "vae_decoder", "generate")
PROMPT = "a photo of a S"


@dataclass(frozen=True)
class Workload:
    size: int  # px, square
    batch: int  # requests
    steps: int  # of `generate`

    def requests(self, concept) -> list[Request]:
        return [Request(concept, PROMPT, seed) for seed in range(self.batch)]

    def settings(self, scheduler: str = "lms") -> GenerationSettings:
        return GenerationSettings(scheduler=scheduler, steps=self.steps, height=self.size, width=self.size)


def stages(schedulers: tuple[str, ...] = ("lms",)) -> tuple[str, ...]:
    """STAGES, then generate_<scheduler> for every scheduler after the first (`generate` runs the first)."""
    return STAGES + tuple(f"generate_{s}" for s in schedulers[1:])


class Way:
    """Callables for each stage (inputs prepared once); `sync` waits for the device. Use in `with`."""
    name: str

    def stage(self, name: str) -> Callable[[], object]:
        if name.startswith("generate_"):
            return lambda: self.generate(name.split("_", 1)[1])
        return getattr(self, name)

    def sync(self) -> None:
        pass

    def __enter__(self) -> "Way":
        return self

    def __exit__(self, *exc) -> None:
        pass


def generated(way: str, result: GenerationResult) -> GenerationResult:
    """A generation's result, or EliteError if a row went NaN/inf (its timing would be a stopped run's)."""
    bad = [e for e in result.errors if e is not None]
    if bad:
        raise EliteError(f"{way}: {bad[0]} ({len(bad)} of {len(result)} rows failed)")
    return result


def unet_sample(model, workload: Workload) -> dict[str, np.ndarray]:
    """UNet inputs for `batch` requests per the spec's sampler: [uncond; cond] latents, the cond rows' ELITE inputs."""
    spec = UnetSpec(model)
    return spec.sample_inputs(spec.dims(workload.batch, workload.size, workload.size))


def vae_sample(model, workload: Workload) -> dict[str, np.ndarray]:
    spec = VaeDecoderSpec(model)
    return spec.sample_inputs(spec.dims(workload.batch, workload.size, workload.size))


class TorchWay(Way):
    """(b), and with `authors=True` (a): the PyTorch pipeline on `device` in `dtype`."""

    def __init__(self, models, workload: Workload, concept, device: str, dtype, authors: bool,
                 compiled: bool = False):
        import torch

        from elite_export.authors_way import AuthorsPipeline, formula_self_attention
        from elite_export.graphs import model_dims
        from elite_export.pipeline import ElitePipeline

        self.name = "authors" if authors else "compiled" if compiled else "reference"
        self.torch, self.device = torch, torch.device(device)
        self.pipe = (AuthorsPipeline if authors else ElitePipeline)(models, device, dtype)
        self.compiled = compiled and not authors
        self.attention = formula_self_attention(models.unet) if authors else nullcontext()
        self.workload, self.requests = workload, workload.requests(concept)
        dims = model_dims(models)
        self.unet_in = {k: self._tensor(v) for k, v in unet_sample(dims, workload).items()}
        self.vae_in = self._tensor(vae_sample(dims, workload)["latents"])
        self.words, _ = self.pipe.encode_concepts([r.concept for r in self.requests])

    def _tensor(self, a: np.ndarray):
        t = self.torch.from_numpy(a).to(self.device)
        return t if t.dtype == self.torch.int64 else t.to(self.pipe.dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def __enter__(self) -> "TorchWay":
        self.attention.__enter__()
        if self.compiled:  # in place: the pipeline's self.models.unet(...) calls the compiled forward
            self.pipe.models.unet.compile(mode="reduce-overhead", fullgraph=False, dynamic=False)
        return self

    def __exit__(self, *exc) -> None:
        self.attention.__exit__(*exc)
        if self.compiled:  # back to eager for whoever uses the models next
            self.pipe.models.unet._compiled_call_impl = None

    def concept_encoder(self):
        return self.pipe.encode_concepts([r.concept for r in self.requests])

    def text_encoder(self):
        return self.pipe.encode_text([r.prompt for r in self.requests], self.words[:, :1])

    def unet_step(self):
        u, B = self.unet_in, self.workload.batch
        return self.pipe.predict_noise(u["latents"][B:], u["timestep"][0], u["text_embeddings"], u["local_tokens"],
                                       u["placeholder_index"], u["lam"])

    def vae_decoder(self):
        return self.pipe.decode(self.vae_in)

    def generate(self, scheduler: str = "lms"):
        return generated(self.name, self.pipe(self.requests, self.workload.settings(scheduler)))


class RuntimeWay(Way):
    """(c): RuntimePipeline on a bundle with the given runners (ONNX Runtime or TensorRT). unet_step is
    what a denoising step runs: the UNet bound to its conditioning once, called with latents and timestep."""

    def __init__(self, bundle, runners: dict, workload: Workload, concept, backend: str, name: str = ""):
        from elite_export.runtime.pipeline import STEP_INPUTS, RuntimePipeline

        self.name = name or f"runtime-{backend}"
        self.pipe = RuntimePipeline(bundle, runners)
        self.workload, self.requests = workload, workload.requests(concept)
        b = self.pipe.batch_size(workload.batch)
        self.unet_dims = bundle.spec("unet").dims(b, workload.size, workload.size)
        self.vae_dims = bundle.spec("vae_decoder").dims(b, workload.size, workload.size)
        self.unet_in = unet_sample(bundle.model, Workload(workload.size, b, workload.steps))
        self.vae_in = vae_sample(bundle.model, Workload(workload.size, b, workload.steps))
        self.step_in = {k: v for k, v in self.unet_in.items() if k in STEP_INPUTS}
        self.bound_unet = runners["unet"].bind({k: v for k, v in self.unet_in.items() if k not in STEP_INPUTS},
                                               self.unet_dims)
        self.words, _ = self.pipe.encode_concepts([r.concept for r in self.requests])

    def concept_encoder(self):
        return self.pipe.encode_concepts([r.concept for r in self.requests])

    def text_encoder(self):
        return self.pipe.encode_text(self.requests, self.words)

    def unet_step(self):
        return self.bound_unet(self.step_in)

    def vae_decoder(self):
        return self.pipe.runners["vae_decoder"].run(self.vae_in, self.vae_dims)

    def generate(self, scheduler: str = "lms"):
        return generated(self.name, self.pipe(self.requests, self.workload.settings(scheduler)))

    def bare_unet(self) -> Callable[[], object] | None:
        """The UNet session alone on inputs bound once (ONNX Runtime): the graph time without the runtime."""
        runner = self.pipe.runners["unet"]
        if not hasattr(runner, "session"):
            return None
        binding = runner.session.io_binding()
        for name, a in self.unet_in.items():
            binding.bind_cpu_input(name, a)
        for name, buf in runner.output_buffers(self.unet_dims).items():
            binding.bind_output(name, "cpu", 0, buf.dtype, buf.shape, buf.ctypes.data)
        return lambda: runner.session.run_with_iobinding(binding)

    def __exit__(self, *exc) -> None:
        for runner in self.pipe.runners.values():
            runner.close()
