"""`elite-run serve` end to end: the real CLI starts Ray Serve on a free loopback port with the toy
bundle; clients talk HTTP to 127.0.0.1 only, every loop bounded in count and time.

The bundle's UNet gives NaN on rows whose placeholder is token 5 ("a photo of a S"; test_nonfinite's
poison_unet, x * 1 on every other row): the service's per-row failure is tested alongside, and the CLI
references run on the same bundle.

One service for the module (its tests share one xdist worker under `make test`: conftest.py's
XDIST_FILE_GROUPS); the test that kills the replica runs last."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import concept_files

pytest.importorskip("ray.serve", reason="the serve extra is not installed: pip install 'elite-export[serve]'")
httpx = pytest.importorskip("httpx")

IMAGE, MASK = concept_files(7)
IMAGE2, MASK2 = concept_files(4)
MAX_QUEUE, STEPS, START_S = 10, 6, 300
P1, P2, Q, R = "a S in the style of Van Gogh", "a S on the beach", "a S in the jungle", "a S"
TWO = "a S and a V on the beach"  # composition: concept 1 is S, concept 2 is V
POISONED = "a photo of a S"  # placeholder at token 5: NaN in this bundle's UNet


@dataclass
class Service:
    url: str
    proc: subprocess.Popen
    log: Path

    def client(self, timeout: float = 120) -> "httpx.AsyncClient":
        return httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(timeout),
                                 limits=httpx.Limits(max_connections=64))


def stop(proc: subprocess.Popen) -> None:
    """SIGINT (the service shuts Ray down), then SIGKILL to its process group if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@pytest.fixture(scope="module")
def serve_bundle(toy_bundle, tmp_path_factory):
    from test_nonfinite import poison_unet

    bundle = tmp_path_factory.mktemp("serve-bundle") / "bundle"
    shutil.copytree(toy_bundle, bundle)
    poison_unet(bundle, 5)
    return bundle


