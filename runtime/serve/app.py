"""The HTTP API (a FastAPI ingress) and the Ray Serve application.

    POST /v1/encode     image + mask (multipart) -> concept id and the .concept file
    POST /v1/generate   fields (JSON, or multipart with `image` + `mask` uploads; several concepts: a list of
                        ids, or one pair per concept) -> PNG, or JSON of base64 PNGs
    GET  /health        liveness: the replica answers
    GET  /ready         readiness: graphs loaded and warmed; what this replica runs
    GET  /metrics       Prometheus text
    GET  /docs          the OpenAPI page (/openapi.json)

Errors are JSON {"error": one line, "status": code}: 4xx for bad input (the runtime's own message),
404 for an unknown concept id, 413 for a body past --max-upload-mb, 503 + Retry-After when the
replica's queue is full, 504 past the deadline, 500 for a bug (logged with its traceback).

`build` is the application builder for Ray Serve's own tools:
    serve run elite_export.runtime.serve.app:build bundle=/path/to/bundle
    serve deploy deploy/serve.yaml     (import_path: elite_export.runtime.serve.app:build)
"""
# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at run time.
import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from elite_export.runtime.serve.fields import (MAX_CONCEPTS, GenerateFields, HttpError, b64, build_requests,
                                               error_body, json_schema_body, one_line, read_fields, status_of)
from elite_export.runtime.serve.options import ServeOptions
from elite_export.runtime.serve.replica import LRU, Replica, Row

log = logging.getLogger("elite.serve")
HEADROOM = 16  # requests a replica takes beyond its queue and batch: health, metrics, bad input answered at once

api = FastAPI(title="elite-run serve", version="1",
              description="ELITE (personalised Stable Diffusion) from a bundle: encode a concept once, generate "
                          "images of it. Same images and PNG metadata as `elite-run`.")


@api.exception_handler(StarletteHTTPException)
async def _http_exception(request, exc: StarletteHTTPException):  # unknown paths, wrong methods
    return JSONResponse(error_body(exc.status_code, exc.detail), status_code=exc.status_code)


def error_response(exc: BaseException) -> JSONResponse:
    status = status_of(exc)
    if status >= 500 and not isinstance(exc, HttpError):
        log.error("request failed", exc_info=exc)
    return JSONResponse(error_body(status, one_line(exc)), status_code=status,
                        headers=getattr(exc, "headers", None))


ENCODE_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "mask"],
    "properties": {"image": {"type": "string", "format": "binary", "description": "The concept image."},
                   "mask": {"type": "string", "format": "binary",
                            "description": "Its object mask, same size; white (> 0) = object."}}}}}}
GENERATE_BODY = json_schema_body(GenerateFields, {"image": "The concept image (instead of concept_id); repeat "
                                                           "image and mask for several concepts.",
                                                  "mask": "Its object mask."})


@serve.deployment(name="ConceptStore", num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0})
class ConceptStore:
    """The .concept files of every replica's encodings (bounded LRU): an id works on any replica and
    survives replica restarts."""

    def __init__(self, size: int):
        self.files = LRU(size)

    async def get(self, cid: str) -> bytes | None:
        return self.files.get(cid)

    async def put(self, cid: str, data: bytes) -> None:
        self.files.put(cid, data)


