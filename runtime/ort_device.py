"""ONNX Runtime with device-resident inputs and outputs: the runner behind `elite-run --device cuda`
(ONNX Runtime's CUDA provider; onnxruntime-gpu). On the CPU provider the same code runs with host
OrtValues, which is how the tests hold it bit-identical to OrtRunner where no GPU is.

    OrtDeviceRunner(spec, path, device, cuda_graph)
      slots: one OrtValue per input and output on the device, allocated once per shape set and bound
             once to the session's IOBinding (addresses never change: what a captured CUDA graph needs)
      run(inputs, dims)      every input copied into its slot, the session run, the outputs read back
      bind(fixed, dims)      the generation's constant inputs copied in once; the returned step copies
                             only the inputs that change per step (the pipeline's STEP_INPUTS)

What crosses the bus per UNet step (512 px, 1 request with CFG: 2 rows): latents [2,4,64,64] fp32 in
(128 KiB), timestep [2] in (8 B), noise_pred [2,4,64,64] out (128 KiB): ~0.26 MB. Per generation:
text embeddings [2,77,768] (462 KiB), local tokens [2,256,768] (1.5 MiB), index and lambda. The
scheduler and the guidance mix stay on the host (numpy, a few µs on 16K floats): keeping latents on
the device would save those 0.26 MB (~20 µs at PCIe speed) per step and need device math the runtime
does not have without torch.

CUDA graphs (`cuda_graph=True`, the UNet of a static bundle): the session is made with ONNX Runtime's
`enable_cuda_graph` and `session.disable_cpu_ep_fallback` (a node left on the CPU would make ONNX Runtime
quietly run without the graph; this way it is an error at start), ONNX Runtime captures a run on the
fixed slots and replays it; a call with other shapes is an EliteError.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from elite_export.errors import EliteError
from elite_export.runtime.backends import BoundRun, GraphRunner, OrtRunner
from elite_export.runtime.bundle import Bundle
from elite_export.specs import GRAPH_NAMES, GraphSpec

GPU_HINT = ("--device cuda needs onnxruntime-gpu (the CUDA and cuDNN 9 libraries it was built for on the library path) and "
            "an NVIDIA GPU")
MAX_SHAPE_SETS = 4  # slots kept per runner (the text encoder alternates K = 1 and 5)


def cuda_provider_options(cuda_graph: bool, device_id: int = 0) -> dict[str, str]:
    return {"device_id": str(device_id), "enable_cuda_graph": "1" if cuda_graph else "0",
            "cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": "1"}


def session_config(device: str, cuda_graph: bool, threads: int = 0) -> tuple[object, list]:
    """(SessionOptions, providers). A CUDA graph needs every node on the CUDA provider: CPU fallback off,
    and then no CPU provider named (ONNX Runtime refuses the two together as a conflict)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if cuda_graph:
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if device != "cuda":
        return opts, ["CPUExecutionProvider"]
    return opts, [("CUDAExecutionProvider", cuda_provider_options(cuda_graph))] + ([] if cuda_graph else
                                                                                   ["CPUExecutionProvider"])


