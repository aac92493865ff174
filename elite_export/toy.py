"""A tiny random ELITE in the released formats, made in code (tests and `make demo` use it).

OUT/sd/             SD 1.x in diffusers format: unet (cross-attention at two resolutions + mid),
                    vae (3 downsamplings, as SD), text_encoder, tokenizer (the real CLIP BPE), scheduler
OUT/image_encoder/  CLIP vision model in transformers format: 224 px, patch 14, 18 layers
OUT/global_mapper.pt, OUT/local_mapper.pt   the authors' key format (mappers + per-attn2 K/V)

Deterministic for a seed. The CLIP BPE vocabulary is not committed: it is read from the
`bpe_simple_vocab_16e6.txt.gz` that clip-anytorch (or open_clip_torch) ships, found without
importing those packages; $ELITE_CLIP_VOCAB overrides.
"""
from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
import shutil
from dataclasses import dataclass, replace

import torch
from torch import nn

from elite_export.errors import EliteError
from elite_export.mappers import GlobalMapper, LocalMapper

TEXT_DIM = VISION_DIM = 32
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes x2 + merges + 2 special tokens = 49408


def find_clip_vocab() -> str:
    env = os.environ.get("ELITE_CLIP_VOCAB")
    if env:
        if not os.path.isfile(env):
            raise EliteError(f"$ELITE_CLIP_VOCAB {env!r} does not exist")
        return env
    for dist in ("clip-anytorch", "open_clip_torch"):
        try:
            files = importlib.metadata.distribution(dist).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in files:
            if f.name == VOCAB_FILE:
                return str(f.locate())
    raise EliteError(f"CLIP's BPE vocabulary ({VOCAB_FILE}) was not found; install it with "
                     "`pip install --no-deps clip-anytorch==2.6.0` (make does) or set $ELITE_CLIP_VOCAB")


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte -> printable unicode symbol table, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_clip_tokenizer(out: str, vocab_gz: str) -> int:
    """The openai/clip-vit-large-patch14 tokenizer files (vocab.json, merges.txt, configs)."""
    merges = gzip.open(vocab_gz).read().decode("utf-8").split("\n")[1:NUM_MERGES + 1]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(out, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}, f)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)
    return len(vocab)


def seeded_init(module: nn.Module, gen: torch.Generator) -> None:
    """Fan-in scaled normal weights, norms near 1, small biases: signal survives every depth."""
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("weight") and p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, device=gen.device) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, device=gen.device))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen, device=gen.device))


def mapper_state(mapper: nn.Module, kv: dict[str, tuple[int, int]], gen: torch.Generator) -> dict:
    """The mapper's state plus `{attn2 path with '.'->'_'}_to_k/_to_v.weight` for every layer."""
    holder = nn.Module()
    holder.add_module("m", mapper)
    for path, (out_f, in_f) in kv.items():
        for w in ("k", "v"):
            holder.add_module(f"{path.replace('.', '_')}_to_{w}", nn.Linear(in_f, out_f, bias=False))
    seeded_init(holder, gen)
    return {k.removeprefix("m."): v.clone() for k, v in holder.state_dict().items()}


@dataclass(frozen=True)
class Architecture:
    """A random ELITE's configs: CLIP text and vision (transformers kwargs), UNet and VAE (diffusers
    kwargs) and the mappers' hidden width. TOY is the tests' tiny one; sd14.SD14 the real sizes."""
    text: dict
    vision: dict
    unet: dict
    vae: dict
    mapper_hidden: int

    @property
    def text_dim(self) -> int:
        return self.text["hidden_size"]

    @property
    def vision_dim(self) -> int:
        return self.vision["hidden_size"]


TOY = Architecture(
    text=dict(hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=TEXT_DIM),
    vision=dict(hidden_size=VISION_DIM, intermediate_size=37, num_hidden_layers=18, num_attention_heads=4,
                image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=TEXT_DIM),
    unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              cross_attention_dim=TEXT_DIM, attention_head_dim=4),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
             block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512),
    mapper_hidden=128)


@dataclass
class RandomElite:
    """The modules of a random ELITE, the mappers as the authors' checkpoint state_dicts."""
    text: nn.Module  # transformers CLIPTextModel
    vision: nn.Module  # transformers CLIPVisionModel
    unet: nn.Module
    vae: nn.Module
    mappers: dict[str, dict]  # {"global_mapper.pt": state_dict, "local_mapper.pt": state_dict}


def random_elite(arch: Architecture, n_vocab: int, seed: int = 0, device: str = "cpu") -> RandomElite:
    """Every module of `arch` with seeded weights, made on `device` (a GPU makes SD sizes in seconds)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    from elite_export.attention import cross_attention_layers

    gen = torch.Generator(device).manual_seed(seed)
    with torch.device(device):
        text = CLIPTextModel(CLIPTextConfig(vocab_size=n_vocab, bos_token_id=49406, eos_token_id=49407,
                                            pad_token_id=49407, **arch.text))
        vision = CLIPVisionModel(CLIPVisionConfig(**arch.vision))
        unet = UNet2DConditionModel(**arch.unet)
        vae = AutoencoderKL(**arch.vae)
    for model in (text, vision, unet, vae):
        seeded_init(model, gen)
    kv = {p: tuple(unet.get_submodule(p).to_k.weight.shape) for p in cross_attention_layers(unet)}
    mappers = {name: mapper_state(cls(arch.vision_dim, arch.text_dim, arch.mapper_hidden), kv, gen)
               for name, cls in (("global_mapper.pt", GlobalMapper), ("local_mapper.pt", LocalMapper))}
    return RandomElite(text.eval(), vision.eval(), unet.eval(), vae.eval(), mappers)


def make_random_elite(out: str, arch: Architecture, seed: int = 0) -> str:
    """Write a random ELITE of `arch` to `out` in the released formats (atomically: built beside it,
    then renamed). Returns `out`."""
    from diffusers import LMSDiscreteScheduler

    from elite_export.checkpoints import quiet_libraries
    from elite_export.runtime.requests import PAPER_SCHEDULER_CONFIG

    quiet_libraries()  # no weight-writing progress bars
    vocab_gz = find_clip_vocab()
    tmp = out.rstrip("/") + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    sd = os.path.join(tmp, "sd")
    n_vocab = write_clip_tokenizer(os.path.join(sd, "tokenizer"), vocab_gz)
    elite = random_elite(arch, n_vocab, seed)
    elite.text.save_pretrained(os.path.join(sd, "text_encoder"))
    elite.unet.save_pretrained(os.path.join(sd, "unet"))
    elite.vae.save_pretrained(os.path.join(sd, "vae"))
    elite.vision.save_pretrained(os.path.join(tmp, "image_encoder"))
    LMSDiscreteScheduler(**PAPER_SCHEDULER_CONFIG).save_config(os.path.join(sd, "scheduler"))
    with open(os.path.join(sd, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline"}, f)
    for name, state in elite.mappers.items():
        torch.save(state, os.path.join(tmp, name))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def make_toy(out: str, seed: int = 0, mapper_hidden: int = 128) -> str:
    """Write the tiny ELITE to `out` (atomically: built beside it, then renamed). Returns `out`."""
    return make_random_elite(out, replace(TOY, mapper_hidden=mapper_hidden), seed)
