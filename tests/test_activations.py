"""fp16 graphs at the edges of the profile: no stage gives NaN/inf on the calibration set, and the
largest |x| per graph is measured (elite-export activations)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from elite_export.activations import FP16_MAX, PeakRunner, edge_runs
from elite_export.runtime.backends import OrtRunner
from elite_export.specs import GraphSpec, ShapeRanges, TensorSpec, Tolerance


class ProbeSpec(GraphSpec):
    name = "probe"
    inputs = (TensorSpec("x", ("B", 4)),)
    outputs = (TensorSpec("y", ("B", 4)),)
    tolerance = {"fp16": Tolerance(0, 0)}


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> str:
    """fp32 x -> fp16: a = 300x (overflows past |x| > 218), r = sqrt(a) (NaN where a < 0),
    l = x + mask (a Softmax's logits, masked with -65504), y = fp32(softmax(l) + r)."""
    f16 = TensorProto.FLOAT16
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=f16),
             helper.make_node("Mul", ["h", "k300"], ["a"]),
             helper.make_node("Sqrt", ["a"], ["r"]),
             helper.make_node("Add", ["h", "mask"], ["l"]),
             helper.make_node("Softmax", ["l"], ["p"], axis=-1),
             helper.make_node("Add", ["p", "r"], ["s"]),
             helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    inits = [helper.make_tensor("k300", f16, [], [300.0]),
             helper.make_tensor("mask", f16, [4], [0.0, -65504.0, 0.0, 0.0])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])], inits)
    path = str(tmp_path_factory.mktemp("probe") / "probe.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_peak_runner_measures_each_tensor_in_its_own_dtype(probe):
    spec = ProbeSpec()
    runner = PeakRunner(spec, probe)
    assert set(runner.peaks) == {"h", "a", "r", "l", "s"}  # "p" is bounded (softmax), "y" a widening cast
    assert runner.peaks["l"].logit and not runner.peaks["a"].logit
    x = np.array([[1.0, 2.0, 3.0, 4.5], [0.5, 0.25, 2.0, 1.0]], np.float32)  # [2,4]
    runner.run_label = "small"
    out = runner.run({"x": x}, {"B": 2})
    np.testing.assert_array_equal(out["y"], OrtRunner(spec, probe).run({"x": x}, {"B": 2})["y"])
    a16 = x.astype(np.float16) * np.float16(300)  # what the graph computes, independently
    assert runner.peaks["a"].max_abs == float(np.abs(a16).max()) == 1350.0
    assert runner.peaks["r"].max_abs == float(np.sqrt(a16).max())
    assert runner.peaks["l"].max_abs == 4.5  # the logits' positive side: the -65504 mask is by design
    assert not any(p.nonfinite for p in runner.peaks.values())
    runner.run_label = "negative"
    runner.run({"x": np.array([[-1.0, 0, 0, 0]], np.float32)}, {"B": 1})
    assert runner.peaks["r"].nonfinite and not runner.peaks["a"].nonfinite  # sqrt(-300) is NaN
    runner.run_label = "large"
    runner.run({"x": np.array([[250.0, 0, 0, 0]], np.float32)}, {"B": 1})
    a = runner.peaks["a"]  # 75000 does not fit fp16: inf, as a GPU would hold it
    assert a.nonfinite and a.max_abs == float("inf") and a.run == "large"
    assert runner.peaks["h"].max_abs == 250.0 and not runner.peaks["h"].nonfinite


def test_edge_runs_cover_every_edge_of_the_profile():
    ranges = ShapeRanges((1, 2, 3), (256, 384, 512))
    runs = edge_runs(ranges)
    assert {(r.size, r.batch) for r in runs} == {(256, 1), (256, 3), (512, 1), (512, 3)}
    assert {r.guidance for r in runs} == {1.0, 20.0}
    concepts, prompts = list(range(11)), tuple(f"p{i} S" for i in range(10))
    for size in (256, 512):
        rows = [q for r in runs if r.size == size for q in r.requests(concepts, prompts, 0)]
        assert {q.lam for q in rows if q.mode == "local"} == {0.0, 1.0}, size
    assert any(q.mode == "global" for r in runs for q in r.requests(concepts, prompts, 0))


def test_fp16_graphs_stay_finite_at_the_profile_edges_on_the_calibration_set(toy_bundle):
    """The real fp16 graphs on ONNX Runtime, generating at every edge: exit 0 means no stage gave NaN/inf
    (the pipeline's per-row checks) and no tensor overflowed or reached 65504 (PeakRunner)."""
    from elite_export.cli import main

    result = CliRunner().invoke(main, ["activations", str(toy_bundle), "--steps", "2", "--top", "2"])
    print(result.output)  # the table, for the record (pytest -s)
    assert result.exit_code == 0, (result.output, result.exception)
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[2:6]}
    assert set(rows) == {"concept_encoder", "text_encoder", "unet", "vae_decoder"}
    for graph, cells in rows.items():
        assert cells[1] == "fp16" and cells[-1] == "none", cells
        assert 0 < float(cells[3].replace(",", "")) < FP16_MAX, cells
    assert "512px b3 lam1 g20" in result.output and "calibration set" in result.output
