"""CUDA through cuda-python's runtime bindings (no torch): the device, streams, device buffers and
CUDA graphs the TensorRT backend and the engine builder need. Imported lazily: the base runtime
runs without cuda-python.

Every cudart call returns (cudaError_t, *values); `call` unwraps it and turns an error into a
RuntimeError that names the call (a failing CUDA call mid-run is a bug or a broken device, not a
user error). A missing package or GPU is the user's to fix: EliteError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from elite_export.errors import EliteError

CUDA_PYTHON_HINT = "pip install 'elite-export[trt]' (cuda-python) on a host with an NVIDIA GPU"


def cudart() -> Any:
    """The CUDA runtime bindings: cuda.bindings.runtime (cuda-python >= 12.6) or the older cuda.cudart."""
    try:
        from cuda.bindings import runtime

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as legacy  # type: ignore[attr-defined]

        return legacy
    except ImportError:
        raise EliteError(f"cuda-python is not installed: {CUDA_PYTHON_HINT}") from None


def call(result: Any, what: str) -> Any:
    """Unwrap a cudart result tuple: () -> None, (v,) -> v, (v, w) -> (v, w); raise on an error."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        name = rt.cudaGetErrorName(err)[1]
        raise RuntimeError(f"CUDA error in {what}: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: str  # "9.0"; engines are built per compute capability


def current_device() -> DeviceInfo:
    """The CUDA device this process uses; EliteError when cuda-python or a GPU is missing."""
    rt = cudart()
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess or count == 0:
        why = "no CUDA GPU is visible" if err == rt.cudaError_t.cudaSuccess else \
            f"the CUDA driver reports {rt.cudaGetErrorName(err)[1]!r}"
        raise EliteError(f"TensorRT needs an NVIDIA GPU: {why} (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
    index = call(rt.cudaGetDevice(), "cudaGetDevice")
    props = call(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(index, name, f"{props.major}.{props.minor}")


class Stream:
    """A non-blocking stream (capturable: the legacy default stream is not)."""

    def __init__(self) -> None:
        rt = cudart()
        self.handle = call(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    @property
    def ptr(self) -> int:  # what TensorRT's execute_async_v3 takes
        return int(self.handle)

    def synchronize(self) -> None:
        call(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            call(cudart().cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


class DeviceBuffer:
    """`nbytes` of device memory (cudaMalloc: 256-byte aligned, as TensorRT wants)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.ptr: int = int(call(cudart().cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes})"))

    def upload(self, array: np.ndarray, stream: Stream) -> None:
        """Async host -> device copy of a C-contiguous array (keep `array` alive until the stream syncs)."""
        self._check_fits(array)
        rt = cudart()
        call(rt.cudaMemcpyAsync(self.ptr, array.ctypes.data, array.nbytes,
                                rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle), "cudaMemcpyAsync H2D")

    def download(self, array: np.ndarray, stream: Stream) -> None:
        """Async device -> host copy into a C-contiguous array (valid after the stream syncs)."""
        self._check_fits(array)
        rt = cudart()
        call(rt.cudaMemcpyAsync(array.ctypes.data, self.ptr, array.nbytes,
                                rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle), "cudaMemcpyAsync D2H")

    def _check_fits(self, array: np.ndarray) -> None:
        if not array.flags.c_contiguous or array.nbytes > self.nbytes:
            raise ValueError(f"array of {array.nbytes} bytes (contiguous: {array.flags.c_contiguous}) "
                             f"does not fit a device buffer of {self.nbytes} bytes")

    def close(self) -> None:
        if self.ptr:
            call(cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class CudaGraph:
    """The work `enqueue(stream)` puts on `stream`, captured once and replayed with `launch`.

    Replays use the device addresses seen at capture: callers keep their buffers in place."""

    def __init__(self, enqueue: Callable[[Stream], None], stream: Stream):
        rt = cudart()
        call(rt.cudaStreamBeginCapture(stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal),
             "cudaStreamBeginCapture")
        try:
            enqueue(stream)
        finally:  # always leave capture mode, or the stream stays unusable
            graph = call(rt.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
        self.graph = graph
        self.exec = call(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")

    def launch(self, stream: Stream) -> None:
        call(cudart().cudaGraphLaunch(self.exec, stream.handle), "cudaGraphLaunch")

    def close(self) -> None:
        rt = cudart()
        if self.exec is not None:
            call(rt.cudaGraphExecDestroy(self.exec), "cudaGraphExecDestroy")
            call(rt.cudaGraphDestroy(self.graph), "cudaGraphDestroy")
            self.exec = None
