"""ELITE's cross-attention as diffusers attention processors (installed with set_attn_processor).

Every `attn2` gets an `EliteCrossAttnProcessor`; its K/V projections are the global mapper's
trained `to_k`/`to_v` (written into `attn2.to_k/to_v`, so conditional and unconditional rows use
them alike). A row b may carry C concepts, each with its own masked local tokens, the position
idx[b,c] of its (first) word in the text, and its own weight lam[b,c]. With P = softmax(q k^T s)
over the text and P_l,c = softmax(q k_l,c^T s) over concept c's local tokens:

    out = P v + sum_c lam[b,c] * (m_c / max_{heads,queries} m_c) * (P_l,c v_l,c),   m_c = P[..., idx[b,c]]

Each max is taken per sample and concept (the authors, with one concept, take it over the whole
batch tensor: identical for one request, and per sample keeps batched rows independent). m and its
max are fp32: in fp16 m can underflow to 0 and 0/0 is NaN, which lam = 0 would not cancel. With
C = 1 this is the single-concept formula op for op; a concept with lam = 0 adds exactly 0 (padding
rows of fewer concepts, unconditional rows).

The ELITE inputs travel as `cross_attention_kwargs`: elite_local [R,C,P,D], elite_index [R,C],
elite_lambda [R,C] (or [R,P,D], [R], [R] for one concept) for the last R <= B rows of the batch;
the rows before them get no local branch, exactly as with lambdas 0 (the UNet graph and the
pipeline pass the conditional half of [uncond; cond]: ELITE's unconditional pass has no local
branch, so it is not computed). Every
`attn1` gets `SelfAttnProcessor`, the stock SDPA self-attention that accepts (and ignores) them.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from elite_export.engines.attention_op import LocalScale

ATTENTION_IMPLS = ("formula", "plugin")


class EliteCrossAttnProcessor(nn.Module):
    """attn2 with ELITE's local branch. Holds the local K/V projections (the local mapper's)."""

    def __init__(self, to_k_local: nn.Linear, to_v_local: nn.Linear, attention: str = "formula"):
        super().__init__()
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
        self.to_k_local, self.to_v_local, self.attention = to_k_local, to_v_local, attention
        self.local_scale = LocalScale()

    def __call__(  # noqa: D102 - diffusers calls processors directly; the signature names the kwargs it passes
        self,
        attn: Attention,
        hidden_states: torch.Tensor,  # [B,N,Cq]
        encoder_hidden_states: torch.Tensor | None = None,  # [B,77,D]
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        elite_local: torch.Tensor | None = None,  # [R,C,P,D] each concept's local tokens (masked)
        elite_index: torch.Tensor | None = None,  # [R,C] position of each concept's word in the text
        elite_lambda: torch.Tensor | None = None,  # [R,C] local weights
    ) -> torch.Tensor:
        B, N, _ = hidden_states.shape
        H = attn.heads
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states

        def heads(x: torch.Tensor) -> torch.Tensor:  # [R,L,H*d] -> [R,H,L,d]
            return x.view(x.shape[0], x.shape[1], H, -1).transpose(1, 2)

        q3 = attn.to_q(hidden_states)  # [B,N,H*d]
        q, k, v = heads(q3), heads(attn.to_k(context)), heads(attn.to_v(context))
        local = elite_local is not None
        if local:  # the local branch covers the last R of the B rows (R < B: the rows before have none)
            elite_local, elite_index, lam = concept_axis(elite_local, elite_index, elite_lambda)
            R, C = elite_local.shape[:2]
            first = B - R
        if local and self.attention == "plugin":
            from elite_export.engines.attention_op import elite_cross_attention_op

            def heads5(x: torch.Tensor) -> torch.Tensor:  # [B,C,P,H*d] -> [B,C,H,P,d]
                return x.view(B, C, x.shape[2], H, -1).transpose(2, 3)

            elite_local, elite_index, lam = (pad_rows(t, first) for t in (elite_local, elite_index, lam))  # lam 0
            k_l, v_l = heads5(self.to_k_local(elite_local)), heads5(self.to_v_local(elite_local))
            out, out_l, m = elite_cross_attention_op(q, k, v, k_l, v_l, elite_index.to(torch.int32))
            first = 0
        else:
            probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)  # [B,H,N,77]
            out = probs @ v  # [B,H,N,d]
            if local:
                idx = elite_index.long().view(R, 1, 1, C).expand(R, H, N, C)
                m = probs[first:].gather(-1, idx).permute(0, 3, 1, 2)  # [R,C,H,N]
                # (row, concept) pairs as the rows of one attention: q of row first+r for each of its C concepts
                rows = first + torch.arange(R, device=q3.device).unsqueeze(1).expand(R, C).reshape(R * C)
                local3 = elite_local.reshape(R * C, elite_local.shape[2], elite_local.shape[3])  # [R*C,P,D]
                q_l, k_l, v_l = heads(q3[rows]), heads(self.to_k_local(local3)), heads(self.to_v_local(local3))
                out_l = (q_l @ k_l.transpose(-1, -2) * attn.scale).softmax(dim=-1) @ v_l  # [R*C,H,N,d]
                out_l = out_l.view(R, C, H, N, -1)  # [R,C,H,N,d]
        if local:
            add = (self.local_scale(m, lam) * out_l.float()).sum(dim=1).to(out.dtype)  # fp32 products and sum
            out = torch.cat([out[:first], out[first:] + add])  # [B,H,N,d]
        out = out.transpose(1, 2).reshape(B, N, -1)  # [B,N,H*d]
        return attn.to_out[1](attn.to_out[0](out))


def pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """n rows of zeros before x's rows."""
    return torch.cat([x.new_zeros((n, *x.shape[1:])), x])