@serve.deployment(name="EliteService", ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class EliteService:
    def __init__(self, options: dict, store=None):
        opts = ServeOptions(**options)
        self.store = store
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.r = Replica(opts, replica_id, self._store_get if store else None, self._store_put if store else None)
        self.opts = opts
        self._batch.set_max_batch_size(self.r.max_batch)
        self._batch.set_batch_wait_timeout_s(opts.batch_wait_ms / 1000)

    async def _store_get(self, cid: str):
        return await self.store.get.remote(cid)

    async def _store_put(self, cid: str, data: bytes):
        return await self.store.put.remote(cid, data)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)  # set per replica in __init__
    async def _batch(self, rows: list[Row]) -> list:
        return await self.r.run_rows(rows)

    async def _answer(self, endpoint: str, work) -> Response:
        """Run a route's work; every outcome is one response, counted by status."""
        t0 = time.perf_counter()
        try:
            response = await work
        except Exception as e:  # noqa: BLE001 - becomes its JSON error response
            response = error_response(e)
        self.r.metrics.answered(endpoint, response.status_code, time.perf_counter() - t0)
        return response

    async def _deadline(self, work, timeout_s: float | None = None):
        limit = min(timeout_s or self.opts.timeout_s, self.opts.timeout_s)
        try:
            return await asyncio.wait_for(work, limit)
        except TimeoutError:
            raise HttpError(504, f"not done within {limit:g} s (the deadline: the request's timeout_s or the "
                                 f"service's --timeout-s {self.opts.timeout_s:g}); its work is dropped") from None

    @api.get("/health", summary="Liveness: this replica answers.")
    async def health(self) -> dict:
        return {"status": "ok", "replica": self.r.replica_id}

    @api.get("/ready", summary="Readiness: every graph loaded and warmed; what this replica runs.")
    async def ready(self) -> dict:
        return self.r.info()

    @api.get("/metrics", summary="Prometheus metrics of the replica that answers.")
    async def metrics(self) -> Response:
        return Response(self.r.metrics.exposition(), media_type=self.r.metrics.content_type)

    @api.post("/v1/encode", summary="Encode a concept (image + mask) once; generate with its id.",
              openapi_extra={"requestBody": ENCODE_BODY},
              responses={200: {"description": "JSON {concept_id, bundle_id, cached, concept: base64 .concept "
                                              "file}; with ?format=file the .concept file itself"}})
    async def encode(self, request: Request, format: str = "json") -> Response:
        return await self._answer("encode", self._encode(request, format))

    async def _encode(self, request: Request, fmt: str) -> Response:
        if fmt not in ("json", "file"):
            raise HttpError(422, f"format must be json or file, got {fmt!r}")
        fields, uploads = await read_fields(request, self.max_body, ("image", "mask"))
        if fields or set(uploads) != {"image", "mask"}:
            extra = sorted(fields) + sorted(set(uploads) - {"image", "mask"})
            raise HttpError(422, f"unknown field(s) {', '.join(extra)}; send only `image` and `mask`" if extra
                            else "upload the concept as two files, `image` and `mask` (multipart/form-data)")
        concept, data, cached = await self._deadline(self.r.concept_from_upload(uploads["image"][0],
                                                                                uploads["mask"][0]))
        headers = {"X-Elite-Concept-Id": concept.id}
        if fmt == "file":
            headers["Content-Disposition"] = f'attachment; filename="{concept.id}.concept"'
            return Response(data, media_type="application/octet-stream", headers=headers)
        return JSONResponse({"concept_id": concept.id, "bundle_id": self.r.gen.bundle.id, "cached": cached,
                             "concept": b64(data)}, headers=headers)

    @property
    def max_body(self) -> int:
        return int(self.opts.max_upload_mb * (1 << 20))

    @api.post("/v1/generate", summary="Generate images of one or several concepts (by id, or uploaded inline).",
              openapi_extra={"requestBody": GENERATE_BODY},
              responses={200: {"description": "image/png (one image, with the `elite` metadata chunk) or JSON "
                                              "{images: [{png: base64, meta}], concept_id}"}})
    async def generate(self, request: Request) -> Response:
        return await self._answer("generate", self._generate(request))

    async def _generate(self, request: Request) -> Response:
        data, uploads = await read_fields(request, self.max_body, ("image", "mask"), MAX_CONCEPTS)
        try:
            fields = GenerateFields.model_validate(data)
        except ValidationError as e:
            raise HttpError(422, one_line(e)) from None
        images = len(fields.prompt) * fields.n
        if images > self.opts.max_images:
            raise HttpError(422, f"{images} images in one request (prompts x n); at most {self.opts.max_images}")
        if fields.format == "png" and images > 1:
            raise HttpError(422, f"format=png returns one image; this request makes {images}: use format=json")
        if fields.concept_id and uploads:
            raise HttpError(422, "give concept_id or upload image and mask, not both")
        if not fields.concept_id and (set(uploads) != {"image", "mask"}
                                      or len(uploads["image"]) != len(uploads["mask"])):
            raise HttpError(422, "give a concept: concept_id (from POST /v1/encode), or upload `image` and `mask` "
                                 "(multipart/form-data; for several concepts, one `mask` after each `image`)")
        return await self._deadline(self._produce(fields, uploads), fields.timeout_s)

    async def _produce(self, fields: GenerateFields, uploads: dict) -> Response:
        if fields.concept_id:
            concepts = [await self.r.concept_by_id(cid) for cid in fields.concept_id]
        else:
            concepts = [(await self.r.concept_from_upload(image, mask))[0]
                        for image, mask in zip(uploads["image"], uploads["mask"])]
        ids = [c.id for c in concepts]
        requests, settings = build_requests(fields, concepts)
        self.r.gen.validate(requests, settings)  # the runtime's own checks, before anything queues
        rows = [Row(q, settings) for q in requests]
        self.r.admit(rows)
        try:
            done = await asyncio.gather(*(self._batch(row) for row in rows))
        finally:
            self.r.unqueue(rows)
            for row in rows:  # answered or given up: a call whose rows all gave up stops at its next step
                row.abandoned = True
        for d in done:
            if isinstance(d, BaseException):
                raise d
        results = [d.result for d in done]
        failed = [(k, r) for k, r in enumerate(results) if r.error is not None]
        if failed:  # a stage gave these rows NaN/inf (their batch mates are unaffected): no image to send
            k, r = failed[0]
            more = f"; {len(failed)} of {len(results)} images failed" if len(failed) > 1 else ""
            log.warning("non-finite rows: %s", [(i, x.error) for i, x in failed])
            raise HttpError(500, f"image {k} (seed {r.meta['seed']}, {r.meta['prompt']!r}): {r.error}{more}")
        pngs = await asyncio.to_thread(self.r.pngs, results)
        headers = {"X-Elite-Concept-Id": ",".join(ids),
                   "X-Elite-Pipeline-Ms": f"{1e3 * max(d.call_seconds for d in done):.1f}",
                   "X-Elite-Batch": ",".join(str(d.batch) for d in done)}
        if (fields.format or ("png" if len(pngs) == 1 else "json")) == "png":
            return Response(pngs[0], media_type="image/png", headers=headers)
        return JSONResponse({"concept_id": ids[0] if len(ids) == 1 else ids,
                             "images": [{"png": b64(p), "meta": r.meta}
                                                                  for p, r in zip(pngs, results)]}, headers=headers)