@pytest.fixture(scope="module")
def service(serve_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve")
    log = out / "serve.log"
    cmd = [sys.executable, "-c", "from elite_export.runtime.cli import main; main()", "serve", "--bundle",
           str(serve_bundle), "--port", "0", "--batch-wait-ms", "300", "--max-queue", str(MAX_QUEUE), "--timeout-s", "120"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=out, start_new_session=True)
    try:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            found = re.search(r"ready at (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
            if found:
                break
            assert proc.poll() is None, f"elite-run serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        else:
            raise AssertionError(f"not ready within {START_S} s:\n{log.read_text()[-3000:]}")
        yield Service(found.group(1), proc, log)
    finally:
        stop(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]


def encode(service, image: str, mask: str) -> str:
    async def go():
        async with service.client() as c:
            r = await c.post("/v1/encode", files={"image": (os.path.basename(image), open(image, "rb").read()),
                                                  "mask": (os.path.basename(mask), open(mask, "rb").read())})
            assert r.status_code == 200, r.text
            return r.json()
    return asyncio.run(go())["concept_id"]


@pytest.fixture(scope="module")
def concept_id(service):
    return encode(service, IMAGE, MASK)


def cli_images(bundle, tmp_path: Path, name: str, prompts: list[str], *extra: str,
               concepts: tuple[str, ...] = ("--image", IMAGE, "--mask", MASK)) -> list[tuple[np.ndarray, dict]]:
    from elite_export.runtime.cli import main as elite_run
    from elite_export.runtime.images import read_png_meta

    out = tmp_path / name
    args = ["--bundle", str(bundle), *concepts, "--steps", str(STEPS), "--height", "256",
            "--quiet", "-o", str(out), *extra] + [x for p in prompts for x in ("--prompt", p)]
    result = CliRunner().invoke(elite_run, args)
    assert result.exit_code == 0, result.output
    return [(np.asarray(Image.open(f)), read_png_meta(str(f))) for f in sorted(out.glob("*.png"))]


def png_image(data: bytes) -> tuple[np.ndarray, dict]:
    img = Image.open(io.BytesIO(data))
    return np.asarray(img), json.loads(img.text["elite"])


def metric(text: str, name: str) -> dict[str, float]:
    """{label string: value} of one metric in Prometheus text."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^{name}\{{(.*?)\}} (\S+)$", text, re.M)}


def test_health_ready_and_the_openapi_page(service, serve_bundle):
    from elite_export.runtime.bundle import Bundle

    async def go():
        async with service.client() as c:
            return [await c.get(p) for p in ("/health", "/ready", "/openapi.json", "/docs")]
    health, ready, openapi, docs = asyncio.run(go())
    assert health.status_code == ready.status_code == openapi.status_code == docs.status_code == 200
    info = ready.json()
    assert info["ready"] and info["bundle_id"] == Bundle.open(str(serve_bundle)).id and info["max_batch"] == 3
    paths = openapi.json()["paths"]
    body = paths["/v1/generate"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body) and "prompt" in body["application/json"]["schema"][
        "properties"] and "/v1/encode" in paths and "swagger" in docs.text.lower()


def test_concurrent_clients_get_the_cli_images_and_a_nan_row_fails_alone(service, concept_id, serve_bundle, tmp_path):
    run1 = cli_images(serve_bundle, tmp_path, "run1", [P1, P1, P2], "--seed", "10", "--width", "256")
    run2 = cli_images(serve_bundle, tmp_path, "run2", [Q], "--seed", "20", "--width", "256", "--mode", "global",
                      "--words", "3", "--lambda", "0.6")
    run3 = cli_images(serve_bundle, tmp_path, "run3", [R], "--seed", "30", "--width", "320")
    pairs = ("--image", IMAGE, "--mask", MASK, "--image", IMAGE2, "--mask", MASK2)
    run4 = cli_images(serve_bundle, tmp_path, "run4", [TWO], "--seed", "50", "--width", "256", "--compose",
                      "--lambda", "0.8", "--lambda", "0.5", concepts=pairs)
    second_id = encode(service, IMAGE2, MASK2)
    base = {"concept_id": concept_id, "steps": STEPS, "height": 256, "width": 256}
    two_files = [("image", ("7.jpg", open(IMAGE, "rb").read())), ("mask", ("7_bg.png", open(MASK, "rb").read())),
                 ("image", (os.path.basename(IMAGE2), open(IMAGE2, "rb").read())),
                 ("mask", (os.path.basename(MASK2), open(MASK2, "rb").read()))]
    jobs = [  # (body or (form, files), the CLI images it must equal)
        ({**base, "prompt": P1, "n": 2, "seed": 10}, run1[:2]),
        ({**base, "prompt": P2, "seed": 12}, run1[2:]),
        ({**base, "prompt": P1, "seed": 11}, run1[1:2]),
        (({"prompt": Q, "seed": "20", "mode": "global", "words": "3", "lambda": "0.6", "steps": str(STEPS),
           "height": "256", "width": "256"},
          {"image": ("7.jpg", open(IMAGE, "rb").read()), "mask": ("7_bg.png", open(MASK, "rb").read())}), run2),
        ({**base, "prompt": R, "seed": 30, "width": 320}, run3),
        ({**base, "prompt": P2, "seed": 12, "format": "json"}, run1[2:]),
        ({**base, "prompt": POISONED, "seed": 40}, None),  # batched with the others: fails alone
        # two concepts in one prompt, batched with one-concept rows: by ids, and as two uploaded pairs
        ({**base, "concept_id": [concept_id, second_id], "prompt": TWO, "seed": 50, "lambda": [0.8, 0.5]}, run4),
        (({"prompt": TWO, "seed": "50", "lambda": ["0.8", "0.5"], "steps": str(STEPS), "height": "256",
           "width": "256"}, two_files), run4),
    ]

    async def go():
        async with service.client() as c:
            calls = [c.post("/v1/generate", data=b[0], files=b[1]) if isinstance(b, tuple) else
                     c.post("/v1/generate", json=b) for b, _ in jobs]
            return await asyncio.gather(*calls), (await c.get("/metrics")).text
    responses, metrics = asyncio.run(go())
    for (body, expected), r in zip(jobs, responses):
        if expected is None:
            assert r.status_code == 500 and r.json()["error"] == (
                f"image 0 (seed 40, {POISONED!r}): UNet, step 1 of {STEPS}: NaN/inf in the noise prediction"), r.text
            continue
        assert r.status_code == 200, r.text
        if r.headers["content-type"] == "image/png":
            got = [png_image(r.content)]
        else:
            got = [png_image(base64.b64decode(i["png"])) for i in r.json()["images"]]
            assert [i["meta"] for i in r.json()["images"]] == [m for _, m in got]
        assert len(got) == len(expected)
        for (image, meta), (cli_image, cli_meta) in zip(got, expected):
            np.testing.assert_array_equal(image, cli_image, err_msg=str(body)[:200])
            if expected is run4:  # the metadata lists both concepts
                assert {**meta, "concept": ""} == {**cli_meta, "concept": ""}
                assert meta["concept"] == ["7.jpg", os.path.basename(IMAGE2)]
                assert meta["concept_id"] == cli_meta["concept_id"] == [concept_id, second_id]
                assert r.headers["x-elite-concept-id"] == f"{concept_id},{second_id}" and meta["lambda"] == [0.8, 0.5]
                continue
            assert {**meta, "concept": ""} == {**cli_meta, "concept": ""} and meta["concept"] == "7.jpg"
            assert meta["concept_id"] == cli_meta["concept_id"] == concept_id
    sizes = metric(metrics, "elite_batch_size_bucket")
    one = next(v for k, v in sizes.items() if 'le="1.0"' in k)
    total = next(v for k, v in sizes.items() if 'le="+Inf"' in k)
    assert total > one, f"no batch of more than one image: {sizes}"
    assert max(int(b) for r in responses if r.status_code == 200 for b in r.headers["x-elite-batch"].split(",")) > 1


def bad_requests(cid: str) -> list[tuple[str, dict, int, str]]:
    """(name, httpx.post kwargs, status, message fragment); 30+ malformed requests."""
    ok = {"concept_id": cid, "prompt": "a S", "steps": 2, "height": 256, "width": 256}
    image, mask = open(IMAGE, "rb").read(), open(MASK, "rb").read()
    other_mask = open(concept_files(4)[1], "rb").read()

    def png(img: Image.Image, fmt: str = "PNG") -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        return buf.getvalue()

    def raw(text: str, kind: str = "application/json") -> dict:
        return {"content": text.encode(), "headers": {"content-type": kind}}

    def form(files, **fields) -> dict:  # files: a dict, or (name, file) pairs for repeated names
        return {"files": files, "data": {"prompt": "a S", "steps": "2", "height": "256", "width": "256", **fields}}

    up = {"image": ("7.jpg", image), "mask": ("7_bg.png", mask)}
    black = png(Image.new("L", Image.open(IMAGE).size))
    return [
        ("no placeholder", {"json": {**ok, "prompt": "a dog"}}, 400, "has no placeholder 'S'"),
        ("placeholder past 76 tokens", {"json": {**ok, "prompt": "a " * 90 + "S"}}, 400, "past the 76"),
        ("size outside the bundle", {"json": {**ok, "height": 1024}}, 400, "outside this bundle's range 256..512"),
        ("size not a multiple of 64", {"json": {**ok, "width": 300}}, 400, "multiple of 64"),
        ("steps 0", {"json": {**ok, "steps": 0}}, 400, "steps must be an integer in 1..500, got 0"),
        ("absurd steps", {"json": {**ok, "steps": 100000}}, 400, "steps must be an integer in 1..500, got 100000"),
        ("steps not a number", {"json": {**ok, "steps": "many"}}, 422, "steps: Input should be a valid integer"),
        ("lambda NaN", raw(json.dumps({**ok, "lambda": float("nan")})), 400,
         "lambda must be a finite number in 0..1, got nan"),
        ("guidance Infinity", raw(json.dumps({**ok, "guidance": float("inf")})), 400,
         "guidance must be a finite number in 1..20, got inf"),
        ("absurd guidance", {"json": {**ok, "guidance": 1e9}}, 400, "guidance must be a finite number in 1..20"),
        ("lambda out of range", {"json": {**ok, "lambda": 3}}, 400, "lambda must be a finite number in 0..1, got 3"),
        ("unknown field", {"json": {**ok, "colour": "red"}}, 422, "unknown field 'colour'"),
        ("mode", {"json": {**ok, "mode": "both"}}, 422, "mode: Input should be 'local' or 'global'"),
        ("words", {"json": {**ok, "mode": "global", "words": "9"}}, 422, "words: Input should be"),
        ("scheduler", {"json": {**ok, "scheduler": "heun"}}, 422, "scheduler: Input should be"),
        ("malformed concept id", {"json": {**ok, "concept_id": "xyz"}}, 422, "concept_id.0: String should match"),
        ("unknown concept id", {"json": {**ok, "concept_id": "0" * 32}}, 404, "upload its image and mask"),
        ("no concept", {"json": {"prompt": "a S"}}, 422, "give a concept"),
        ("no prompt", {"json": {"concept_id": cid}}, 422, "prompt: Field required"),
        ("empty prompt", {"json": {**ok, "prompt": ""}}, 422, "prompt.0: String should have at least 1"),
        ("huge prompt", {"json": {**ok, "prompt": "S " * 1500}}, 422, "at most 2000 characters"),
        ("seed past 2**64-1", {"json": {**ok, "seed": 2**64}}, 400, "seed must be an integer in -2**63..2**64-1"),
        ("seed of the n-th image past it", {"json": {**ok, "seed": 2**64 - 1, "n": 2}}, 400,
         "request 1: seed must be an integer"),
        ("n too large", {"json": {**ok, "n": 100}}, 422, "n: Input should be less than or equal to 16"),
        ("too many images", {"json": {**ok, "prompt": ["a S"] * 9, "n": 2}}, 422, "18 images in one request"),
        ("png of two images", {"json": {**ok, "n": 2, "format": "png"}}, 422, "format=png returns one image"),
        ("zero timeout", {"json": {**ok, "timeout_s": 0}}, 422, "timeout_s: Input should be greater than 0"),
        ("not JSON", raw("{nope"), 400, "the body is not valid JSON"),
        ("JSON array", raw("[1, 2]"), 422, "the JSON body must be an object"),
        ("text/plain", raw("prompt=a S", "text/plain"), 415, "send application/json or multipart/form-data"),
        ("oversized body", raw("x" * (17 << 20)), 413, "more than the 16,777,216 allowed"),
        ("unreadable image", form({**up, "image": ("a.png", b"garbage")}), 400,
         "image (uploaded, 7 bytes) is not an image PIL can read"),
        ("truncated image", form({**up, "image": ("a.jpg", image[: len(image) // 2])}), 400, "truncated"),
        ("float image", form({**up, "image": ("f.tif", png(Image.new("F", (236, 236)), "TIFF"))}), 400,
         "floating-point image"),
        ("image too large", form({**up, "image": ("big.png", png(Image.new("1", (4200, 4100))))}), 400,
         "more than the 16,777,216 px allowed"),
        ("mask of another size", form({**up, "mask": ("m.png", other_mask)}), 400, "but the image is 236x236"),
        ("empty mask", form({**up, "mask": ("m.png", black)}), 400, "is empty (all zero)"),
        ("image without mask", form({"image": up["image"]}), 422, "give a concept"),
        ("image as a text field", form({"mask": up["mask"]}, image="cat.jpg"), 422, "'image' must be one uploaded"),
        ("id and uploads", form(up, concept_id=cid), 422, "not both"),
        ("two concepts, one placeholder", {"json": {**ok, "concept_id": [cid, cid]}}, 400,
         "no placeholder 'V' for concept 2"),
        ("a lambda per concept, miscounted", {"json": {**ok, "concept_id": [cid, cid], "prompt": "a S and a V",
                                                       "lambda": [0.5, 0.6, 0.7]}}, 400, "3 lambdas for 2 concepts"),
        ("more concepts than the bundle takes", {"json": {**ok, "concept_id": [cid] * 4, "prompt": "S V W X"}}, 400,
         "a request has 4 concepts; this model takes at most 3"),
        ("too many concept ids", {"json": {**ok, "concept_id": [cid] * 9}}, 422,
         "concept_id: List should have at most 8 items"),
        ("two images, one mask", form([("image", up["image"]), ("image", up["image"]), ("mask", up["mask"])]), 422,
         "one `mask` after each `image`"),
        ("encode: unknown field", {"url": "/v1/encode", "files": up, "data": {"prompt": "a S"}}, 422,
         "unknown field(s) prompt"),
        ("encode: JSON", {"url": "/v1/encode", "json": {}}, 422, "upload the concept as two files"),
        ("encode: format", {"url": "/v1/encode?format=xml", "files": up}, 422, "format must be json or file"),
        ("encode: unreadable mask", {"url": "/v1/encode", "files": {**up, "mask": ("m.png", b"\x89PNG")}}, 400,
         "mask (uploaded, 4 bytes) is not an image"),
    ]


def test_malformed_requests_get_4xx_with_one_line_and_the_service_stays_ready(service, concept_id):
    cases = bad_requests(concept_id)
    assert len(cases) >= 30

    async def go():
        answers = []
        async with service.client() as c:
            for _, kwargs, _, _ in cases:
                kw = dict(kwargs)
                answers.append(await c.post(kw.pop("url", "/v1/generate"), **kw))
            answers.append(await c.get("/v1/generate"))
            answers.append(await c.get("/no/such/path"))
            ready = await c.get("/ready")
            good = await c.post("/v1/generate", json={"concept_id": concept_id, "prompt": "a S", "steps": 2,
                                                      "height": 256, "width": 256})
            return answers, ready, good
    answers, ready, good = asyncio.run(go())
    expected = [(name, status, text) for name, _, status, text in cases] + [("GET generate", 405, "Method Not Allowed"),
                                                                            ("no path", 404, "Not Found")]
    for (name, status, text), r in zip(expected, answers):
        body = r.json()
        assert (r.status_code, body["status"]) == (status, status), (name, r.status_code, r.text[:300])
        assert text in body["error"] and "\n" not in body["error"] and len(body["error"]) < 400, (name, body)
    assert ready.status_code == 200 and ready.json()["queue"] == 0
    assert good.status_code == 200 and good.headers["content-type"] == "image/png"


def test_overload_gets_503_with_retry_after_and_every_request_one_answer(service, concept_id):
    n = 24

    async def go():
        async with service.client() as c:
            async def one(i):
                r = await c.post("/v1/generate", json={"concept_id": concept_id, "prompt": "a S", "seed": i,
                                                       "steps": 10, "height": 256, "width": 256})
                return r
            t0 = time.monotonic()
            answers = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True), 300)
            return answers, time.monotonic() - t0, (await c.get("/ready")).json()
    answers, seconds, ready = asyncio.run(go())
    assert not [a for a in answers if isinstance(a, BaseException)], answers
    statuses = [a.status_code for a in answers]
    assert len(statuses) == n and set(statuses) <= {200, 503} and statuses.count(503) >= n // 4, statuses
    for a in answers:
        if a.status_code == 503:
            assert int(a.headers["retry-after"]) >= 1 and "the queue is full" in a.json()["error"]
        else:
            assert a.headers["content-type"] == "image/png"
    assert ready["queue"] == 0 and ready["running"] == 0


def test_a_request_past_its_deadline_gets_504_and_frees_the_pipeline(service, concept_id):
    async def go():
        async with service.client() as c:
            t0 = time.monotonic()
            r = await c.post("/v1/generate", json={"concept_id": concept_id, "prompt": "a S", "steps": 500,
                                                   "height": 512, "width": 512, "timeout_s": 1})
            late = time.monotonic() - t0
            for _ in range(120):  # the abandoned call stops at its next step
                info = (await c.get("/ready")).json()
                if info["running"] == 0:
                    break
                await asyncio.sleep(0.25)
            good = await c.post("/v1/generate", json={"concept_id": concept_id, "prompt": "a S", "steps": 2,
                                                      "height": 256, "width": 256})
            return r, late, info, good, (await c.get("/metrics")).text
    r, late, info, good, metrics = asyncio.run(go())
    assert r.status_code == 504 and "not done within 1 s" in r.json()["error"] and late < 30
    assert info["running"] == 0 and good.status_code == 200
    assert any('status="504"' in k for k in metric(metrics, "elite_requests_total"))


def test_a_killed_replica_is_replaced_and_its_requests_get_one_5xx_each(service, concept_id):
    async def go():
        async with service.client(timeout=60) as c:
            pid = (await c.get("/ready")).json()["pid"]
            flight = [asyncio.create_task(c.post("/v1/generate", json={
                "concept_id": concept_id, "prompt": "a S", "seed": i, "steps": 200, "height": 256, "width": 256}))
                for i in range(3)]
            await asyncio.sleep(2)
            os.kill(pid, signal.SIGKILL)  # the replica's process (a Ray actor of the service this test started)
            answers = await asyncio.wait_for(asyncio.gather(*flight, return_exceptions=True), 120)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 120:
                try:
                    info = (await c.get("/ready", timeout=10)).json()
                    if info.get("pid") not in (None, pid):
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(1)
            again = await c.post("/v1/generate", json={"concept_id": concept_id, "prompt": "a S", "steps": 2,
                                                       "height": 256, "width": 256})
            return pid, answers, info, again
    pid, answers, info, again = asyncio.run(go())
    assert not [a for a in answers if isinstance(a, BaseException)], answers
    assert all(a.status_code >= 500 for a in answers), [(a.status_code, a.text[:100]) for a in answers]
    assert info["pid"] != pid and info["ready"]
    assert again.status_code == 200, again.text  # the concept id outlived the replica (the shared store)
