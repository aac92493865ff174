"""The prepared GPU scripts, as far as they run here: the parity script end to end on the CPU provider
(--device cpu: fp16 graphs and the runtime instead of the CUDA ones), the shell scripts parse, the
benchmark parts merge into one table, and the carried wheel parts can never be committed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_parity_script_runs_end_to_end_on_the_cpu(toy_bundle, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "toy").symlink_to(toy_bundle)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_ort_parity.py"), str(work), "--device", "cpu",
                          "--json", str(tmp_path / "p.json"), "--markdown", str(tmp_path / "p.md")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "p.json").read_text())
    assert {r["graph"] for r in result["graphs"]} == {"concept_encoder", "text_encoder", "unet", "vae_decoder"}
    assert {r["precision"] for r in result["graphs"]} == {"fp16"} and all(r["passed"] for r in result["graphs"])
    assert [r["what"].split(", ")[-1] for r in result["images"]] == ["20 LMS steps", "100 LMS steps"]
    assert result["skipped"] == {"sd14": "bundle not built (scripts/gpu_prepare.sh)"}
    assert "| unet | noise_pred | fp16 |" in (tmp_path / "p.md").read_text()


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.sh")))
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)


def test_wheel_parts_and_wheels_are_git_ignored():
    for path in (".ortgpu1", ".ortgpu5", ".whl"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


def test_benchmark_parts_merge(tmp_path):
    from test_bench_cuda_ways import gpu_shaped_result

    full = gpu_shaped_result()
    parts = []
    for i, names in enumerate((["authors", "reference"], ["runtime-onnxruntime-cuda", "runtime-onnxruntime-cuda-graph"],
                               ["compiled"])):
        part = {**full, "ways": {n: full["ways"][n] for n in names}, "options": {**full["options"], "ways": names}}
        parts.append(tmp_path / f"bench-{i}.json")
        parts[-1].write_text(json.dumps(part))
    merged = tmp_path / "bench.json"
    printed = subprocess.run([sys.executable, "-m", "elite_export.bench.report", *map(str, parts), "--json",
                              str(merged)], capture_output=True, text=True, check=True).stdout
    assert set(json.loads(merged.read_text())["ways"]) == set(full["ways"])
    assert "c-graph vs b'" in printed and "(a) authors" in printed
