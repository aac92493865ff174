"""The single-concept ELITE code as it was before issue 13 (commit d2ba6ef), kept verbatim as the
independent expectation that C = 1 is bit-identical: the cross-attention processor with its local
scale, the word injection, the UNet graph wrapper, and the two graph specs whose inputs had no
concept axis.

Test helper only: nothing in the package imports it.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from elite_export.specs import TensorSpec, TextEncoderSpec, UnetSpec


class LegacyLocalScale(nn.Module):
    """m: [B,H,Nq] attention paid to the placeholder; lam: [B] -> [B,H,Nq,1]."""

    def forward(self, m: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        m32 = m.float()
        m_max = m32.amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return (lam.float().view(-1, 1, 1) * m32 / m_max).unsqueeze(-1)


class LegacyCrossAttnProcessor(nn.Module):
    """attn2 with ELITE's local branch for one concept (the formula path of d2ba6ef)."""

    def __init__(self, to_k_local: nn.Linear, to_v_local: nn.Linear):
        super().__init__()
        self.to_k_local, self.to_v_local = to_k_local, to_v_local
        self.local_scale = LegacyLocalScale()

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 elite_local=None, elite_index=None, elite_lambda=None):
        B, N, _ = hidden_states.shape
        H = attn.heads
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B,L,H*d] -> [B,H,L,d]
            return x.view(B, x.shape[1], H, -1).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(context)), heads(attn.to_v(context))
        local = elite_local is not None
        if local:
            k_l, v_l = heads(self.to_k_local(elite_local)), heads(self.to_v_local(elite_local))
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)  # [B,H,N,77]
        out = probs @ v  # [B,H,N,d]
        if local:
            idx = elite_index.long().view(B, 1, 1, 1).expand(B, H, N, 1)
            p_index = probs.gather(-1, idx).squeeze(-1)  # [B,H,N]
            out_l = (q @ k_l.transpose(-1, -2) * attn.scale).softmax(dim=-1) @ v_l  # [B,H,N,d]
            lam = elite_lambda if elite_lambda is not None else torch.ones(B, device=q.device)
            out = out + (self.local_scale(p_index, lam) * out_l.float()).to(out.dtype)
        out = out.transpose(1, 2).reshape(B, N, -1)  # [B,N,H*d]
        return attn.to_out[1](attn.to_out[0](out))


def install_legacy_attention(unet: nn.Module) -> None:
    """Swap every EliteCrossAttnProcessor of `unet` for the legacy one (same local projections)."""
    from elite_export.attention import EliteCrossAttnProcessor

    unet.set_attn_processor({name: LegacyCrossAttnProcessor(p.to_k_local, p.to_v_local)
                             if isinstance(p, EliteCrossAttnProcessor) else p
                             for name, p in unet.attn_processors.items()})


def legacy_injection_source(length: int, index: torch.Tensor, k: int) -> torch.Tensor:
    """index: [B] placeholder position -> [B,L] positions into the L+K table."""
    pos = torch.arange(length, device=index.device).unsqueeze(0)  # [1,L]
    idx = index.long().unsqueeze(1)  # [B,1]
    from_token = torch.where(pos < idx, pos, pos - k + 1)  # before: same place; after: shifted by K-1
    is_word = (pos >= idx) & (pos < idx + k)
    from_word = length + (pos - idx)
    return torch.where(is_word, from_word, from_token)


class LegacyTextEncoderGraph(nn.Module):
    """(input_ids [B,77], words [B,K,D], placeholder_index [B]) -> text_embeddings [B,77,D], over the
    reference text encoder's own modules."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.te = text_encoder

    def forward(self, input_ids, words, placeholder_index):
        from elite_export.text_injection import causal_mask

        te = self.te
        tokens = te.embeddings.token_embedding(input_ids)  # [B,L,D]
        B, L, D = tokens.shape
        table = torch.cat([tokens, words.to(tokens.dtype)], dim=1)  # [B,L+K,D]
        src = legacy_injection_source(L, placeholder_index, words.shape[1])
        x = table.gather(1, src.unsqueeze(-1).expand(B, L, D)) + te.embeddings.position_embedding.weight[:L].unsqueeze(0)
        mask = causal_mask(L, x.dtype, x.device)
        return te.final_layer_norm(te.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state)


class LegacyUnetGraph(nn.Module):
    """The pre-issue-13 UNet graph: every row's ELITE inputs passed to the processors (lam 0 on uncond)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, latents, timestep, text_embeddings, local_tokens, placeholder_index, lam):
        kwargs = {"elite_local": local_tokens, "elite_index": placeholder_index, "elite_lambda": lam}
        return self.unet(latents, timestep, encoder_hidden_states=text_embeddings,
                         cross_attention_kwargs=kwargs).sample


class LegacyTextEncoderSpec(TextEncoderSpec):
    inputs = (TensorSpec("input_ids", ("B", "T"), "int64"), TensorSpec("words", ("B", "K", "D")),
              TensorSpec("placeholder_index", ("B",), "int64"))

    def sample(self, t, shape, rng):
        if t.name == "placeholder_index":
            return rng.integers(1, 11, shape).astype(np.int64)
        return super().sample(t, shape, rng)


class LegacyUnetSpec(UnetSpec):
    inputs = (TensorSpec("latents", ("B", "C", "h", "w")), TensorSpec("timestep", ("B",)),
              TensorSpec("text_embeddings", ("B", "T", "D")), TensorSpec("local_tokens", ("B", "P", "D")),
              TensorSpec("placeholder_index", ("B",), "int64"), TensorSpec("lam", ("B",)))

    def sample(self, t, shape, rng):
        if t.name == "lam":  # first half unconditional
            lam = np.full(shape, 0.8, dtype=np.float32)
            lam[: shape[0] // 2] = 0.0
            return lam
        return super().sample(t, shape, rng)
