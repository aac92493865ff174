"""Launch the ahead-of-time compiled attention kernel the way a TensorRT AOT plugin does, on a GPU
without TensorRT: PTX loaded by the CUDA driver (cuModuleLoadData), arguments (input pointers,
int32 scalars, output pointers) followed by null for Triton's hidden scratch pointers, grid
(cdiv(Nq, block_m), B*H) with two concepts, block num_warps*32, dynamic shared memory from the compile metadata
(opted in above 48 KiB). Compares with the fp32 formula.

    python scripts/gpu_aot_launch_check.py

Checks the PTX, argument order, grid and launch sizes that attention_plugin_trt.py hands TensorRT;
not TensorRT itself. Needs torch, triton and libcuda.
"""
import ctypes
import sys
from pathlib import Path

import torch

CASES = [  # dtype, B, H, Nq, d
    ("fp16", 2, 8, 4096, 40), ("fp16", 2, 8, 1536, 80), ("fp16", 2, 8, 256, 160),
    ("fp16", 2, 8, 64, 160), ("fp32", 2, 2, 77, 40),
]
N_KEYS, N_LOCAL = 77, 256
CONCEPTS = 2  # two local branches per launch: the kernel's concept loop and [B,C,...] strides
SHARED_OPT_IN_ABOVE = 48 * 1024
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


def import_attention():
    try:
        from elite_export.engines import attention_kernel, attention_op
    except ImportError:  # not installed: import the engines/ folder directly
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from engines import attention_kernel, attention_op
    return attention_kernel, attention_op


def check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with CUresult {status}")


def load_kernel(cuda, compiled) -> ctypes.c_void_p:
    module, function = ctypes.c_void_p(), ctypes.c_void_p()
    check(cuda.cuModuleLoadData(ctypes.byref(module), compiled.asm["ptx"].encode()), "load PTX")
    check(cuda.cuModuleGetFunction(ctypes.byref(function), module,
                                   compiled.metadata.name.encode()), "get function")
    if compiled.metadata.shared > SHARED_OPT_IN_ABOVE:
        check(cuda.cuFuncSetAttribute(function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                      compiled.metadata.shared), "opt in to shared memory")
    return function


def launch_like_tensorrt(cuda, attention_kernel, inputs, dtype: str):
    q, k, v, k_l, v_l, idx = inputs
    batch, heads, n_queries, head_dim = q.shape
    config = attention_kernel.default_config(head_dim)
    compiled = attention_kernel.compile_ahead_of_time(dtype, head_dim, config)
    function = load_kernel(cuda, compiled)
    concepts = k_l.shape[1]
    out_g = torch.empty_like(q)
    out_l = q.new_empty((batch, concepts, heads, n_queries, head_dim))
    m = torch.empty((batch, concepts, heads, n_queries), dtype=torch.float32, device=q.device)
    pointers = [ctypes.c_void_p(t.data_ptr()) for t in (q, k, v, k_l, v_l, idx)]
    scalars = [ctypes.c_int32(n) for n in (heads, n_queries, k.shape[2], k_l.shape[3], concepts)]
    outputs = [ctypes.c_void_p(t.data_ptr()) for t in (out_g, out_l, m)]
    hidden = [ctypes.c_void_p(0), ctypes.c_void_p(0)]  # global and profile scratch: null
    args = pointers + scalars + outputs + hidden
    params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    grid_x = -(-n_queries // config.block_m)
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    check(cuda.cuLaunchKernel(function, grid_x, batch * heads, 1, compiled.metadata.num_warps * 32,
                              1, 1, compiled.metadata.shared, stream, params, None), "launch")
    torch.cuda.synchronize()
    return (out_g, out_l, m), compiled.metadata.shared


def main() -> int:
    attention_kernel, attention_op = import_attention()
    torch.cuda.init()
    torch.empty(1, device="cuda")  # makes torch's primary context current for the driver calls
    cuda = ctypes.CDLL("libcuda.so.1")  # default argument conversion: ints, pointers, bytes
    failures = 0
    print("| dtype | B | H | Nq | d | shared KiB | out_g err | out_l err | m err | ok |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for dtype, batch, heads, n_queries, head_dim in CASES:
        torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
        gen = torch.Generator().manual_seed(0)
        shapes = [(batch, heads, n_queries, head_dim), (batch, heads, N_KEYS, head_dim),
                  (batch, heads, N_KEYS, head_dim), (batch, CONCEPTS, heads, N_LOCAL, head_dim),
                  (batch, CONCEPTS, heads, N_LOCAL, head_dim)]
        tensors = [torch.randn(*s, generator=gen).to("cuda", torch_dtype) for s in shapes]
        idx = torch.tensor([[2, 40], [76, 5]][:batch], dtype=torch.int32, device="cuda")[:, :CONCEPTS]
        inputs = [*tensors, idx]
        got, shared = launch_like_tensorrt(cuda, attention_kernel, inputs, dtype)
        ref = attention_op.reference_cross_attention(*inputs)
        errs = [(g.float() - r.float()).abs().max().item() for g, r in zip(got, ref)]
        tol = 2e-3 if dtype == "fp16" else 1e-5
        ok = errs[0] < tol and errs[1] < tol and errs[2] < 1e-5
        failures += not ok
        print(f"| {dtype} | {batch} | {heads} | {n_queries} | {head_dim} | {shared / 1024:.0f} | "
              f"{errs[0]:.2e} | {errs[1]:.2e} | {errs[2]:.2e} | {'yes' if ok else 'NO'} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
