"""The ELITE cross-attention Triton kernel against the plain formula, the torch.library op around
it, and the ahead-of-time compile the TensorRT plugin uses.

The kernel runs on the CPU in the Triton interpreter, in one subprocess: TRITON_INTERPRET=1 must
be set before triton is first imported, which this pytest process cannot promise (and setting it
here would leak into every other test)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from elite_export.engines import attention_op, attention_plugin_spec
from elite_export.engines.attention_kernel import elite_cross_attention
from elite_export.engines.attention_op import (
    combine_elite_output, elite_cross_attention_op, reference_cross_attention,
)

N_KEYS, N_LOCAL = 77, 256  # SD's text length and ELITE's local tokens
IDX = [[5, 30, 12], [76, 0, 40]]  # per sample, each concept's word position (incl. the last and first key)
PEAK_SCALE = 0.5  # q = PEAK_SCALE * ones in the peaked case


def random_inputs(n_queries: int, head_dim: int, dtype: torch.dtype,
                  idx_dtype: torch.dtype = torch.int64, concepts: int = 2) -> list[torch.Tensor]:
    """B=2, H=2: q [2,2,Nq,d]; k, v [2,2,77,d]; k_l, v_l [2,C,2,256,d]; idx [2,C]."""
    gen = torch.Generator().manual_seed(n_queries * 1000 + head_dim + 100 * concepts)
    shapes = [(2, n_queries, head_dim), (2, N_KEYS, head_dim), (2, N_KEYS, head_dim),
              (concepts, 2, N_LOCAL, head_dim), (concepts, 2, N_LOCAL, head_dim)]
    tensors = [torch.randn(2, *s, generator=gen).to(dtype) for s in shapes]
    return [*tensors, torch.tensor([row[:concepts] for row in IDX], dtype=idx_dtype)]


def peaked_inputs() -> list[torch.Tensor]:
    """q = c * ones and k = 0 except row idx[b, 0] = ones: score c * sqrt(d) there, 0 elsewhere."""
    q, k, v, k_l, v_l, idx = random_inputs(17, 8, torch.float32)
    k = torch.zeros_like(k)
    for b, row in enumerate(IDX):
        k[b, :, row[0]] = 1.0
    return [torch.full_like(q, PEAK_SCALE), k, v, k_l, v_l, idx]


def underflow_inputs() -> list[torch.Tensor]:
    """fp16, every concept's word key scores ~25 below the rest: m ~ 1e-11, which is 0 in fp16."""
    q, k, v, k_l, v_l, idx = random_inputs(17, 8, torch.float16)
    for b, row in enumerate(IDX):
        k[b, :, row[:2]] = -9.0
    return [torch.ones_like(q), k, v, k_l, v_l, idx]


def strided_inputs() -> list[torch.Tensor]:
    q, *rest = random_inputs(17, 40, torch.float32)
    return [q.transpose(1, 2).contiguous().transpose(1, 2), *rest]  # [B,H,Nq,d] view of [B,Nq,H,d]


# name: (inputs, kernel config or None for the default)
CASES: dict[str, tuple[list[torch.Tensor], dict | None]] = {
    **{f"fp32-{n}-{d}": (random_inputs(n, d, torch.float32), None)
       for n in (4, 17, 64) for d in (8, 40)},
    **{f"fp16-{n}-{d}": (random_inputs(n, d, torch.float16, torch.int32), None)
       for n, d in ((17, 8), (64, 40), (200, 8))},  # 200 queries: two blocks of 128
    "fp32-17-40-C1": (random_inputs(17, 40, torch.float32, concepts=1), None),
    "fp32-17-8-C3": (random_inputs(17, 8, torch.float32, concepts=3), None),
    "peaked": (peaked_inputs(), None),
    "peaked-swapped": (peaked_inputs()[:5] + [torch.tensor([row[:2] for row in IDX[::-1]])], None),
    "underflow": (underflow_inputs(), None),
    "strided-small-blocks": (strided_inputs(),
                             {"block_m": 16, "block_n": 32, "num_warps": 4, "num_stages": 1}),
}

