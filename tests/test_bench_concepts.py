"""scripts/bench_concepts.py (UNet step time vs concepts per prompt) on the toy bundle: the method and
its outputs; the SD-size numbers come from `--sd14` on a quiet machine."""
from __future__ import annotations

import importlib.util
import json

from conftest import ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("bench_concepts", ROOT / "scripts" / "bench_concepts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_concepts_times_every_concept_count_and_writes_json_and_table(toy_bundle, tmp_path):
    bench = load_script()
    out = tmp_path / "concepts.json"
    result = bench.main(["--bundle", str(toy_bundle), "--reps", "2", "--warmup", "0", "--threads", "1",
                         "--json", str(out)])
    rows = result["results"]
    assert [r["concepts"] for r in rows] == [1, 2, 3] and all(len(r["samples_ms"]) == 2 for r in rows)
    assert all(r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["min_ms"] > 0 for r in rows)
    assert rows[0]["added_vs_first"] == 0.0
    assert rows[2]["added_per_extra_concept"] == rows[2]["added_vs_first"] / 2
    assert json.loads(out.read_text())["results"][1]["concepts"] == 2
    table = (tmp_path / "concepts.md").read_text()
    assert table.count("\n| ") == 4 and "per extra concept" in table  # header + 3 rows


def test_each_extra_concept_adds_under_5_percent_of_an_sd_size_step_by_flops():
    """The SD 1.4 UNet on the meta device (no weights made): the local branch runs on the conditional rows
    only, and one more concept costs 3.4 % of the 256 px step's FLOPs (it was 7.1 % with the branch on
    the unconditional rows too)."""
    rows = load_script().sd14_flops(256, 3)
    assert [r["concepts"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["tflop"] < rows[1]["tflop"] < rows[2]["tflop"] < rows[3]["tflop"]
    assert abs(rows[0]["tflop"] - 0.3602) < 1e-3  # the step DESIGN.md measured (0.36 TFLOP at 256 px)
    assert 0.02 < rows[2]["added_per_extra_concept"] < 0.05
    assert abs(rows[3]["added_per_extra_concept"] - rows[2]["added_per_extra_concept"]) < 1e-6  # linear in C
