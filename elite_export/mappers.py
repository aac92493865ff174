"""ELITE's global and local mappers, with the authors' parameter names.

The released `global_mapper.pt` / `local_mapper.pt` hold these modules' state (`mapping_{i}.*`,
`mapping_patch_{i}.*`, i = 0..4) plus, per UNet cross-attention layer, the K/V projections
(`{layer path with '.'->'_'}_to_k.weight`, `_to_v.weight`), which `checkpoints.py` splits off.
"""
from __future__ import annotations

import torch
from torch import nn

NUM_LAYERS = 5  # features taken from CLIP: last_hidden_state, hidden_states[4, 8, 12, 16]
FEATURE_LAYERS = (4, 8, 12, 16)


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
        nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
        nn.Linear(hidden, d_out),
    )


class _Mapper(nn.Module):
    def __init__(self, d_in: int, d_out: int, hidden: int = 1024):
        super().__init__()
        self.d_in, self.d_out, self.hidden = d_in, d_out, hidden
        for i in range(NUM_LAYERS):
            self.add_module(f"mapping_{i}", _mlp(d_in, hidden, d_out))
            self.add_module(f"mapping_patch_{i}", _mlp(d_in, hidden, d_out))

    def _branches(self, i: int) -> tuple[nn.Module, nn.Module]:
        return getattr(self, f"mapping_{i}"), getattr(self, f"mapping_patch_{i}")


class GlobalMapper(_Mapper):
    """Five CLIP feature maps -> five words: mapping_i(cls) + mean(mapping_patch_i(patches))."""

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:  # 5 x [B,1+P,Din] -> [B,5,Dout]
        words = []
        for i, f in enumerate(feats):
            cls_map, patch_map = self._branches(i)
            words.append(cls_map(f[:, :1]) + patch_map(f[:, 1:]).mean(dim=1, keepdim=True))  # [B,1,Dout]
        return torch.cat(words, dim=1)


class LocalMapper(_Mapper):
    """Five CLIP feature maps of the object image -> one token per patch, averaged over layers."""

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:  # 5 x [B,1+P,Din] -> [B,P,Dout]
        per_layer = []
        for i, f in enumerate(feats):
            cls_map, patch_map = self._branches(i)
            per_layer.append(cls_map(f[:, :1]) + patch_map(f[:, 1:]))  # [B,P,Dout]
        return torch.stack(per_layer, dim=0).mean(dim=0)


def clip_features(vision_model: nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """The five feature maps ELITE reads: [last_hidden_state (before post-layernorm), hs[4,8,12,16]]."""
    out = vision_model(pixel_values=pixels, output_hidden_states=True)
    return [out.last_hidden_state] + [out.hidden_states[i] for i in FEATURE_LAYERS]  # 5 x [B,1+P,Dv]
