"""The four graphs as torch modules over the reference's models, with the specs' I/O names."""
from __future__ import annotations

import torch
from torch import nn

from elite_export.checkpoints import EliteModels
from elite_export.mappers import clip_features
from elite_export.pipeline import VAE_SCALE
from elite_export.specs import ModelDims


class ConceptEncoderGraph(nn.Module):
    """(image, object_image [B,3,224,224], mask [B,P]) -> (words [B,5,D], local_tokens [B,P,D])."""

    def __init__(self, models: EliteModels):
        super().__init__()
        self.vision, self.global_mapper, self.local_mapper = models.vision, models.global_mapper, models.local_mapper

    def forward(self, image, object_image, mask):
        B = image.shape[0]
        feats = clip_features(self.vision, torch.cat([image, object_image]))  # 5 x [2B,1+P,Dv]: one pass
        words = self.global_mapper([f[:B] for f in feats])  # [B,5,D]
        if self.local_mapper is None:  # a global-only bundle: no local branch to feed
            return words, torch.zeros(B, mask.shape[1], words.shape[2], dtype=words.dtype, device=words.device)
        local = self.local_mapper([f[B:] for f in feats]) * mask.unsqueeze(-1)  # [B,P,D]
        return words, local


class TextEncoderGraph(nn.Module):
    """(input_ids [B,77], words [B,NC,K,D], placeholder_index [B,NC]) -> text_embeddings [B,77,D]."""

    def __init__(self, models: EliteModels):
        super().__init__()
        self.text_encoder = models.text_encoder

    def forward(self, input_ids, words, placeholder_index):
        return self.text_encoder(input_ids, words, placeholder_index)


class UnetGraph(nn.Module):
    """One denoising call on N = 2R rows [uncond; cond] -> noise_pred [N,C,h,w]; local_tokens [R,NC,P,D],
    placeholder_index and lam [R,NC] for the R conditional rows (attention.EliteCrossAttnProcessor: the
    local branch covers the last R rows; the unconditional rows have none)."""

    def __init__(self, models: EliteModels):
        super().__init__()
        self.unet = models.unet

    def forward(self, latents, timestep, text_embeddings, local_tokens, placeholder_index, lam):
        kwargs = {"elite_local": local_tokens, "elite_index": placeholder_index, "elite_lambda": lam}
        return self.unet(latents, timestep, encoder_hidden_states=text_embeddings,
                         cross_attention_kwargs=kwargs).sample


class VaeDecoderGraph(nn.Module):
    """latents [B,C,h,w] -> image [B,3,8h,8w] in [0, 1] (the 1/0.18215 scale and clamp folded in)."""

    def __init__(self, models: EliteModels):
        super().__init__()
        self.vae = models.vae

    def forward(self, latents):
        return (self.vae.decode(latents / VAE_SCALE).sample / 2 + 0.5).clamp(0, 1)


GRAPH_MODULES: dict[str, type[nn.Module]] = {
    "concept_encoder": ConceptEncoderGraph, "text_encoder": TextEncoderGraph,
    "unet": UnetGraph, "vae_decoder": VaeDecoderGraph}


def graph_module(name: str, models: EliteModels) -> nn.Module:
    return GRAPH_MODULES[name](models).eval()


def model_dims(models: EliteModels) -> ModelDims:
    """ModelDims from the loaded configs."""
    vcfg, ucfg, vae_cfg = models.vision.config, models.unet.config, models.vae.config
    text_pos = models.text_encoder.embeddings.position_embedding.weight.shape[0]
    return ModelDims(text_dim=models.text_dim, latent_channels=ucfg.in_channels, tokens=text_pos,
                     patches=(vcfg.image_size // vcfg.patch_size) ** 2, image_size=vcfg.image_size,
                     vae_factor=2 ** (len(vae_cfg.block_out_channels) - 1),
                     latent_multiple=max(8, 2 ** (len(ucfg.block_out_channels) - 1)))