def concept_axis(local: torch.Tensor, index: torch.Tensor, lam: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ELITE kwargs with a concept axis: one concept ([B,P,D], [B], [B]) becomes C = 1
    ([B,1,P,D], [B,1], [B,1]); no lambda means 1 for every concept."""
    if local.dim() == 3:
        local, index = local.unsqueeze(1), index.view(-1, 1)
        lam = None if lam is None else lam.view(-1, 1)
    if lam is None:
        lam = torch.ones(local.shape[:2], device=local.device)
    return local, index, lam


class SelfAttnProcessor(AttnProcessor2_0):
    """The stock attn1 (SDPA), naming the ELITE kwargs so diffusers passes them without warnings."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 elite_local=None, elite_index=None, elite_lambda=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Module paths of every attn2 (ELITE's layers), in UNet order."""
    return [name for name, mod in unet.named_modules() if isinstance(mod, Attention) and name.endswith("attn2")]


def install_elite_attention(unet: nn.Module, global_kv: dict[str, tuple[torch.Tensor, torch.Tensor]],
                            local_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
                            attention: str = "formula") -> None:
    """Write the global K/V into every attn2 and install ELITE's processors.

    global_kv / local_kv: {attn2 module path: (to_k weight [inner, D], to_v weight [inner, D])}.
    Without local_kv (global mode only) the local branch gets zero projections and must run with lam = 0.
    """
    processors = {}
    for name in unet.attn_processors:  # "...attn1.processor" / "...attn2.processor"
        path = name.rsplit(".processor", 1)[0]
        if not path.endswith("attn2"):
            processors[name] = SelfAttnProcessor()
            continue
        attn = unet.get_submodule(path)
        with torch.no_grad():
            attn.to_k.weight.copy_(global_kv[path][0])
            attn.to_v.weight.copy_(global_kv[path][1])
        k_l = nn.Linear(attn.to_k.in_features, attn.to_k.out_features, bias=False)
        v_l = nn.Linear(attn.to_v.in_features, attn.to_v.out_features, bias=False)
        with torch.no_grad():
            if local_kv is None:
                k_l.weight.zero_(), v_l.weight.zero_()
            else:
                k_l.weight.copy_(local_kv[path][0]), v_l.weight.copy_(local_kv[path][1])
        processors[name] = EliteCrossAttnProcessor(k_l, v_l, attention).to(attn.to_k.weight)
    unet.set_attn_processor(processors)

