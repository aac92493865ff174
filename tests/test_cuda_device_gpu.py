"""GPU-only (skipped without cuda-python and a CUDA GPU): the cuda-python layer, and TrtRunner's own
logic (buffers at the profile's max shapes, shape checks, CUDA-graph capture and replay) driven
through a stand-in engine whose "inference" is a device-to-device copy of its input. TensorRT itself
is on no machine these tests run on; scripts/gpu_check.sh runs the real engines where it is."""
from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest

from elite_export.errors import EliteError
from elite_export.specs import GraphSpec, TensorSpec, Tolerance

if importlib.util.find_spec("cuda") is None:
    pytest.skip("cuda-python is not installed", allow_module_level=True)

from elite_export.runtime import cuda_device as cd  # noqa: E402

try:
    DEVICE = cd.current_device()
except EliteError as e:
    pytest.skip(str(e), allow_module_level=True)


def test_device_reports_a_compute_capability():
    major, minor = DEVICE.compute_capability.split(".")
    assert DEVICE.name and int(major) >= 5 and minor.isdigit()


def test_upload_download_roundtrip():
    stream, host = cd.Stream(), np.arange(1000, dtype=np.float32)
    buf = cd.DeviceBuffer(host.nbytes)
    back = np.zeros_like(host)
    buf.upload(host, stream)
    buf.download(back, stream)
    stream.synchronize()
    np.testing.assert_array_equal(back, host)
    with pytest.raises(ValueError, match="does not fit"):
        buf.upload(np.zeros(1001, np.float32), stream)
    buf.close()
    stream.close()


def d2d_copy(dst: int, src: int, nbytes: int, stream_ptr: int) -> None:
    rt = cd.cudart()
    cd.call(rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream_ptr),
            "cudaMemcpyAsync D2D")


def test_cuda_graph_replays_on_fixed_buffers():
    stream = cd.Stream()
    a, b = cd.DeviceBuffer(64), cd.DeviceBuffer(64)
    graph = cd.CudaGraph(lambda s: d2d_copy(b.ptr, a.ptr, 64, s.ptr), stream)
    for value in (1.0, 2.0):  # new data in a, same addresses: the replay copies the new data
        out = np.zeros(16, np.float32)
        a.upload(np.full(16, value, np.float32), stream)
        graph.launch(stream)
        b.download(out, stream)
        stream.synchronize()
        assert (out == value).all()
    graph.close()
    a.close(), b.close(), stream.close()


# --- TrtRunner through a stand-in engine ---------------------------------------------------------
class CopySpec(GraphSpec):
    name = "copy"
    inputs = (TensorSpec("x", ("B", "D")),)
    outputs = (TensorSpec("y", ("B", "D")),)
    tolerance = {"fp32": Tolerance(0.0, 0.0)}


class CopyContext:
    """IExecutionContext's name-based API; execute_async_v3 copies x to y on the stream."""

    def __init__(self, engine: "CopyEngine"):
        self.engine, self.shapes, self.addresses, self.runs = engine, {}, {}, 0

    def set_device_memory(self, ptr: int, size: int) -> None:
        assert ptr and size >= self.engine.device_memory_size_v2

    def set_input_shape(self, name, shape) -> bool:
        lo, _, hi = self.engine.profile
        self.shapes[name] = tuple(shape)
        return all(a <= s <= b for a, s, b in zip(lo, shape, hi))

    def get_tensor_shape(self, name):
        return self.shapes["x"]

    def set_tensor_address(self, name, ptr) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_ptr: int) -> bool:
        self.runs += 1
        d2d_copy(self.addresses["y"], self.addresses["x"], int(np.prod(self.shapes["x"])) * 4, stream_ptr)
        return True


class CopyEngine:
    device_memory_size_v2 = 4096
    num_io_tensors = 2

    def __init__(self, profile, dtype=np.float32):
        self.profile, self.dtype, self.contexts = profile, dtype, []

    def get_tensor_name(self, i):
        return ("x", "y")[i]

    def get_tensor_dtype(self, name):
        return self.dtype

    def get_tensor_profile_shape(self, name, index):
        return list(self.profile)

    def create_execution_context(self, strategy):
        assert strategy == "USER_MANAGED"
        self.contexts.append(CopyContext(self))
        return self.contexts[-1]


@pytest.fixture
def runner_for(monkeypatch):
    stand_in = types.SimpleNamespace(ExecutionContextAllocationStrategy=types.SimpleNamespace(
        USER_MANAGED="USER_MANAGED"), nptype=lambda dtype: dtype)
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in)
    from elite_export.runtime.tensorrt_backend import SharedDevice, TrtRunner

    made = []

    def make(profile, dtype=np.float32, cuda_graph=False):
        shared = SharedDevice(None, None, CopyEngine.device_memory_size_v2)
        made.append(TrtRunner(CopySpec(), CopyEngine(profile, dtype), "copy engine copy-0.plan", shared,
                              cuda_graph, log=lambda _: None))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_runner_serves_every_shape_of_a_dynamic_profile(runner_for):
    runner = runner_for(((1, 8), (2, 8), (4, 8)))
    assert runner.buffers["x"].nbytes == runner.buffers["y"].nbytes == 4 * 8 * 4  # at the max shape
    for batch in (1, 4, 2):
        x = np.random.default_rng(batch).standard_normal((batch, 8)).astype(np.float32)
        out = runner.run({"x": x}, {"B": batch, "D": 8})
        np.testing.assert_array_equal(out["y"], x)
    assert runner.graph is None
    with pytest.raises(EliteError, match=r"copy engine copy-0.plan: input 'x' of shape \[5, 8\] is outside the "
                                         r"engine's profile \(min \[1, 8\], max \[4, 8\]\)"):
        runner.run({"x": np.zeros((5, 8), np.float32)}, {"B": 5, "D": 8})
    with pytest.raises(ValueError, match=r"input 'x' is float32\[2, 7\], expected float32\[2, 8\]"):
        runner.run({"x": np.zeros((2, 7), np.float32)}, {"B": 2, "D": 8})


def test_runner_replays_a_captured_graph_for_a_static_profile(runner_for):
    runner = runner_for(((2, 8),) * 3, cuda_graph=True)
    context = runner.engine.contexts[0]
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((2, 8)).astype(np.float32)
        np.testing.assert_array_equal(runner.run({"x": x}, {"B": 2, "D": 8})["y"], x)
    # one real enqueue, one under capture; runs 2 and 3 were replays of the graph
    assert runner.graph is not None and context.runs == 2


def test_runner_refuses_an_engine_whose_io_is_not_the_spec(runner_for):
    with pytest.raises(EliteError, match=r"copy engine copy-0.plan has tensors x:float16, y:float16; the copy "
                                         r"spec declares x:float32, y:float32"):
        runner_for(((1, 8),) * 3, dtype=np.float16)
