"""ELITE's cross-attention as the PyTorch custom op `elite::cross_attention`, for C concepts.

    out_g, out_l, m = elite_cross_attention_op(q, k, v, k_l, v_l, idx)
    # the same as torch.ops.elite.cross_attention(q, k, v, k_l, v_l, idx)

q [B,H,Nq,d]; k, v [B,H,Nk,d] (text keys); k_l, v_l [B,C,H,Nl,d] (each concept's local tokens);
idx [B,C] int32/int64, the position of concept c's (first) word in sample b's text. out_g
[B,H,Nq,d] and out_l [B,C,H,Nq,d] in q's dtype, m [B,C,H,Nq] fp32 (m[b,c] = the global softmax's
column idx[b,c]). ELITE's output is then combine_elite_output(out_g, out_l, m, lam), lam [B,C].

CUDA tensors run the Triton kernel (attention_kernel.py, imported on first use so this module needs
only torch); other devices run reference_cross_attention. The fake implementation gives
torch.export / ONNX export the output shapes and dtypes.
"""
from __future__ import annotations

import torch

OP_NAME = "elite::cross_attention"


def reference_cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_l: torch.Tensor, v_l: torch.Tensor,
    idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The formula, spelled out in fp32: the independent expectation for the kernel."""
    scale = q.shape[-1] ** -0.5
    q32, k32, v32, kl32, vl32 = (t.float() for t in (q, k, v, k_l, v_l))
    probs = torch.softmax(q32 @ k32.transpose(-1, -2) * scale, dim=-1)  # [B,H,Nq,Nk]
    probs_l = torch.softmax(q32.unsqueeze(1) @ kl32.transpose(-1, -2) * scale, dim=-1)  # [B,C,H,Nq,Nl]
    out_g = probs @ v32  # [B,H,Nq,d]
    out_l = probs_l @ vl32  # [B,C,H,Nq,d]
    batch = torch.arange(q.shape[0], device=q.device).unsqueeze(1)  # [B,1]
    m = probs.permute(0, 3, 1, 2)[batch, idx.long()]  # [B,C,H,Nq]: key idx[b,c] of sample b
    return out_g.to(q.dtype), out_l.to(q.dtype), m


class LocalScale(torch.nn.Module):
    """lam_c * m_c / max m_c per sample and concept, in fp32: ELITE's weight on each row of concept
    c's out_l. fp16 m can underflow to 0 and 0/0 is NaN, which lam = 0 would not cancel, hence fp32
    and the tiny floor on the max (kept fp32 in fp16 graphs: export.Fp16Policy names this class).

    m: [B,C,H,Nq] attention paid to each concept's word; lam: [B,C] -> [B,C,H,Nq,1]."""

    def forward(self, m: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        m32 = m.float()
        m_max = m32.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # [B,C,1,1]
        return (lam.float().view(*lam.shape, 1, 1) * m32 / m_max).unsqueeze(-1)


def combine_elite_output(
    out_g: torch.Tensor, out_l: torch.Tensor, m: torch.Tensor, lam: torch.Tensor
) -> torch.Tensor:
    """out_g + sum_c lam[b,c] * (m[b,c] / max_{h,i} m[b,c]) * out_l[b,c], in fp32 (see LocalScale).
    out_g [B,H,Nq,d]; out_l [B,C,H,Nq,d]; m [B,C,H,Nq]; lam [B,C]. Returns [B,H,Nq,d] in out_g's dtype."""
    return (out_g.float() + (LocalScale()(m, lam) * out_l.float()).sum(dim=1)).to(out_g.dtype)


@torch.library.custom_op(OP_NAME, mutates_args=())
def elite_cross_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_l: torch.Tensor, v_l: torch.Tensor,
    idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return reference_cross_attention(q, k, v, k_l, v_l, idx)


@elite_cross_attention_op.register_kernel("cuda")
def _cross_attention_cuda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_l: torch.Tensor, v_l: torch.Tensor,
    idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .attention_kernel import elite_cross_attention

    return elite_cross_attention(q, k, v, k_l, v_l, idx)


@elite_cross_attention_op.register_fake
def _cross_attention_fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_l: torch.Tensor, v_l: torch.Tensor,
    idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, n_queries, head_dim = q.shape
    concepts = k_l.shape[1]
    out_l = q.new_empty((batch, concepts, heads, n_queries, head_dim))
    m = q.new_empty((batch, concepts, heads, n_queries), dtype=torch.float32)
    return torch.empty_like(q), out_l, m
