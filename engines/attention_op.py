"""ELITE's cross-attention as the PyTorch custom op `elite::cross_attention`.

    out_g, out_l, m = elite_cross_attention_op(q, k, v, k_l, v_l, idx)
    # the same as torch.ops.elite.cross_attention(q, k, v, k_l, v_l, idx)

q [B,H,Nq,d]; k, v [B,H,Nk,d] (text keys); k_l, v_l [B,H,Nl,d] (local tokens); idx [B] int32/int64,
the placeholder token's position per sample. out_g, out_l [B,H,Nq,d] in q's dtype, m [B,H,Nq] fp32.
ELITE's output is then combine_elite_output(out_g, out_l, m, lam).

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
    probs_l = torch.softmax(q32 @ kl32.transpose(-1, -2) * scale, dim=-1)  # [B,H,Nq,Nl]
    out_g = probs @ v32  # [B,H,Nq,d]
    out_l = probs_l @ vl32  # [B,H,Nq,d]
    batch = torch.arange(q.shape[0], device=q.device)
    m = probs[batch, :, :, idx.long()]  # [B,H,Nq]: key idx[b] of sample b
    return out_g.to(q.dtype), out_l.to(q.dtype), m


class LocalScale(torch.nn.Module):
    """lam * m / max m per sample, in fp32: ELITE's weight on each row of out_l. fp16 m can underflow
    to 0 and 0/0 is NaN, which lam = 0 would not cancel, hence fp32 and the tiny floor on the max
    (kept fp32 in fp16 graphs: export.Fp16Policy names this class).

    m: [B,H,Nq] attention paid to the placeholder; lam: [B] -> [B,H,Nq,1]."""

    def forward(self, m: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        m32 = m.float()
        m_max = m32.amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return (lam.float().view(-1, 1, 1) * m32 / m_max).unsqueeze(-1)


def combine_elite_output(
    out_g: torch.Tensor, out_l: torch.Tensor, m: torch.Tensor, lam: torch.Tensor
) -> torch.Tensor:
    """out_g + lam[b] * (m / max_{h,i} m[b]) * out_l, in fp32 (see LocalScale).
    out_g, out_l [B,H,Nq,d]; m [B,H,Nq]; lam [B]. Returns [B,H,Nq,d] in out_g's dtype."""
    return (out_g.float() + LocalScale()(m, lam) * out_l.float()).to(out_g.dtype)


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
    batch, heads, n_queries, _ = q.shape
    m = q.new_empty((batch, heads, n_queries), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(q), m
