"""A benchmark result (bench.run_bench's dict) as text tables and as markdown."""
from __future__ import annotations

import json
import sys

from elite_export.bench.ways import STAGES
from elite_export.runtime.console import format_table

LABELS = {"authors": "(a) authors", "reference": "(b) reference", "compiled": "(b') reference, torch.compile",
          "runtime-onnxruntime": "(c) runtime ORT", "runtime-onnxruntime-cuda": "(c) runtime ORT-CUDA",
          "runtime-onnxruntime-cuda-graph": "(c) runtime ORT-CUDA + CUDA graph", "runtime-tensorrt": "(c) runtime TRT"}
SHORT = {"authors": "a", "reference": "b", "compiled": "b'", "runtime-onnxruntime": "c-ort",
         "runtime-onnxruntime-cuda": "c-cuda", "runtime-onnxruntime-cuda-graph": "c-graph", "runtime-tensorrt": "c-trt"}
EXTRAS = ("precision", "loop_ms_per_step", "unet_copied_kib_per_step", "unet_copied_kib_per_generation",
          "images_vs_plain_max_abs", "compile_seconds", "setup_seconds")


def ways(result: dict) -> list[str]:
    return [w for w in LABELS if w in result["ways"]]


def result_stages(result: dict) -> list[str]:
    """The stages measured (STAGES, and generate_<scheduler> where more schedulers ran)."""
    found = {s for w in result["ways"].values() for s in w["stages"]}
    return [s for s in STAGES if s in found] + sorted(found - set(STAGES))


def median(result: dict, way: str, stage: str) -> float:
    return result["ways"][way]["stages"][stage]["median_ms"]


def time_table(result: dict) -> tuple[list[str], list[list]]:
    """ms per stage and way: median [min-max]; then peak memory."""
    ws = ways(result)
    rows = []
    for stage in result_stages(result):
        cells = []
        for w in ws:
            s = result["ways"][w]["stages"][stage]
            cells.append(f"{s['median_ms']:,.0f} [{s['min_ms']:,.0f}-{s['max_ms']:,.0f}]")
        rows.append([stage, *cells])
    rows.append(["peak RSS GiB", *[result["ways"][w]["peak_rss_gib"] for w in ws]])
    if any("peak_device_gib" in result["ways"][w] for w in ws):
        rows.append(["peak device GiB", *[result["ways"][w].get("peak_device_gib", "") for w in ws]])
    return ["stage (ms)", *[LABELS[w] for w in ws]], rows


def speedup_table(result: dict) -> tuple[list[str], list[list]]:
    """How many times faster than (a) and than (b): a/x and b/x per stage."""
    ws = ways(result)
    pairs = [(base, w) for base in ("authors", "reference", "compiled") if base in ws for w in ws
             if w != base and ws.index(w) > ws.index(base)]
    rows = [[stage, *[f"{median(result, base, stage) / median(result, w, stage):.2f}x" for base, w in pairs]]
            for stage in result_stages(result)]
    return ["speedup", *[f"{SHORT[w]} vs {SHORT[base]}" for base, w in pairs]], rows


def overhead_table(result: dict) -> tuple[list[str], list[list]]:
    """Per step: the loop's own time (step - UNet call) + the call's (runner.run - bare session run)."""
    rows = [[bundle, o["steps"], o["step_ms"], o["unet_call_ms"], o["loop_ms"], o["graph_ms"], o["call_overhead_ms"],
             f"{o['overhead_ms']:.3f} ({o['overhead_pct']:.2f}%)"]
            for bundle, o in result.get("overhead", {}).items() if o]
    return ["bundle", "steps", "step ms", "unet call ms", "loop ms", "bare graph ms", "call overhead ms",
            "overhead ms (% of step)"], rows


def extras_table(result: dict) -> tuple[list[str], list[list]]:
    """Per way, what it measured besides the stages (see bench/gpu.py)."""
    ws = [w for w in ways(result) if any(k in result["ways"][w] for k in EXTRAS[:-1])]
    rows = [[k, *[result["ways"][w].get(k, "") for w in ws]] for k in EXTRAS
            if any(k in result["ways"][w] for w in ws)]
    return ["way", *[LABELS[w] for w in ws]], rows


def machine_line(result: dict) -> str:
    m, o = result["machine"], result["options"]
    v = m["versions"]
    gpu = f", GPU {m['gpu']} (CUDA {m['cuda']})" if "gpu" in m else ""
    return (f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB{gpu}; {m['threads']} threads; "
            f"load {m['load_average'][0]:.2f} at start, {result['load_average_end'][0]:.2f} at end; "
            f"{o['size']}x{o['size']} px, batch {o['batch']}, {o['steps']} steps ({'/'.join(o.get('schedulers', ['lms'])).upper()}), {o['dtype']}, "
            f"{o['warmup']} warm-up + {o['reps']} reps; "
            + ", ".join(f"{k} {v[k]}" for k in ("torch", "diffusers", "transformers", "onnxruntime") if k in v))


def report_tables(result: dict) -> list[tuple[str, list[str], list[list]]]:
    """The report's tables in order, (name, headers, rows): times, speed-ups, then extras and the
    runtime overhead where they have rows. text_report and markdown render the same list."""
    tables = [("time", *time_table(result)), ("speedup", *speedup_table(result)),
              ("extras", *extras_table(result)), ("overhead", *overhead_table(result))]
    return [t for t in tables if t[0] in ("time", "speedup") or t[2]]


def text_report(result: dict) -> str:
    parts = [machine_line(result)]
    for name, headers, rows in report_tables(result):
        parts.append(("runtime overhead per step\n" if name == "overhead" else "") + format_table(headers, rows))
    parts += [f"{w}: n/a ({why})" for w, why in result.get("unavailable", {}).items()]
    return "\n\n".join(parts)


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(c) -> str:
        return f"{c:,.3f}" if isinstance(c, float) and abs(c) < 10 else f"{c:,.1f}" if isinstance(c, float) else str(c)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows])


def markdown(result: dict) -> str:
    parts = [f"### {result['date']}: {result['options']['device']}, {result['options']['size']} px",
             machine_line(result)]
    for name, headers, rows in report_tables(result):
        parts.append(("Runtime overhead per step (ONNX Runtime):\n\n" if name == "overhead" else "")
                     + md_table(headers, rows))
    parts += [f"- {w}: n/a ({why})" for w, why in result.get("unavailable", {}).items()]
    return "\n\n".join(parts) + "\n"


def merge(results: list[dict]) -> dict:
    """One result from several runs' (gpu_check.sh runs the ways in separate processes): the first's
    machine and options, every run's ways, unavailable ways and overheads."""
    out = {**results[0], "ways": {}, "unavailable": {}, "overhead": {}}
    for r in results:
        for key in ("ways", "unavailable", "overhead"):
            out[key].update(r.get(key, {}))
    out["load_average_end"] = results[-1]["load_average_end"]
    out["options"] = {**results[0]["options"], "ways": [w for r in results for w in r["options"].get("ways", [])]}
    return out


def main(argv: list[str]) -> int:
    """python -m elite_export.bench.report RESULT.json... [--json MERGED.json]: their tables as markdown."""
    out = argv[argv.index("--json") + 1] if "--json" in argv else None
    paths = [a for i, a in enumerate(argv) if a != "--json" and (i == 0 or argv[i - 1] != "--json")]
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    if not results:
        print("no results given", file=sys.stderr)
        return 1
    result = merge(results)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
