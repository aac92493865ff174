"""Load benchmark of `elite-run serve` next to `elite-run --batch-size` on the same bundle, in one run.

    python scripts/bench_serve.py --bundle demo_out/bundle --json benchmarks/results/serve-toy-$(date +%F).json \
        --markdown benchmarks/results/serve-toy-$(date +%F).md

1. elite-run's own throughput: `elite-run --concept C --prompt ... --batch-size b --json` for b = 1 and
   b = --max-batch (child processes; its images/s counts the pipeline calls, not loading or PNG files).
2. The service (Ray Serve started in this process, loopback only) with batching on (--max-batch) and
   off (max batch 1): 1, 4, 8 closed-loop clients, each sending --requests requests one after another
   (a concept id, the same settings, distinct seeds). Per configuration: images/s, p50/p95 latency,
   mean images per pipeline call, and the service's own time per request (HTTP + Ray + validation +
   queue + PNG): latency minus the time of the pipeline call that made the image (X-Elite-Pipeline-Ms).
Targets (SD-size bundle): overhead <= 3 % of a request; 8 clients >= 95 % of `elite-run --batch-size 4`.

Nothing is downloaded; traffic goes to 127.0.0.1 only; every loop is bounded.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE, MASK = os.path.join(ROOT, "calib/concepts/7.jpg"), os.path.join(ROOT, "calib/concepts/7_bg.png")
PROMPT = "a photo of a S on the beach"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True, help="Bundle folder (toy, or SD-size: see benchmarks/results/README.md)")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--scheduler", default="lms")
    p.add_argument("--clients", default="1,4,8", help="Concurrent clients, comma-separated.")
    p.add_argument("--requests", type=int, default=4, help="Requests per client per configuration.")
    p.add_argument("--max-batch", type=int, default=4, help="The service's batch and elite-run's --batch-size "
                   "(capped at the bundle's max).")
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", dest="json_path")
    p.add_argument("--markdown", dest="md_path")
    return p.parse_args(argv)


def elite_run(*args: str) -> str:
    cmd = [sys.executable, "-c", "import sys; from elite_export.runtime.cli import main; sys.exit(main())", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"elite-run {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def cli_baseline(a, concept: str, batch: int, images: int, out: str) -> dict:
    """`elite-run --batch-size batch` on `images` requests: the images/s it prints (pipeline calls only, the
    first, cold one included; graph loading and PNG files not counted)."""
    args = ["--bundle", a.bundle, "--concept", concept, "--steps", str(a.steps), "--scheduler", a.scheduler,
            "--height", str(a.height), "--width", str(a.width), "--backend", a.backend, "--device", a.device,
            "--threads", str(a.threads), "--quiet", "--json", "-o", out, "--batch-size", str(batch)]
    t0 = time.perf_counter()
    result = json.loads(elite_run(*args, *[x for _ in range(images) for x in ("--prompt", PROMPT)]))
    total = result["stages"]["total"]
    return {"batch": batch, "images": images, "images_per_s": result["images_per_second"],
            "ms_per_image": 1e3 * total["seconds"] / images, "ms_per_call": 1e3 * total["seconds"] / total["calls"],
            "process_wall_s": time.perf_counter() - t0}


async def run_clients(url: str, cid: str, a, clients: int) -> dict:
    import httpx

    body = {"concept_id": cid, "prompt": PROMPT, "steps": a.steps, "scheduler": a.scheduler, "height": a.height,
            "width": a.width}
    latencies, overheads, batches, errors = [], [], [], []
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600)) as c:
        async def client(k: int):
            for i in range(a.requests):
                t0 = time.perf_counter()
                r = await c.post("/v1/generate", json={**body, "seed": 1000 * k + i})
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    continue
                latencies.append(dt)
                overheads.append(dt - float(r.headers["x-elite-pipeline-ms"]) / 1e3)
                batches.append(int(r.headers["x-elite-batch"]))

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    q = (lambda f: lat[min(len(lat) - 1, int(round(f * (len(lat) - 1))))]) if lat else (lambda f: float("nan"))
    return {"clients": clients, "requests": clients * a.requests, "errors": errors, "wall_s": wall,
            "images_per_s": len(lat) / wall, "p50_ms": 1e3 * q(0.5), "p95_ms": 1e3 * q(0.95),
            "mean_batch": statistics.fmean(batches) if batches else None,
            "overhead_ms": 1e3 * statistics.median(overheads) if overheads else None,
            "overhead_pct": 100 * statistics.median(o / x for o, x in zip(overheads, latencies)) if lat else None}


async def encode(url: str) -> str:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        r = await c.post("/v1/encode", files={"image": open(IMAGE, "rb"), "mask": open(MASK, "rb")})
        r.raise_for_status()
        return r.json()["concept_id"]


def service_runs(a, batch: int, client_counts: list[int]) -> dict:
    from ray import serve

    from elite_export.runtime.serve import launch
    from elite_export.runtime.serve.app import application
    from elite_export.runtime.serve.options import ServeOptions

    out = {}
    opts = ServeOptions(bundle=a.bundle, backend=a.backend, device=a.device, threads=a.threads, max_batch=batch,
                        batch_wait_ms=a.batch_wait_ms, max_queue=max(client_counts) * 2, timeout_s=3600)
    url = launch.start(opts, "127.0.0.1", 0)
    try:
        for mode, max_batch in (("batching on", batch), ("batching off", 1)):
            if max_batch != opts.max_batch:  # redeploy: new replicas, same Ray and proxy
                opts.max_batch = max_batch
                serve.run(application(opts, launch.check_bundle(opts)), name=launch.APP_NAME, route_prefix="/",
                          logging_config={"log_level": "WARNING", "enable_access_log": False})
            cid = asyncio.run(encode(url))
            asyncio.run(run_clients(url, cid, argparse.Namespace(**{**vars(a), "requests": 1}), 1))  # warm
            out[mode] = [asyncio.run(run_clients(url, cid, a, n)) for n in client_counts]
            for row in out[mode]:
                print(f"  {mode}, {row['clients']} client(s): {row['images_per_s']:.3f} images/s, p50 "
                      f"{row['p50_ms']:.0f} ms, overhead {row['overhead_ms']:.1f} ms", flush=True)
    finally:
        launch.stop()
    return out


def machine() -> dict:
    import onnxruntime
    import ray

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_1m": os.getloadavg()[0], "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "ray": ray.__version__, "date": datetime.now().strftime("%Y-%m-%d %H:%M")}


def markdown(res: dict) -> str:
    a, cli = res["settings"], res["elite_run"]
    ref = next(c for c in cli if c["batch"] == res["batch"])
    single = next(c for c in cli if c["batch"] == 1)
    lines = [f"### elite-run serve vs elite-run, {a['bundle_name']}, {a['height']}x{a['width']}, {a['steps']} steps "
             f"({a['scheduler']}), {a['backend']}/{a['device']}, threads {a['threads'] or 'onnxruntime default'}",
             "", f"{res['machine']['date']}; {res['machine']['cores']} cores, load {res['machine']['load_1m']:.2f} at "
             f"start; ray {res['machine']['ray']}, onnxruntime {res['machine']['onnxruntime']}; {a['requests']} "
             f"requests per client; batch wait {a['batch_wait_ms']:g} ms", "",
             "| run | clients | images/s | vs elite-run b=%d | p50 ms | p95 ms | images/call | latency - pipeline ms |"
             % res["batch"], "|---|---|---|---|---|---|---|---|"]
    for c in cli:
        lines.append(f"| elite-run --batch-size {c['batch']} | - | {c['images_per_s']:.3f} | "
                     f"{100 * c['images_per_s'] / ref['images_per_s']:.0f} % | {c['ms_per_call']:.0f} (per call) | - | "
                     f"{c['batch']} | - |")
    for mode, rows in res["service"].items():
        for r in rows:
            lines.append(f"| serve, {mode} | {r['clients']} | {r['images_per_s']:.3f} | "
                         f"{100 * r['images_per_s'] / ref['images_per_s']:.0f} % | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} "
                         f"| {r['mean_batch']:.2f} | {r['overhead_ms']:.1f} ({r['overhead_pct']:.1f} %) |")
    off1 = res["service"]["batching off"][0]
    eight = [r for r in res["service"]["batching on"] if r["clients"] == 8]
    lines += ["", f"Service overhead per request (1 client, batching off): {off1['overhead_ms']:.1f} ms = "
              f"{off1['overhead_pct']:.2f} % of a request (target <= 3 %); latency vs elite-run --batch-size 1's "
              f"{single['ms_per_image']:.0f} ms per image: {off1['p50_ms'] - single['ms_per_image']:+.1f} ms. "
              "(latency - pipeline: the service's own time with one client; with more, mostly queueing.)"]
    if eight:
        lines.append(f"8 clients, batching on: {100 * eight[0]['images_per_s'] / ref['images_per_s']:.1f} % of "
                     f"elite-run --batch-size {res['batch']}'s images/s (target >= 95 %).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    a = parse_args(argv)
    from elite_export.runtime.bundle import Bundle

    bundle = Bundle.open(a.bundle)
    batch = min(a.max_batch, bundle.ranges.batch[2])
    clients = [int(c) for c in a.clients.split(",")]
    res = {"settings": {**vars(a), "bundle_name": os.path.basename(os.path.normpath(a.bundle)),
                        "bundle_id": bundle.id}, "batch": batch, "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        concept = os.path.join(tmp, "c.concept")
        elite_run("encode", "--bundle", a.bundle, "--image", IMAGE, "--mask", MASK, "-o", concept)
        images = max(clients) * a.requests
        res["elite_run"] = []
        for b in sorted({1, batch}):
            res["elite_run"].append(cli_baseline(a, concept, b, images - images % b or b, os.path.join(tmp, f"b{b}")))
            print(f"  elite-run --batch-size {b}: {res['elite_run'][-1]['images_per_s']:.3f} images/s", flush=True)
    res["service"] = service_runs(a, batch, clients)
    res["machine"]["load_1m_end"] = os.getloadavg()[0]
    text = markdown(res)
    print(text)
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump(res, f, indent=1)
    if a.md_path:
        with open(a.md_path, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
