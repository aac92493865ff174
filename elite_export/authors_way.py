"""The authors' inference loop, for benchmarks: the cost of ELITE as released (same semantics).

Their inference (train_local.validation) makes two UNet calls per step, each unbatched: the
conditional one with the local branch and the unconditional one without it. Their replacement
`CrossAttention.__call__` computes every attention, self-attention included, as explicit
`softmax(q k^T * scale) v` matmuls. Outputs equal the reference's (the per-sample max is the batch
max for one request); only the cost differs.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from elite_export.attention import SelfAttnProcessor
from elite_export.pipeline import ElitePipeline


class FormulaSelfAttnProcessor(SelfAttnProcessor):
    """attn1 as the authors compute it: explicit matmuls and softmax, no fused SDPA kernel."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 elite_local=None, elite_index=None, elite_lambda=None):
        B, N, _ = hidden_states.shape  # [B,N,C]

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B,N,H*d] -> [B,H,N,d]
            return x.view(B, N, attn.heads, -1).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        out = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1) @ v  # [B,H,N,d]
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(B, N, -1)))


@contextmanager
def formula_self_attention(unet: nn.Module):
    """Every attn1 computed as the authors do while inside; the previous processors restored after."""
    before = unet.attn_processors
    unet.set_attn_processor({name: FormulaSelfAttnProcessor() if ".attn1." in name else p
                             for name, p in before.items()})
    try:
        yield unet
    finally:
        unet.set_attn_processor(before)


class AuthorsPipeline(ElitePipeline):
    """The reference with the authors' two unbatched UNet calls per step (use inside
    formula_self_attention(models.unet) for their self-attention too)."""

    @torch.no_grad()
    def predict_noise(self, x, t, text2, local, index, lam):
        B = x.shape[0]
        t1 = t.to(self.device, torch.float32).expand(B)
        eps_c = self.unet_step(x, t1, text2[B:], local, index, lam)
        eps_u = self.unet_step(x, t1, text2[:B], None, None, None)  # no local branch
        return eps_u, eps_c
