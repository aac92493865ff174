"""The backend interface: one GraphRunner per graph, named arrays in and out per the graph's spec.

ONNX Runtime implements it here (OrtRunner: CPU provider, numpy I/O) and in ort_device.py
(OrtDeviceRunner: device-resident I/O, the CUDA provider of onnxruntime-gpu, CUDA graphs); TensorRT
in tensorrt_backend.py, imported only when asked for.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Callable

import numpy as np

from elite_export.errors import EliteError
from elite_export.specs import GraphSpec

BACKENDS = ("onnxruntime", "tensorrt")
BoundRun = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # GraphRunner.bind's: the varying inputs -> outputs


class GraphRunner(ABC):
    """Runs one graph. Outputs are preallocated from the spec and reused: copy what you keep."""

    def __init__(self, spec: GraphSpec):
        self.spec = spec
        self._outputs: dict[tuple, dict[str, np.ndarray]] = {}

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray], dims: dict[str, int]) -> dict[str, np.ndarray]:
        """inputs: every spec input (shapes per `dims`) -> every spec output."""

    def bind(self, fixed: dict[str, np.ndarray], dims: dict[str, int]) -> BoundRun:
        """Inputs that stay the same over many calls (a generation's conditioning) given once; the returned
        callable takes the others. Device runners upload `fixed` once (ort_device.py); here each call
        runs with both, as `run` would."""
        return lambda varying: self.run({**fixed, **varying}, dims)

    def check_inputs(self, inputs: dict[str, np.ndarray], dims: dict[str, int]) -> None:
        for t in self.spec.inputs:
            a = inputs.get(t.name)
            want = self.spec.shape(t, dims)
            if a is None or a.shape != want or a.dtype != np.dtype(t.dtype):
                got = "missing" if a is None else f"{a.dtype}{list(a.shape)}"
                raise ValueError(f"{self.spec.name}: input {t.name!r} is {got}, expected {t.dtype}{list(want)}")

    def output_buffers(self, dims: dict[str, int]) -> dict[str, np.ndarray]:
        """Host arrays for the outputs at `dims`, reused while the shapes stay the same."""
        key = tuple(sorted(dims.items()))
        if key not in self._outputs:
            self._outputs = {key: {t.name: np.empty(self.spec.shape(t, dims), dtype=t.dtype)
                                   for t in self.spec.outputs}}  # keep one shape set: the current one
        return self._outputs[key]

    def close(self) -> None:
        """Release what the backend holds (device memory, sessions)."""


def ort_providers(device: str) -> list[str]:
    import onnxruntime as ort

    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EliteError("--device cuda needs onnxruntime-gpu and a CUDA GPU; this onnxruntime offers "
                             f"{', '.join(ort.get_available_providers())}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtRunner(GraphRunner):
    """ONNX Runtime session with I/O binding: inputs bound from numpy, outputs into preallocated arrays."""

    def __init__(self, spec: GraphSpec, path: str, device: str = "cpu", threads: int = 0,
                 optimization: str = "all"):
        super().__init__(spec)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0: onnxruntime's choice (one per physical core)
        opts.graph_optimization_level = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                         "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                         "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(path, opts, providers=ort_providers(device))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
            raise EliteError(f"{spec.name}: onnxruntime cannot load {os.path.basename(path)} "
                             f"({str(e).splitlines()[0][:200]}); rebuild the bundle") from None
        self.device = device

    def run(self, inputs: dict[str, np.ndarray], dims: dict[str, int]) -> dict[str, np.ndarray]:
        self.check_inputs(inputs, dims)
        outs = self.output_buffers(dims)
        binding = self.session.io_binding()
        for t in self.spec.inputs:
            binding.bind_cpu_input(t.name, np.ascontiguousarray(inputs[t.name]))
        for name, buf in outs.items():
            binding.bind_output(name, "cpu", 0, buf.dtype, buf.shape, buf.ctypes.data)
        self.session.run_with_iobinding(binding)
        return outs
