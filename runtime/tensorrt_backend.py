"""The TensorRT backend: one TrtRunner per engine of a bundle, through TensorRT's name-based I/O API
and cuda-python (no torch). `open_trt_runners` is what `elite-run --backend tensorrt` calls.

    open_trt_runners(bundle, names)
      -> engine per graph from BUNDLE/engines (EngineCache.find: this bundle's fp16 graph, this
         TensorRT version and GPU compute capability, checked before deserialising)
      -> bytes verified against the recorded sha256 -> deserialize_cuda_engine
      -> one scratch buffer sized to the largest engine's device memory, shared by every context
         (the graphs run one after another on one stream)
      -> per engine: device buffers at the profile's max shapes, bound once (set_tensor_address)

A run: host inputs -> device (async) -> set_input_shape where shapes changed -> execute_async_v3
(or the replay of a captured CUDA graph: engines whose profile is static, the UNet step by default)
-> outputs -> preallocated host arrays -> one stream sync. Needs TensorRT >= 10.1
(ExecutionContextAllocationStrategy, set_device_memory, device_memory_size_v2).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

import numpy as np

from elite_export.engines.cache import REBUILD_HINT, CacheEntry, EngineCache, OnnxFingerprint
from elite_export.engines.trt_build import require_tensorrt
from elite_export.errors import EliteError
from elite_export.runtime.backends import GraphRunner
from elite_export.runtime.bundle import Bundle
from elite_export.runtime.cuda_device import CudaGraph, DeviceBuffer, Stream, current_device
from elite_export.specs import GraphSpec

if TYPE_CHECKING:
    import tensorrt as trt

CUDA_GRAPH_GRAPHS = ("unet",)  # replayed as a CUDA graph when its engine's profile is static
Shape = tuple[int, ...]


def dims_tuple(dims: trt.Dims) -> Shape:
    return tuple(dims[i] for i in range(len(dims)))


class SharedDevice:
    """What the runners of one bundle share: TensorRT's runtime, the stream and the scratch memory.
    Freed when the last runner closes."""

    def __init__(self, logger: trt.ILogger, runtime: trt.Runtime, scratch_bytes: int):
        self.logger, self.runtime = logger, runtime
        self.stream = Stream()
        self.scratch = DeviceBuffer(scratch_bytes)
        self.users = 0

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.scratch.close()
            self.stream.close()


def deserialize(runtime: trt.Runtime, data: bytes, entry: CacheEntry) -> trt.ICudaEngine:
    import tensorrt as trt

    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        f = entry.fields
        raise EliteError(f"TensorRT {trt.__version__} cannot deserialize {entry.path} (recorded as built with "
                         f"TensorRT {f['trt_version']} for compute capability {f['compute_capability']}; its log "
                         f"is above): {REBUILD_HINT}")
    return engine


class TrtRunner(GraphRunner):
    """One engine: fixed device buffers, a context on the shared scratch, optional CUDA-graph replay."""

    def __init__(self, spec: GraphSpec, engine: trt.ICudaEngine, label: str, shared: SharedDevice,
                 cuda_graph: bool = False, log: Callable[[str], None] = print):
        super().__init__(spec)
        import tensorrt as trt

        self.engine, self.label, self.shared, self.log = engine, label, shared, log
        self.dtypes = self._check_io()
        self.profile = {t.name: tuple(dims_tuple(d) for d in engine.get_tensor_profile_shape(t.name, 0))
                        for t in spec.inputs}  # {input: (min, opt, max)}
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise RuntimeError(f"{label}: TensorRT could not create an execution context")
        self.context.set_device_memory(shared.scratch.ptr, shared.scratch.nbytes)
        self.buffers = self._allocate()
        for name, buf in self.buffers.items():
            self.context.set_tensor_address(name, buf.ptr)
        self.static = all(lo == hi for lo, _, hi in self.profile.values())
        self.use_cuda_graph = cuda_graph and self.static
        self.graph: CudaGraph | None = None
        self.shapes: dict[str, Shape] = {}  # input shapes set on the context
        self._outputs: dict[tuple, dict[str, np.ndarray]] = {}
        shared.users += 1

    def _check_io(self) -> dict[str, np.dtype]:
        """{tensor: numpy dtype}; EliteError when the engine's I/O is not the spec's (a stale engine)."""
        import tensorrt as trt

        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        want = {t.name: np.dtype(t.dtype) for t in self.spec.inputs + self.spec.outputs}
        if dtypes != want:
            raise EliteError(f"{self.label} has tensors {_describe(dtypes)}; the {self.spec.name} spec declares "
                             f"{_describe(want)}: {REBUILD_HINT}")
        return dtypes

    def _allocate(self) -> dict[str, DeviceBuffer]:
        """Device buffers at the profile's max shapes: addresses never change (CUDA graphs rely on it)."""
        for name, (_, _, hi) in self.profile.items():
            self.context.set_input_shape(name, hi)
        shapes = {**{n: p[2] for n, p in self.profile.items()},
                  **{t.name: dims_tuple(self.context.get_tensor_shape(t.name)) for t in self.spec.outputs}}
        return {n: DeviceBuffer(int(np.prod(s)) * self.dtypes[n].itemsize) for n, s in shapes.items()}

    def _set_shapes(self, dims: dict[str, int]) -> None:
        for t in self.spec.inputs:
            shape = self.spec.shape(t, dims)
            if self.shapes.get(t.name) == shape:
                continue
            lo, _, hi = self.profile[t.name]
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)) or not self.context.set_input_shape(t.name, shape):
                raise EliteError(f"{self.label}: input {t.name!r} of shape {list(shape)} is outside the engine's "
                                 f"profile (min {list(lo)}, max {list(hi)}); rebuild the bundle for this batch "
                                 "and image size")
            self.shapes[t.name] = shape
        for t in self.spec.outputs:
            got, want = dims_tuple(self.context.get_tensor_shape(t.name)), self.spec.shape(t, dims)
            if got != want:
                raise RuntimeError(f"{self.label}: output {t.name!r} has shape {list(got)}, expected {list(want)}")

    def _enqueue(self, stream: Stream) -> None:
        if not self.context.execute_async_v3(stream.ptr):
            raise RuntimeError(f"{self.label}: execute_async_v3 failed (TensorRT's log is above)")

    def _execute(self, stream: Stream) -> None:
        if not self.use_cuda_graph:
            self._enqueue(stream)
        elif self.graph is not None:
            self.graph.launch(stream)
        else:  # first run: a plain enqueue (TensorRT's deferred setup cannot be captured), then capture
            self._enqueue(stream)
            try:
                self.graph = CudaGraph(self._enqueue, stream)
            except RuntimeError as e:
                self.use_cuda_graph = False
                self.log(f"{self.label}: CUDA graph capture failed ({e}); running without it")

    def run(self, inputs: dict[str, np.ndarray], dims: dict[str, int]) -> dict[str, np.ndarray]:
        self.check_inputs(inputs, dims)
        self._set_shapes(dims)
        stream = self.shared.stream
        staged = {t.name: np.ascontiguousarray(inputs[t.name]) for t in self.spec.inputs}  # alive until the sync
        for name, array in staged.items():
            self.buffers[name].upload(array, stream)
        self._execute(stream)
        outs = self.output_buffers(dims)
        for name, array in outs.items():
            self.buffers[name].download(array, stream)
        stream.synchronize()
        return outs

    def close(self) -> None:
        if not self.buffers:  # closed already
            return
        if self.graph is not None:
            self.graph.close()
            self.graph = None
        for buf in self.buffers.values():
            buf.close()
        self.buffers = {}
        del self.context
        self.shared.release()


