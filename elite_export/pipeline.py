"""The PyTorch reference of ELITE inference (DESIGN.md steps 1-8), batched, with several concepts.

Each request (concepts, prompt, seed, mode, words, lambdas) is one row; the rows of a batch share
the scheduler, step count and size, and are independent of each other: noise is drawn per row
from its own seed, the attention max is per sample and concept, rows with fewer concepts are padded
with absent ones (runtime/composition.py), and classifier-free guidance runs as one UNet call on
[uncond rows; cond rows], the local branch on the conditional rows only (ELITE's lambda 0 on the
unconditional ones). Concept c's words are
injected at the prompt's c-th placeholder and its local branch reads the attention paid to them
(elite_export/attention.py has the formula).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from elite_export.checkpoints import EliteModels
from elite_export.errors import EliteError
from elite_export.mappers import clip_features
from elite_export.runtime.composition import layout
from elite_export.runtime.preprocess import ConceptInputs
from elite_export.runtime.prompt import DEFAULT_PLACEHOLDERS, PromptTokenizer
from elite_export.runtime.requests import GenerationResult, GenerationSettings, Request, validate_requests
from elite_export.runtime.timing import StageTimer
from elite_export.schedulers import make_diffusers_scheduler

VAE_SCALE = 0.18215


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The authors' draw: torch.randn on the CPU, fp32, from a generator seeded with `seed`."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def finite(x: torch.Tensor) -> np.ndarray:
    """[B,...] -> bool [B]: which rows hold no NaN or inf."""
    return torch.isfinite(x).flatten(1).all(1).cpu().numpy()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] in [-1,1] -> uint8 [B,H,W,3], as the authors' th2image: (x/2+0.5).clamp(0,1)*255, round."""
    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return (x * 255).round().astype(np.uint8)


