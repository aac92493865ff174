"""A random ELITE of the real sizes: Stable Diffusion 1.4's UNet (860M) and VAE, CLIP ViT-L/14's text
and vision towers, the authors' 1024-wide mappers. Made in code (nothing is downloaded), for benchmarks.

    make_sd14(out)             written once in the released formats (the normal loading path reads it)
    random_sd14_models(...)    made directly in memory on a device (a GPU: seconds; no files, no export)
"""
from __future__ import annotations

import os
import tempfile

import torch

from elite_export.toy import Architecture, find_clip_vocab, make_random_elite, random_elite, write_clip_tokenizer

SD14 = Architecture(
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768),
    unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
              block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
             block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512),
    mapper_hidden=1024)


def default_cache() -> str:
    return os.environ.get("ELITE_BENCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "elite-export"))


def make_sd14(out: str, seed: int = 0) -> str:
    """The random SD 1.4-size ELITE in the released formats at `out` (written once; ~5 GB). Returns `out`."""
    if not os.path.isfile(os.path.join(out, "local_mapper.pt")):  # written last, after an atomic rename
        make_random_elite(out, SD14, seed)
    return out


def random_sd14_models(device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """EliteModels of the SD 1.4-size random ELITE made in memory on `device` (the real tokenizer)."""
    from transformers import CLIPTokenizer

    from elite_export.checkpoints import assemble_models, quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        n_vocab = write_clip_tokenizer(tmp, find_clip_vocab())
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    elite = random_elite(SD14, n_vocab, seed, device)
    models = assemble_models(elite.unet, elite.vae, elite.text, tokenizer, elite.vision,
                             elite.mappers["global_mapper.pt"], elite.mappers["local_mapper.pt"], None)
    return models.to(device, dtype)