def _describe(dtypes: dict[str, np.dtype]) -> str:
    return ", ".join(f"{n}:{d}" for n, d in sorted(dtypes.items()))


def open_trt_runners(bundle: Bundle, names: tuple[str, ...], cuda_graphs: tuple[str, ...] = CUDA_GRAPH_GRAPHS,
                     log: Callable[[str], None] = print) -> dict[str, TrtRunner]:
    """{graph: TrtRunner} for the bundle's engines on this host's GPU; close each runner when done."""
    require_tensorrt()
    import tensorrt as trt

    device = current_device()
    cache = EngineCache(bundle.path("engines"))
    entries = {n: cache.find(n, OnnxFingerprint.from_manifest(bundle.graph_file(n, "fp16")), trt.__version__,
                             device.compute_capability) for n in names}
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engines = {n: deserialize(runtime, cache.read(e), e) for n, e in entries.items()}
    shared = SharedDevice(logger, runtime, max(e.device_memory_size_v2 for e in engines.values()))
    runners: dict[str, TrtRunner] = {}
    try:
        for n in names:
            label = f"{n} engine {os.path.basename(entries[n].path)}"
            runners[n] = TrtRunner(bundle.spec(n), engines[n], label, shared, n in cuda_graphs, log)
    except BaseException:
        for r in runners.values():
            r.close()
        if not runners:
            shared.release()
        raise
    return runners