def make_session(spec: GraphSpec, path: str, device: str, cuda_graph: bool, threads: int = 0):
    """An InferenceSession on `device`; EliteError (one line) for a missing provider, a provider that
    could not load its libraries, or a graph that cannot be captured."""
    import onnxruntime as ort

    if device not in ("cpu", "cuda"):
        raise EliteError(f"unknown device {device!r}; choose cpu or cuda")
    if cuda_graph and device != "cuda":
        raise EliteError("CUDA graphs need --device cuda")
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise EliteError(f"{GPU_HINT}; this onnxruntime ({ort.__version__}) offers "
                         f"{', '.join(ort.get_available_providers())}")
    opts, providers = session_config(device, cuda_graph, threads)
    try:
        session = ort.InferenceSession(path, opts, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        first = str(e).splitlines()[0][:240] if str(e) else type(e).__name__
        if cuda_graph:
            raise EliteError(f"{spec.name}: no CUDA graph: every node must run on the CUDA provider with fixed "
                             f"shapes (build the bundle with --static), and onnxruntime says: {first}") from None
        raise EliteError(f"{spec.name}: onnxruntime cannot load {os.path.basename(path)} on {device} ({first}); "
                         "rebuild the bundle") from None
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise EliteError(f"{spec.name}: onnxruntime-gpu could not start its CUDA provider (its message is above: "
                         f"a CUDA or cuDNN library it did not find); {GPU_HINT}")
    return session


class OrtDeviceRunner(GraphRunner):
    """One graph on ONNX Runtime with its I/O in device OrtValues (see the module docstring)."""

    def __init__(self, spec: GraphSpec, path: str, device: str = "cuda", cuda_graph: bool = False, threads: int = 0):
        super().__init__(spec)
        self.session = make_session(spec, path, device, cuda_graph, threads)
        self.device, self.cuda_graph = device, cuda_graph
        self.slots: OrderedDict[tuple, tuple[dict, object]] = OrderedDict()  # dims -> ({name: OrtValue}, IOBinding)
        self.copied_bytes = 0  # host <-> device bytes moved by this runner (the tests and the benchmark read it)

    def _slots(self, dims: dict[str, int]) -> tuple[dict, object]:
        """The OrtValues (and their binding) for `dims`, made on first use."""
        import onnxruntime as ort

        key = tuple(sorted(dims.items()))
        if key in self.slots:
            self.slots.move_to_end(key)
            return self.slots[key]
        if self.cuda_graph and self.slots:
            (old, _), = self.slots.items()
            raise EliteError(f"{self.spec.name}: its CUDA graph was captured for {self._describe(dict(old))}; this "
                             f"call has {self._describe(dims)} (CUDA graphs replay one shape: a static bundle's)")
        values = {t.name: ort.OrtValue.ortvalue_from_shape_and_type(self.spec.shape(t, dims), np.dtype(t.dtype),
                                                                     self.device, 0)
                  for t in self.spec.inputs + self.spec.outputs}
        binding = self.session.io_binding()
        for t in self.spec.inputs:
            binding.bind_ortvalue_input(t.name, values[t.name])
        for t in self.spec.outputs:
            binding.bind_ortvalue_output(t.name, values[t.name])
        self.slots[key] = (values, binding)
        if len(self.slots) > MAX_SHAPE_SETS:
            self.slots.popitem(last=False)
        return values, binding

    def _describe(self, dims: dict[str, int]) -> str:
        return ", ".join(f"{t.name} {list(self.spec.shape(t, dims))}" for t in self.spec.inputs[:1])

    def _copy_in(self, values: dict, inputs: dict[str, np.ndarray]) -> None:
        for name, a in inputs.items():
            values[name].update_inplace(np.ascontiguousarray(a))
            self.copied_bytes += a.nbytes

    def _execute(self, values: dict, binding) -> dict[str, np.ndarray]:
        self.session.run_with_iobinding(binding)
        outs = {t.name: values[t.name].numpy() for t in self.spec.outputs}  # a host copy (a view on the CPU)
        self.copied_bytes += sum(a.nbytes for a in outs.values())
        return outs

    def run(self, inputs: dict[str, np.ndarray], dims: dict[str, int]) -> dict[str, np.ndarray]:
        self.check_inputs(inputs, dims)
        values, binding = self._slots(dims)
        self._copy_in(values, {t.name: inputs[t.name] for t in self.spec.inputs})
        return self._execute(values, binding)

    def bind(self, fixed: dict[str, np.ndarray], dims: dict[str, int]) -> BoundRun:
        values, binding = self._slots(dims)
        self.check_inputs({**{t.name: np.zeros(self.spec.shape(t, dims), t.dtype) for t in self.spec.inputs},
                           **fixed}, dims)
        self._copy_in(values, fixed)
        varying = tuple(t.name for t in self.spec.inputs if t.name not in fixed)

        def step(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if set(inputs) != set(varying):
                raise ValueError(f"{self.spec.name}: a bound step takes {sorted(varying)}, got {sorted(inputs)}")
            for t in self.spec.inputs:
                a = inputs.get(t.name)
                if a is not None and (a.shape != self.spec.shape(t, dims) or a.dtype != np.dtype(t.dtype)):
                    raise ValueError(f"{self.spec.name}: input {t.name!r} is {a.dtype}{list(a.shape)}, expected "
                                     f"{t.dtype}{list(self.spec.shape(t, dims))}")
            self._copy_in(values, inputs)
            return self._execute(values, binding)

        return step

    def close(self) -> None:
        """Drop the slots and the session (ONNX Runtime frees the session's device memory with it)."""
        self.slots.clear()
        self.session = None


CUDA_GRAPH_GRAPHS = ("unet",)  # the graph run once per step


def graph_precision(bundle: Bundle, device: str, precision: str | None) -> str:
    """Which of the bundle's graphs to run: on cuda the CUDA variant, else its fp16, else fp32 graphs;
    on the CPU fp32 (fp16 if asked; the CUDA variant's fused ops have CUDA kernels only)."""
    have = set(bundle.manifest["graphs"][GRAPH_NAMES[0]]["files"])
    if precision is None:
        precision = next(p for p in ("cuda", "fp16", "fp32") if p in have) if device == "cuda" else "fp32"
    if precision == "cuda" and device != "cuda":
        raise EliteError("the bundle's cuda graphs run on --device cuda only (their GroupNorm, BiasSplitGelu and "
                         "BiasAdd have no CPU kernels); use --precision fp32 on the CPU")
    return precision


def open_ort_runners(bundle: Bundle, device: str = "cpu", threads: int = 0, precision: str | None = None,
                     cuda_graph: bool = False) -> dict[str, GraphRunner]:
    """{graph: runner} on ONNX Runtime: OrtRunner on the CPU, OrtDeviceRunner on cuda (CUDA graph of the
    UNet with `cuda_graph`, static bundles only)."""
    precision = graph_precision(bundle, device, precision)
    if cuda_graph and not bundle.manifest.get("static"):
        r = bundle.ranges
        raise EliteError(f"--cuda-graph needs a static bundle (elite-export build --static): a CUDA graph replays one "
                         f"shape, and this bundle takes batch {r.batch[0]}-{r.batch[2]} at {r.size[0]}-{r.size[2]} px")
    for name in GRAPH_NAMES:
        problems = bundle.verify((name,), precision, full=False)  # sizes: `elite-export check` hashes
        if problems:
            raise EliteError(f"bundle {bundle.root!r}: {problems[0]}; rebuild it with `elite-export build`")
    paths = {name: bundle.graph_path(name, precision) for name in GRAPH_NAMES}
    if device != "cuda":
        if cuda_graph:
            raise EliteError("CUDA graphs need --device cuda")
        return {name: OrtRunner(bundle.spec(name), paths[name], device, threads) for name in GRAPH_NAMES}
    runners: dict[str, GraphRunner] = {}
    try:
        for name in GRAPH_NAMES:
            runners[name] = OrtDeviceRunner(bundle.spec(name), paths[name], device,
                                            cuda_graph and name in CUDA_GRAPH_GRAPHS, threads)
    except BaseException:
        for r in runners.values():
            r.close()
        raise
    return runners
