"""Triton kernel for ELITE's cross-attention (every attn2 of the SD UNet), every branch at once.

Per sample b, head h, query i and concept c (scale = d**-0.5, fp32 accumulation):
    out_g      = softmax(q k^T * scale) v                over the Nk text keys    (global branch)
    out_l[c]   = softmax(q k_l[c]^T * scale) v_l[c]      over concept c's Nl local tokens
    m[c]       = softmax(q k^T * scale)[idx[b, c]]       what query i pays to concept c's word
The ELITE mixing (out_g + sum_c lambda_c * m_c / max m_c * out_l[c]) stays outside, in ordinary ops.

One program handles one (sample, head) pair and BLOCK_M queries: the text keys stream through an
online softmax in blocks of BLOCK_N once, m[c] is read off its final max and sum (the score of key
idx[b, c] recomputed), then each concept's local tokens stream the same way (q loaded once). Head dims that are not powers of two (40/80/160 in SD 1.4)
are padded to D_PAD with masks. Scores are kept in log2 units (scale * log2 e) so exp2 can be used.

The runtime arguments are ordered (input pointers, int32 scalars, output pointers): that is the
calling convention of TensorRT's AOT plugins, so the same kernel serves the PyTorch launcher
below and the TensorRT plugin (attention_plugin_trt.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.float32)
SCALAR_NAMES = ("n_heads", "n_queries", "n_keys", "n_local", "n_concepts")  # the kernel's int32 arguments


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # queries per program
    block_n: int  # keys per online-softmax step
    num_warps: int
    num_stages: int


def padded_head_dim(head_dim: int) -> int:
    """Next power of two, at least 16 (the smallest tl.dot operand size)."""
    return max(16, triton.next_power_of_2(head_dim))


def default_config(head_dim: int) -> KernelConfig:
    """Block sizes by padded head dim: the fastest of a 24-config sweep on SD 1.4's shapes
    (H200, triton 3.6; scripts/gpu_attention_bench.py --sweep). Shared memory: 48/80/84 KiB."""
    d_pad = padded_head_dim(head_dim)
    if d_pad <= 64:
        return KernelConfig(block_m=128, block_n=64, num_warps=4, num_stages=2)
    if d_pad <= 128:
        return KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
    return KernelConfig(block_m=32, block_n=64, num_warps=4, num_stages=2)


def constexprs(head_dim: int, dtype_is_fp32: bool, config: KernelConfig) -> dict[str, object]:
    """The compile-time arguments of the kernel for one head dim, dtype and config."""
    return {
        "HEAD_DIM": head_dim,
        "D_PAD": padded_head_dim(head_dim),
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "QK_SCALE": head_dim**-0.5 * math.log2(math.e),
        # fp32: exact fp32 products (tf32 would cost ~1e-3 relative error); fp16: tensor cores
        "DOT_PRECISION": "ieee" if dtype_is_fp32 else "tf32",
    }


@triton.jit
def _attend(q, k_ptr, v_ptr, n_keys, offs_d, d_mask,
            QK_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """softmax(q k^T) v for one (sample, head) and BLOCK_M queries, with the softmax's running max
    (log2 units) and sum. k, v: [n_keys, HEAD_DIM] contiguous. q: [BLOCK_M, D_PAD]."""
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for start in range(0, n_keys, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_keys
        kv_offs = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
        v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * QK_SCALE  # [BLOCK_M, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=1))  # finite: every block has a valid key
        alpha = tl.exp2(row_max - new_max)
        p = tl.exp2(s - new_max[:, None])
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc / row_sum[:, None], row_max, row_sum


@triton.jit
def elite_cross_attention_kernel(
    q_ptr, k_ptr, v_ptr, kl_ptr, vl_ptr, idx_ptr,  # inputs
    n_heads, n_queries, n_keys, n_local, n_concepts,  # int32 scalars
    out_g_ptr, out_l_ptr, m_ptr,  # outputs
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    QK_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # grid: (cdiv(n_queries, BLOCK_M), batch * n_heads); all tensors contiguous
    # q, out_g [B,H,Nq,d]; k, v [B,H,Nk,d]; k_l, v_l [B,C,H,Nl,d]; idx [B,C]; out_l [B,C,H,Nq,d]; m [B,C,H,Nq] fp32
    block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads

    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    m_mask = offs_m < n_queries
    d_mask = offs_d < HEAD_DIM
    q_rows = offs_m[:, None] * HEAD_DIM + offs_d[None, :]  # [BLOCK_M, D_PAD] within one (.., head) slice
    q_offs = bh * n_queries * HEAD_DIM + q_rows
    q_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)  # [BLOCK_M, D_PAD]

    kv_base = bh * n_keys * HEAD_DIM
    out_g, row_max, row_sum = _attend(q, k_ptr + kv_base, v_ptr + kv_base, n_keys, offs_d, d_mask,
                                      QK_SCALE, HEAD_DIM, BLOCK_M, BLOCK_N, D_PAD, DOT_PRECISION)
    tl.store(out_g_ptr + q_offs, out_g.to(out_g_ptr.dtype.element_ty), mask=q_mask)

    q32 = q.to(tl.float32)
    for c in range(0, n_concepts):
        bch = (b * n_concepts + c) * n_heads + h  # slice (b, c, h) of the [B,C,H,...] tensors
        pick = tl.load(idx_ptr + b * n_concepts + c).to(tl.int64)
        k_pick = tl.load(k_ptr + kv_base + pick * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        score = tl.sum(q32 * k_pick[None, :], axis=1) * QK_SCALE  # [BLOCK_M], log2 units
        m = tl.exp2(score - row_max) / row_sum
        tl.store(m_ptr + bch * n_queries + offs_m, m, mask=m_mask)

        local_base = bch * n_local * HEAD_DIM
        out_l, _, _ = _attend(q, kl_ptr + local_base, vl_ptr + local_base, n_local, offs_d, d_mask,
                              QK_SCALE, HEAD_DIM, BLOCK_M, BLOCK_N, D_PAD, DOT_PRECISION)
        tl.store(out_l_ptr + bch * n_queries * HEAD_DIM + q_rows, out_l.to(out_l_ptr.dtype.element_ty), mask=q_mask)


def compile_ahead_of_time(
    dtype: str, head_dim: int, config: KernelConfig, target: object = None
) -> triton.compiler.CompiledKernel:
    """Compile for a GPU without launching (TensorRT AOT plugin): dtype "fp16" or "fp32" for
    q, k, v, k_l, v_l, out_g, out_l; idx int32; m fp32. target: a triton GPUTarget, None for the
    current device. The PTX is in .asm["ptx"], launch facts in .metadata."""
    tensors = [f"*{dtype}"] * 5 + ["*i32"]
    signature = dict(zip(("q_ptr", "k_ptr", "v_ptr", "kl_ptr", "vl_ptr", "idx_ptr"), tensors))
    signature.update({name: "i32" for name in SCALAR_NAMES})
    signature.update({"out_g_ptr": f"*{dtype}", "out_l_ptr": f"*{dtype}", "m_ptr": "*fp32"})
    consts = constexprs(head_dim, dtype == "fp32", config)
    signature.update({name: "constexpr" for name in consts})
    # every pointer is 16-byte aligned (TensorRT allocates 256-byte aligned buffers)
    pointer_args = [i for i, kind in enumerate(signature.values()) if kind.startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointer_args}
    source = triton.compiler.ASTSource(
        fn=elite_cross_attention_kernel, signature=signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=target, options=options)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_l: torch.Tensor,
                  v_l: torch.Tensor, idx: torch.Tensor) -> None:
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q must be float16 or float32, got {q.dtype}")
    for name, t, dims in (("k", k, 4), ("v", v, 4), ("k_l", k_l, 5), ("v_l", v_l, 5)):
        if t.dtype != q.dtype or t.device != q.device or t.dim() != dims:
            raise ValueError(f"{name} must be a {dims}-d {q.dtype} tensor on {q.device}, "
                             f"got {t.dim()}-d {t.dtype} on {t.device}")
    batch, heads, _, head_dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, heads) or k.shape[3] != head_dim:
        raise ValueError(f"k, v must be [{batch}, {heads}, Nk, {head_dim}], got {list(k.shape)}, "
                         f"{list(v.shape)}")
    concepts = k_l.shape[1]
    if k_l.shape != v_l.shape or (k_l.shape[0], k_l.shape[2]) != (batch, heads) or k_l.shape[4] != head_dim:
        raise ValueError(f"k_l, v_l must be [{batch}, C, {heads}, Nl, {head_dim}], got "
                         f"{list(k_l.shape)}, {list(v_l.shape)}")
    if k.shape[2] == 0 or k_l.shape[3] == 0 or concepts == 0:
        raise ValueError("need at least one key in each branch and one concept")
    idx_dtype_ok = idx.dtype in (torch.int32, torch.int64)
    if idx.shape != (batch, concepts) or not idx_dtype_ok or idx.device != q.device:
        raise ValueError(f"idx must be an int32/int64 [{batch}, {concepts}] tensor on {q.device}, "
                         f"got {idx.dtype} {list(idx.shape)} on {idx.device}")


def elite_cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_l: torch.Tensor, v_l: torch.Tensor,
    idx: torch.Tensor, config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the kernel. q [B,H,Nq,d]; k, v [B,H,Nk,d]; k_l, v_l [B,C,H,Nl,d]; idx [B,C] int with
    0 <= idx[b,c] < Nk (not checked: that would sync the device; out of range reads a wrong key).
    Returns out_g [B,H,Nq,d], out_l [B,C,H,Nq,d] in q's dtype and m [B,C,H,Nq] fp32."""
    _check_inputs(q, k, v, k_l, v_l, idx)
    q, k, v, k_l, v_l, idx = (t.contiguous() for t in (q, k, v, k_l, v_l, idx))
    batch, heads, n_queries, head_dim = q.shape
    concepts = k_l.shape[1]
    config = config or default_config(head_dim)
    out_g = torch.empty_like(q)
    out_l = q.new_empty((batch, concepts, heads, n_queries, head_dim))
    m = torch.empty((batch, concepts, heads, n_queries), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out_g, out_l, m
    grid = (triton.cdiv(n_queries, config.block_m), batch * heads)
    elite_cross_attention_kernel[grid](
        q, k, v, k_l, v_l, idx,
        heads, n_queries, k.shape[2], k_l.shape[3], concepts,
        out_g, out_l, m,
        **constexprs(head_dim, q.dtype == torch.float32, config),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out_g, out_l, m