RUN_KERNEL = """
import sys, torch
from elite_export.engines.attention_kernel import KernelConfig, elite_cross_attention
cases = torch.load(sys.argv[1])
outputs = {name: elite_cross_attention(*inputs, config=config and KernelConfig(**config))
           for name, (inputs, config) in cases.items()}
torch.save(outputs, sys.argv[2])
"""


@pytest.fixture(scope="module")
def kernel_out(tmp_path_factory) -> dict[str, tuple[torch.Tensor, ...]]:
    """Every case of CASES through the kernel, in the interpreter: name -> (out_g, out_l, m)."""
    folder = tmp_path_factory.mktemp("attention_kernel")
    torch.save(CASES, folder / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", RUN_KERNEL, folder / "cases.pt", folder / "out.pt"],
                   env=env, check=True, timeout=600)
    return torch.load(folder / "out.pt")


def reference(name: str) -> tuple[torch.Tensor, ...]:
    return reference_cross_attention(*CASES[name][0])


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("fp32")])
def test_fp32_matches_formula(kernel_out, name):
    (out_g, out_l, m), (ref_g, ref_l, ref_m) = kernel_out[name], reference(name)
    assert out_g.dtype == out_l.dtype == m.dtype == torch.float32
    q, idx = CASES[name][0][0], CASES[name][0][5]
    assert m.shape == ref_m.shape == (q.shape[0], idx.shape[1], *q.shape[1:3])  # [B,C,H,Nq]
    assert out_l.shape == (q.shape[0], idx.shape[1], *q.shape[1:])  # [B,C,H,Nq,d]
    torch.testing.assert_close(out_g, ref_g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_l, ref_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m, ref_m, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("fp16")])