def deployment_options(opts: ServeOptions, bundle_max_batch: int) -> dict:
    """What `elite-run serve` sets per deployment; a config file's `deployments:` overrides any of it."""
    ongoing = opts.max_queue + opts.batch(bundle_max_batch) + HEADROOM
    return {"num_replicas": opts.replicas, "max_ongoing_requests": ongoing, "max_queued_requests": ongoing,
            "backpressure_config": {"retry_after_s": 1}, "max_constructor_retry_count": 1,
            "ray_actor_options": {"num_cpus": 0, "num_gpus": 1 if opts.device == "cuda" else 0}}


def application(opts: ServeOptions, bundle_max_batch: int, replicas_from_config: bool = False) -> Application:
    options = deployment_options(opts, bundle_max_batch)
    if replicas_from_config:
        options.pop("num_replicas")
    store = ConceptStore.bind(opts.concept_store)
    return EliteService.options(**options).bind(opts.to_dict(), store)


def build(args: dict) -> Application:
    """The application builder (`import_path: elite_export.runtime.serve.app:build`); `args` are
    ServeOptions fields, `bundle` required. Replica counts come from the config's `deployments:`."""
    from elite_export.runtime.bundle import Bundle

    opts = ServeOptions.from_args(args)
    max_batch = Bundle.open(opts.bundle).ranges.batch[2]
    opts.check(max_batch)
    return application(opts, max_batch, replicas_from_config="replicas" not in args)