class ElitePipeline:
    def __init__(self, models: EliteModels, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 placeholders: str | tuple[str, ...] = DEFAULT_PLACEHOLDERS):
        if dtype == torch.float16 and not str(device).startswith("cuda"):
            raise EliteError("fp16 needs a CUDA device; use --dtype fp32 on the CPU")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise EliteError("--dtype fp16 needs a CUDA device and none is available; use --dtype fp32")
        self.models = models.to(device, dtype)
        self.device, self.dtype = torch.device(device), dtype
        self.tokenizer = PromptTokenizer(models.tokenizer.backend_tokenizer, placeholders)
        vae_blocks = len(models.vae.config.block_out_channels)
        self.vae_factor = 2 ** (vae_blocks - 1)
        self.timer = StageTimer()

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, self.dtype)

    @torch.no_grad()
    def encode_concepts(self, concepts: list[ConceptInputs]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> words [B,5,D], local tokens [B,256,D] (masked; None without a local mapper)."""
        m = self.models
        pixels = self._tensor(np.stack([c.pixels for c in concepts]))  # [B,3,224,224]
        words = m.global_mapper(clip_features(m.vision, pixels))
        if m.local_mapper is None:
            return words, None
        obj = self._tensor(np.stack([c.object_pixels for c in concepts]))
        mask = self._tensor(np.stack([c.mask for c in concepts]))  # [B,256]
        return words, m.local_mapper(clip_features(m.vision, obj)) * mask.unsqueeze(-1)

    @torch.no_grad()
    def encode_text(self, prompts: list[str], words: torch.Tensor | None,
                    index: torch.Tensor | None = None) -> torch.Tensor:
        """prompts with each concept's words injected at its placeholder -> [B,77,D].

        words: [B,C,K,D] (or [B,K,D]: one concept); None: no injection. index: [B,C] placeholder
        indices (77: absent); by default read from the prompts, every concept's placeholder present."""
        ids = torch.from_numpy(np.stack([self.tokenizer.ids(p) for p in prompts])).to(self.device)  # int64: not
        # through self.dtype, where fp16 would round token 49406 to 49408
        if words is None:
            return self.models.text_encoder(ids)
        if index is None:
            n = 1 if words.dim() == 3 else words.shape[1]
            index = torch.tensor([self.tokenizer.placeholder_indices(p, n) for p in prompts])
        return self.models.text_encoder(ids, words, index.to(self.device))

    @torch.no_grad()
    def unet_step(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, local: torch.Tensor | None,
                  index: torch.Tensor | None, lam: torch.Tensor | None) -> torch.Tensor:
        """One UNet call on N rows: latents [N,4,h,w], t [N], text [N,77,D]; local [R,C,P,D], index/lam [R,C]
        for the last R <= N rows (index: each concept's first word in the text; None: no local branch)."""
        kwargs = {"elite_local": local, "elite_index": index, "elite_lambda": lam}
        with self.timer.stage("unet"):
            return self.models.unet(latents, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample

    @torch.no_grad()
    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, text2: torch.Tensor, local: torch.Tensor,
                      index: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_uncond, eps_cond) [B,4,h,w] for latents x [B,4,h,w] at scalar timestep t: one UNet call on
        [uncond; cond] rows (text2: 2B rows in that order); local [B,C,P,D], index/lam [B,C] for the
        conditional rows (the unconditional ones have no local branch)."""
        t2 = t.to(self.device, torch.float32).expand(2 * x.shape[0])
        return self.unet_step(torch.cat([x, x]), t2, text2, local, index, lam).chunk(2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self.timer.stage("vae_decoder"):
            return self.models.vae.decode(latents / VAE_SCALE).sample

    @torch.no_grad()
    def conditioning(self, requests: list[Request], result: GenerationResult | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> text [B,77,D] (cond), local [B,C,P,D], word index [B,C], lambda [B,C] (C: the most concepts
        of any request; the others padded with absent concepts); rows whose words, local tokens or text
        come out NaN/inf are marked failed in `result`."""
        if any(r.mode == "local" for r in requests) and self.models.local_mapper is None:
            raise EliteError("local mode needs --local-mapper; give it or use --mode global")
        lay = layout(requests, self.tokenizer)  # user errors before any model runs
        if not all(isinstance(c, ConceptInputs) for c in lay.concepts):
            raise EliteError("the PyTorch reference takes concept images (--image/--mask), not .concept files")
        with self.timer.stage("concept_encoder"):
            words, local = self.encode_concepts(lay.concepts)  # [n,5,D], [n,P,D] | None
        if local is None:
            local = torch.zeros(words.shape[0], len(lay.concepts[0].mask), words.shape[2],
                                device=self.device, dtype=self.dtype)
        rows = torch.from_numpy(np.maximum(lay.rows, 0)).to(self.device)  # [B,C]
        present = torch.from_numpy(lay.rows >= 0).to(self.device).view(*rows.shape, 1, 1).to(self.dtype)
        words, local = words[rows] * present, local[rows] * present  # [B,C,5,D], [B,C,P,D]: 0 where absent
        text_index = torch.from_numpy(lay.text_index).to(self.device)
        text = torch.empty(len(requests), self.tokenizer.max_length, words.shape[-1], device=self.device,
                           dtype=self.dtype)
        rows_by_slice: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(requests):
            rows_by_slice.setdefault(r.words_slice, []).append(i)
        for (lo, hi), group in rows_by_slice.items():  # one text-encoder call per number of words K
            with self.timer.stage("text_encoder"):
                text[group] = self.encode_text([requests[i].prompt for i in group], words[group, :, lo:hi],
                                               text_index[group])
        if result is not None:
            result.fail(finite(words) & finite(local), "concept encoder: NaN/inf in the words or local tokens")
            result.fail(finite(text), "text encoder: NaN/inf in the text embeddings")
        index = torch.from_numpy(lay.word_index).to(self.device)
        lam = torch.from_numpy(lay.lam).to(self.device)
        return text, local, index, lam

    @torch.no_grad()
    def __call__(self, requests: list[Request], settings: GenerationSettings,
                 on_step: Callable[[int, int], None] | None = None, validate: bool = True) -> GenerationResult:
        """-> an image per request, and per request None or why it failed (the runtime's contract)."""
        if validate:
            settings.validate()
            validate_requests(requests)
        B = len(requests)
        t_start = time.perf_counter()
        h, w = settings.height // self.vae_factor, settings.width // self.vae_factor
        result = GenerationResult(np.zeros((B, settings.height, settings.width, 3), np.uint8), [None] * B)
        text, local, index, lam = self.conditioning(requests, result)
        uncond = self.encode_text([""], None).expand(B, -1, -1)
        text2 = torch.cat([uncond, text])
        scheduler = make_diffusers_scheduler(settings.scheduler, settings.scheduler_config)
        scheduler.set_timesteps(settings.steps)
        in_ch = self.models.unet.config.in_channels
        noise = torch.cat([initial_noise(r.seed, (1, in_ch, h, w)) for r in requests])
        latents = (noise * scheduler.init_noise_sigma).to(self.device, self.dtype)
        for i, t in enumerate(scheduler.timesteps):
            if result.all_failed:
                break
            x = scheduler.scale_model_input(latents, t)
            eps_u, eps_c = self.predict_noise(x, t, text2, local, index, lam)
            eps = eps_u + settings.guidance * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents).prev_sample
            ok = finite(latents)
            if not ok.all():
                where = f"step {i + 1} of {settings.steps}"
                result.fail(finite(eps_u) & finite(eps_c), f"UNet, {where}: NaN/inf in the noise prediction")
                result.fail(ok, f"scheduler, {where}: NaN/inf in the latents")
            if on_step is not None:
                on_step(i + 1, settings.steps)
        if not result.all_failed:
            decoded = self.decode(latents)
            result.fail(finite(decoded), "VAE decoder: NaN/inf in the image")
            good = [i for i, e in enumerate(result.errors) if e is None]
            result.images[good] = to_uint8(decoded[good])
        self.timer.add("total", time.perf_counter() - t_start)
        return result