def test_fp16_matches_formula(kernel_out, name):
    (out_g, out_l, m), (ref_g, ref_l, ref_m) = kernel_out[name], reference(name)  # ref: fp32 math
    assert out_g.dtype == out_l.dtype == torch.float16 and m.dtype == torch.float32
    torch.testing.assert_close(out_g, ref_g, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out_l, ref_l, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(m, ref_m, atol=1e-5, rtol=1e-3)


def test_m_is_the_weight_of_each_samples_placeholder_key(kernel_out):
    peak = torch.tensor(PEAK_SCALE * 8**0.5).exp().item()  # d = 8
    ordinary = 1 / (peak + N_KEYS - 1)
    m = kernel_out["peaked"][2]  # [B,C,H,Nq]: concept 0 reads the peaked key, concept 1 an ordinary one
    torch.testing.assert_close(m[:, 0], torch.full_like(m[:, 0], peak / (peak + N_KEYS - 1)))  # ~0.057
    torch.testing.assert_close(m[:, 1], torch.full_like(m[:, 1], ordinary))
    # with the positions swapped between samples each concept reads an ordinary key
    m_swapped = kernel_out["peaked-swapped"][2]
    torch.testing.assert_close(m_swapped, torch.full_like(m_swapped, ordinary))


def naive_elite_attention(q, k, v, k_l, v_l, idx, lam):
    """ELITE's attn2 written out per sample and concept in float64, the way the original model computes
    one concept, summed over the concepts."""
    scale = q.shape[-1] ** -0.5
    outs = []
    for b in range(q.shape[0]):
        qb, kb, vb = (t[b].double() for t in (q, k, v))
        probs = torch.softmax(qb @ kb.transpose(-1, -2) * scale, dim=-1)  # [H,Nq,Nk]
        out = probs @ vb
        for c in range(k_l.shape[1]):
            klb, vlb = k_l[b, c].double(), v_l[b, c].double()
            probs_l = torch.softmax(qb @ klb.transpose(-1, -2) * scale, dim=-1)  # [H,Nq,Nl]
            attn_to_word = probs[:, :, int(idx[b, c])]  # [H,Nq]
            weight = attn_to_word / attn_to_word.max()
            out = out + float(lam[b][c]) * weight[..., None] * (probs_l @ vlb)
        outs.append(out)
    return torch.stack(outs)  # [B,H,Nq,d]


@pytest.mark.parametrize("name,tol", [("fp32-17-40", 1e-5), ("fp16-64-40", 4e-3), ("fp32-17-40-C1", 1e-5),
                                      ("fp32-17-8-C3", 1e-5)])
def test_combined_output_reproduces_elite(kernel_out, name, tol):
    lam = torch.tensor([[0.6, 1.0, 0.3], [1.0, 0.0, 0.8]])[:, : CASES[name][0][5].shape[1]]  # [B,C]
    combined = combine_elite_output(*kernel_out[name], lam)
    assert combined.dtype == CASES[name][0][0].dtype
    expected = naive_elite_attention(*CASES[name][0], lam)
    torch.testing.assert_close(combined.double(), expected, atol=tol, rtol=tol)


def test_combination_survives_placeholder_attention_below_fp16_range(kernel_out):
    out_g, out_l, m = kernel_out["underflow"]
    assert 0 < m.min() and m.max() < 1e-8
    combined = combine_elite_output(out_g, out_l, m, torch.ones(2, 2))
    expected = naive_elite_attention(*CASES["underflow"][0], torch.ones(2, 2))
    torch.testing.assert_close(combined.double(), expected, atol=4e-3, rtol=4e-3)


def test_strided_inputs_and_small_blocks(kernel_out):
    for got, want in zip(kernel_out["strided-small-blocks"], reference("strided-small-blocks")):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_refused():
    q, k, v, k_l, v_l, idx = random_inputs(4, 8, torch.float32)
    with pytest.raises(ValueError, match="k, v must be"):
        elite_cross_attention(q, k[:, :1], v, k_l, v_l, idx)
    with pytest.raises(ValueError, match="v_l must be"):
        elite_cross_attention(q, k, v, k_l, v_l.half(), idx)
    with pytest.raises(ValueError, match="idx must be"):
        elite_cross_attention(q, k, v, k_l, v_l, idx.float())


def test_custom_op_cpu_schema_fake_and_export():
    inputs = random_inputs(5, 8, torch.float32)
    for got, want in zip(elite_cross_attention_op(*inputs), reference_cross_attention(*inputs)):
        torch.testing.assert_close(got, want)
    torch.library.opcheck(torch.ops.elite.cross_attention.default, inputs)

    class Attn2(torch.nn.Module):
        def forward(self, q, k, v, k_l, v_l, idx):
            return torch.ops.elite.cross_attention(q, k, v, k_l, v_l, idx)

    program = torch.export.export(Attn2(), tuple(inputs))
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert torch.ops.elite.cross_attention.default in targets


def test_plugin_names_match_the_op():
    spec = attention_plugin_spec
    assert spec.PLUGIN_ID == attention_op.OP_NAME == "elite::cross_attention"
    assert spec.ONNX_NODE_ATTRIBUTES == {
        "plugin_namespace": spec.PLUGIN_NAMESPACE, "plugin_version": "1", "aot": 1}


AOT_COMPILE = """
import json
from triton.backends.compiler import GPUTarget
from elite_export.engines.attention_kernel import compile_ahead_of_time, default_config
compiled = compile_ahead_of_time("fp16", 40, default_config(40), GPUTarget("cuda", 90, 32))
ptx = compiled.asm["ptx"]
entry = ptx[ptx.index(f".entry {compiled.metadata.name}("):]
params = entry[:entry.index(")")]
print(json.dumps({"params": params.count(".param"), "int32": params.count(".param .u32"),
                  "global_scratch": compiled.metadata.global_scratch_size,
                  "profile_scratch": getattr(compiled.metadata, "profile_scratch_size", 0)}))
"""


def test_compiles_to_ptx_for_hopper_with_the_tensorrt_launch_abi():
    # the compiler needs the real @triton.jit functions: no interpreter here
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AOT_COMPILE], env=env, check=True,
                          capture_output=True, text=True, timeout=300)
    facts = json.loads(done.stdout.splitlines()[-1])
    # 6 input pointers, 5 int32 scalars, 3 output pointers, then Triton's hidden scratch pointers
    assert facts["params"] >= 14 and facts["int32"] == 5
    assert facts["global_scratch"] == 0 and facts["profile_scratch"] == 0
