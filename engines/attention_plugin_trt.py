"""TensorRT registration of the ELITE cross-attention kernel as a quickly deployable plugin
(tensorrt.plugin, TensorRT >= 10.9 for the ahead-of-time implementation).

    register_plugin()   # once per process, before parsing an ONNX model that uses the plugin

Build time: @trtp.aot_impl compiles attention_kernel.elite_cross_attention_kernel with Triton for
the build GPU and hands TensorRT its PTX, launch grid and int32 arguments; TensorRT bakes the
kernel into the engine, so running the engine needs neither Python nor this module. Node
wiring for the ONNX exporter: attention_plugin_spec.py.

Launch contract (TensorRT's AOT plugins): kernel arguments are (input pointers, the extra int32
scalars, output pointers). Triton appends hidden global/profile scratch pointers to every kernel;
TensorRT passes null for arguments it was not given, which is what Triton passes itself when the
scratch size is 0, so a kernel that needs scratch is refused here.

The kernel asks for more than 48 KiB of dynamic shared memory for head dims above 64 (80 KiB
for d=80, 84 KiB for d=160, see default_config). A CUDA launch needs an explicit opt-in for that
(cuFuncSetAttribute MAX_DYNAMIC_SHARED_SIZE_BYTES); whether TensorRT's AOT launcher opts in with
launch.shared_mem was not verified. If an engine fails to launch for those head dims, configs
that stay at or below 48 KiB cost 17% (d=80: 64/32/4 warps/1 stage) and 35% (d=160: 32/32/4/1).

Executed: mypy over this module; compile_ahead_of_time to sm_90 PTX on a CPU host (triton 3.9,
tests/test_attention_kernel.py); on an H200 with triton 3.6, the PTX loaded by the CUDA driver and
launched exactly as the launch parameters below describe, with nulls for the hidden scratch
arguments, matching the formula (scripts/gpu_aot_launch_check.py). Not executed: anything that
imports tensorrt (registration, the shape/type callbacks, an engine build and run): no TensorRT
was available.
"""
from typing import Any, List, Tuple, Union

from elite_export.errors import EliteError

from .attention_kernel import compile_ahead_of_time, default_config
from .attention_plugin_spec import PLUGIN_ID

_registered = False


def _require_tensorrt_plugin() -> None:
    """Raise an EliteError unless TensorRT with ahead-of-time plugins (>= 10.9) is installed."""
    try:
        import tensorrt as trt

        version = trt.__version__  # absent when only the type stubs (tensorrt-stubs) are there
    except (ImportError, AttributeError) as err:
        raise EliteError("the attention plugin needs TensorRT >= 10.9 "
                         "(pip install 'elite-export[trt]')") from err
    try:
        import tensorrt.plugin as trtp
    except ImportError as err:
        raise EliteError(f"TensorRT {version} has no tensorrt.plugin module; "
                         "the attention plugin needs TensorRT >= 10.9") from err
    if not hasattr(trtp, "aot_impl"):
        raise EliteError(f"TensorRT {version} cannot compile plugins ahead of time "
                         "(tensorrt.plugin.aot_impl); the attention plugin needs TensorRT >= 10.9")


def _check_launch_abi(compiled: Any) -> None:
    """Refuse kernels whose launch TensorRT's AOT path cannot reproduce."""
    meta = compiled.metadata
    scratch = (getattr(meta, "global_scratch_size", 0), getattr(meta, "profile_scratch_size", 0))
    ctas = getattr(meta, "num_ctas", 1)
    if any(scratch) or ctas != 1:
        raise EliteError(f"Triton built {meta.name} with global/profile scratch of {scratch} bytes "
                         f"and {ctas} CTAs per cluster; TensorRT AOT plugins give no scratch "
                         "memory and launch one CTA per cluster: try another Triton version")


def register_plugin() -> None:
    """Register "elite::cross_attention" with TensorRT's plugin registry (idempotent)."""
    global _registered
    if _registered:
        return
    _require_tensorrt_plugin()
    import tensorrt as trt
    import tensorrt.plugin as trtp
    from tensorrt.plugin import TensorDesc as Desc

    dtype_names = {trt.float16: "fp16", trt.float32: "fp32"}

    # TensorRT reads these annotations: the inputs are TensorDescs, there are no attributes
    @trtp.register(PLUGIN_ID)
    def _shapes(
        q: Desc, k: Desc, v: Desc, k_l: Desc, v_l: Desc, idx: Desc
    ) -> Tuple[Desc, Desc, Desc]:
        batch, heads, n_queries, head_dim = (q.shape_expr[i] for i in range(4))
        concepts = k_l.shape_expr[1]
        out_l_shape = (batch, concepts, heads, n_queries, head_dim)  # [B,C,H,Nq,d]
        m_shape = (batch, concepts, heads, n_queries)  # [B,C,H,Nq]
        return (q.like(), trtp.from_shape_expr(out_l_shape, dtype=q.dtype),
                trtp.from_shape_expr(m_shape, dtype=trt.float32))

    @trtp.autotune(PLUGIN_ID)
    def _types(
        q: Desc, k: Desc, v: Desc, k_l: Desc, v_l: Desc, idx: Desc,
        outputs: Tuple[Desc, Desc, Desc],
    ) -> List[trtp.AutoTuneCombination]:
        # q, k, v, k_l, v_l, idx | out_g, out_l, m; "|" alternatives go together
        float_io = "FP16|FP32"
        io_types = ", ".join([float_io] * 5 + ["INT32", float_io, float_io, "FP32"])
        return [trtp.AutoTuneCombination(io_types, "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def _compile(
        q: Desc, k: Desc, v: Desc, k_l: Desc, v_l: Desc, idx: Desc,
        outputs: Tuple[Desc, Desc, Desc], tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        if q.dtype not in dtype_names:
            raise EliteError(f"attention plugin: q must be float16 or float32, got {q.dtype}")
        head_dim_expr = q.shape_expr[3]
        if not head_dim_expr.is_constant:
            raise EliteError("attention plugin: the head dim of q must be static in the engine")
        head_dim = head_dim_expr.constant_value()
        config = default_config(head_dim)
        compiled = compile_ahead_of_time(dtype_names[q.dtype], head_dim, config)
        _check_launch_abi(compiled)

        batch, heads, n_queries = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(n_queries, config.block_m)  # query blocks
        launch.grid_y = batch * heads  # (sample, head) pairs
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        # the kernel's int32 scalars, in order: n_heads, n_queries, n_keys, n_local, n_concepts
        scalars = (heads, n_queries, k.shape_expr[2], k_l.shape_expr[3], k_l.shape_expr[1])
        extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in scalars])
        return compiled.metadata.name, compiled.asm["ptx"], launch, extra_args

    _registered = True
