"""Prometheus metrics of one replica (GET /metrics): requests by endpoint and status, latency, queue
depth, batch sizes and times, time per pipeline stage, concept cache lookups, PNG encoding.

Each replica has its own registry, labelled with its replica id; with several replicas a scrape
through the HTTP proxy reaches one of them (Ray's own metrics endpoint carries Serve's built-in
series for the whole cluster)."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, replica: str, max_batch: int):
        r = self.registry = CollectorRegistry()
        self.replica = replica
        self.requests = Counter("elite_requests", "HTTP requests answered, by endpoint and status code",
                                ["replica", "endpoint", "status"], registry=r)
        self.latency = Histogram("elite_request_seconds", "Time from a request's arrival at the replica to its answer",
                                 ["replica", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("elite_queue_depth", "Images (and concept encodings) admitted and waiting for the "
                           "pipeline", ["replica"], registry=r).labels(replica)
        self.running = Gauge("elite_running", "Images in the pipeline call now running", ["replica"],
                             registry=r).labels(replica)
        self.batch_size = Histogram("elite_batch_size", "Images per pipeline call", ["replica"],
                                    buckets=tuple(range(1, max_batch + 1)), registry=r).labels(replica)
        self.batch_seconds = Histogram("elite_batch_seconds", "Time of one pipeline call", ["replica"],
                                       buckets=LATENCY_BUCKETS, registry=r).labels(replica)
        self.stage_seconds = Counter("elite_stage_seconds", "Time in each pipeline stage (concept_encoder, "
                                     "text_encoder, unet, step, vae_decoder, total)", ["replica", "stage"], registry=r)
        self.stage_calls = Counter("elite_stage_calls", "Calls of each pipeline stage", ["replica", "stage"],
                                   registry=r)
        self.concepts = Counter("elite_concept_lookups", "Concept lookups: cache (this replica), store (shared), "
                                "encoded (ran the concept encoder), missing (unknown id)", ["replica", "result"],
                                registry=r)
        self.png_seconds = Histogram("elite_png_seconds", "Time to encode one PNG", ["replica"],
                                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
                                     registry=r).labels(replica)
        self.rejected = Counter("elite_rejected", "Requests refused before running: queue full (503)", ["replica"],
                                registry=r).labels(replica)

    def answered(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(self.replica, endpoint, str(status)).inc()
        self.latency.labels(self.replica, endpoint).observe(seconds)

    def stages(self, timer) -> None:
        for stage, seconds in timer.seconds.items():
            self.stage_seconds.labels(self.replica, stage).inc(seconds)
            self.stage_calls.labels(self.replica, stage).inc(timer.calls[stage])

    def concept(self, result: str) -> None:
        self.concepts.labels(self.replica, result).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
