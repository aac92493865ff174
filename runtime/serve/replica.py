"""One replica's work, apart from Ray and HTTP: the Generator on one pipeline thread, batches of
compatible rows, admission (a bounded queue: past it, 503 with Retry-After), the concept cache.

A row is one image of an HTTP request. Rows wait in Ray Serve's batch queue; a batch (up to
max_batch rows, or whatever arrived within batch_wait_ms) is split by what one pipeline call shares
(size, steps, scheduler, guidance) and each group runs as one call. The pipeline runs on a single
worker thread, so the event loop keeps accepting requests, filling the next batch and answering
/health and /metrics while a batch runs.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

from elite_export.runtime.concept import concept_bytes, load_concept_bytes, upload_sha256
from elite_export.runtime.generator import Generator, Result
from elite_export.runtime.preprocess import ConceptInputs
from elite_export.runtime.requests import EncodedConcept, GenerationSettings, Request
from elite_export.runtime.serve.fields import HttpError, Upload, batch_key
from elite_export.runtime.serve.metrics import Metrics
from elite_export.runtime.serve.options import ServeOptions

log = logging.getLogger("elite.serve")
STORE_TIMEOUT_S = 10.0


class Ticket:
    """Something admitted and waiting for the pipeline (counted in the queue until it starts)."""
    queued = True


class Row(Ticket):
    abandoned = False  # its HTTP request is answered already (deadline, disconnect): nobody waits for it

    def __init__(self, request: Request, settings: GenerationSettings):
        self.request, self.settings, self.key = request, settings, batch_key(settings)


class Abandoned(Exception):
    """A pipeline call stopped between steps: every row in it was abandoned."""


@dataclass
class RowResult:
    result: Result
    call_seconds: float  # the pipeline call that made it
    batch: int  # rows in that call


class LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get(self, key, default=None):
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


StoreGet = Callable[[str], Awaitable[Optional[bytes]]]
StorePut = Callable[[str, bytes], Awaitable[None]]


class Replica:
    def __init__(self, opts: ServeOptions, replica_id: str, store_get: StoreGet | None = None,
                 store_put: StorePut | None = None):
        self.opts, self.replica_id, self.pid = opts, replica_id, os.getpid()
        t0 = time.perf_counter()
        self.gen = Generator(opts.bundle, opts.backend, opts.device, opts.threads, precision=opts.precision,
                             cuda_graph=opts.cuda_graph)
        if opts.warmup:
            self.gen.warmup()
        self.start_seconds = time.perf_counter() - t0
        self.max_batch = opts.batch(self.gen.max_batch)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="elite-pipeline")
        self.cache = LRU(opts.concept_cache)  # concept id -> (EncodedConcept, .concept bytes)
        self.store_get, self.store_put = store_get, store_put
        self.metrics = Metrics(replica_id, self.max_batch)
        self.waiting = 0  # tickets admitted, not yet on the pipeline thread
        self.running = 0
        self.call_seconds: float | None = None  # moving average of a pipeline call, for Retry-After

    def info(self) -> dict:
        b = self.gen.bundle
        return {"ready": True, "replica": self.replica_id, "pid": self.pid, "bundle_id": b.id,
                "backend": self.opts.backend, "device": self.opts.device, "precision": self.opts.precision,
                "cuda_graph": self.opts.cuda_graph, "max_batch": self.max_batch,
                "batch_wait_ms": self.opts.batch_wait_ms, "max_queue": self.opts.max_queue,
                "timeout_s": self.opts.timeout_s, "sizes": list(b.ranges.size),
                "concepts": list(b.ranges.concepts), "placeholders": list(self.gen.placeholders),
                "local_mode": bool(b.manifest["has_local_mapper"]), "queue": self.waiting, "running": self.running,
                "start_seconds": round(self.start_seconds, 3)}

    # -- admission -------------------------------------------------------------------------------
    def retry_after(self) -> int:
        per_call = self.call_seconds or 1.0
        return max(1, math.ceil(per_call * (1 + self.waiting / self.max_batch)))

    def admit(self, tickets: list[Ticket]) -> None:
        if self.waiting + len(tickets) > self.opts.max_queue:
            self.metrics.rejected.inc()
            raise HttpError(503, f"the queue is full ({self.waiting} waiting, --max-queue {self.opts.max_queue} per "
                                 "replica); retry later", {"Retry-After": str(self.retry_after())})
        self.waiting += len(tickets)
        self.metrics.queue.set(self.waiting)

    def unqueue(self, tickets: list[Ticket]) -> None:
        """Leave the queue (started, or given up): each ticket once."""
        for t in tickets:
            if t.queued:
                t.queued = False
                self.waiting -= 1
        self.metrics.queue.set(self.waiting)

    async def on_pipeline(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- generation --------------------------------------------------------------------------------
    async def run_rows(self, rows: list[Row]) -> list[RowResult | BaseException]:
        """The body of the @serve.batch handler: one pipeline call per group of compatible rows."""
        out: list[RowResult | BaseException] = [TimeoutError("dropped")] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.key, []).append(i)
        for members in groups.values():
            for start in range(0, len(members), self.max_batch):
                part = members[start:start + self.max_batch]
                self.unqueue([rows[i] for i in part])
                self.running += len(part)
                self.metrics.running.set(self.running)
                try:
                    rows_of_call = [rows[i] for i in part]
                    results, seconds = await self.on_pipeline(self._generate, [r.request for r in rows_of_call],
                                                              rows[part[0]].settings, rows_of_call)
                    for i, r in zip(part, results):
                        out[i] = RowResult(r, seconds, len(part))
                except Exception as e:  # noqa: BLE001 - each row's caller gets it (EliteError -> 4xx, else 500)
                    for i in part:
                        out[i] = e
                finally:
                    self.running -= len(part)
                    self.metrics.running.set(self.running)
        return out

    def _generate(self, requests: list[Request], settings: GenerationSettings,
                  rows: list[Row]) -> tuple[list[Result], float]:
        """On the pipeline thread. Stops between steps once every row's request has been answered."""
        def check(step: int, steps: int, n: int) -> None:
            if all(r.abandoned for r in rows):
                raise Abandoned(f"dropped after step {step} of {steps}: every request of this call gave up")

        t0 = time.perf_counter()
        try:
            results = self.gen.generate(requests, settings, batch_size=len(requests), on_step=check)
        finally:
            self.metrics.stages(self.gen.take_timer())
        seconds = time.perf_counter() - t0
        self.metrics.batch_size.observe(len(requests))
        self.metrics.batch_seconds.observe(seconds)
        self.call_seconds = seconds if self.call_seconds is None else 0.8 * self.call_seconds + 0.2 * seconds
        return results, seconds

    def pngs(self, results: list[Result]) -> list[bytes]:
        out = []
        for r in results:
            t0 = time.perf_counter()
            out.append(r.png())
            self.metrics.png_seconds.observe(time.perf_counter() - t0)
        return out

    # -- concepts ----------------------------------------------------------------------------------
    async def concept_by_id(self, cid: str) -> EncodedConcept:
        hit = self.cache.get(cid)
        if hit is not None:
            self.metrics.concept("cache")
            return hit[0]
        data = await self._store_get(cid)
        if data is not None:
            concept = load_concept_bytes(data, self.gen.bundle, f"concept {cid}")
            self.cache.put(cid, (concept, data))
            self.metrics.concept("store")
            return concept
        self.metrics.concept("missing")
        raise HttpError(404, f"unknown concept id {cid}: upload its image and mask to POST /v1/encode first "
                             "(or send them with this request as `image` and `mask`)")

    async def concept_from_upload(self, image: Upload, mask: Upload) -> tuple[EncodedConcept, bytes, bool]:
        """Uploaded image + mask -> (concept, .concept bytes, whether it was known already)."""
        name = os.path.basename(image[0]) or "image"
        inputs: ConceptInputs = await asyncio.to_thread(self.gen.concept, image[1], mask[1], name,
                                                        self.opts.max_pixels)
        hit = self.cache.get(inputs.id)
        if hit is not None:
            self.metrics.concept("cache")
            return hit[0], hit[1], True
        data = await self._store_get(inputs.id)
        if data is not None:
            concept = load_concept_bytes(data, self.gen.bundle, f"concept {inputs.id}")
            self.cache.put(inputs.id, (concept, data))
            self.metrics.concept("store")
            return concept, data, True
        ticket = Ticket()
        self.admit([ticket])
        try:
            concept = await self.on_pipeline(self.gen.encode_inputs, inputs)
        finally:
            self.unqueue([ticket])
        self.metrics.concept("encoded")
        data = concept_bytes(concept, self.gen.bundle, name, upload_sha256(image[1]), upload_sha256(mask[1]))
        self.cache.put(inputs.id, (concept, data))
        await self._store_put(inputs.id, data)
        return concept, data, False

    async def _store_get(self, cid: str) -> bytes | None:
        if self.store_get is None:
            return None
        try:
            return await asyncio.wait_for(self.store_get(cid), STORE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - the shared store is a cache: a failure is a miss
            log.warning("concept store get %s failed: %r", cid, e)
            return None

    async def _store_put(self, cid: str, data: bytes) -> None:
        if self.store_put is None:
            return
        try:
            await asyncio.wait_for(self.store_put(cid, data), STORE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001
            log.warning("concept store put %s failed: %r", cid, e)
