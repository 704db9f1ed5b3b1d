"""Prometheus metrics of the server, on a registry of their own, served on /metrics.

Dashboards are built on exactly these names: netvlad_requests_total{method,code},
netvlad_images_total, netvlad_image_errors_total{reason}, netvlad_batch_size,
netvlad_queue_wait_seconds, netvlad_inference_seconds, netvlad_request_duration_seconds{method},
netvlad_queue_depth, netvlad_auth_failures_total{reason} (calls refused for a missing or
invalid bearer token, never reaching a method) and
netvlad_model_info{model,precision,output_dims,format,demo},
netvlad_serving{service} (1 while the gRPC health service of that name says SERVING, 0 while
loading, draining or after the model thread stopped), plus the standard process_* series
(process_resident_memory_bytes for the RSS alert of deploy/prometheus/alerts.yml).

The same by priority class (label `class`: interactive or bulk; the series above stay the totals
over both classes): netvlad_class_requests_total{class,method,code} and
netvlad_class_request_duration_seconds{class,method} (DescribeImages calls and stream frames),
netvlad_class_queue_depth{class}, netvlad_class_queue_limit{class} (the class's queue budget, so
depth / limit is how full it is) and netvlad_class_queue_wait_seconds{class}.

The place index (docs/PLACES.md): netvlad_place_index_places{index} and
netvlad_place_index_bytes{index}, netvlad_place_query_seconds (the search alone) and
netvlad_place_add_seconds (an add until durable, describing included),
netvlad_place_requests_total{method,code} and netvlad_place_refused_total{reason} (limits:
places_per_request, index_bytes).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping, Sequence
from typing import Protocol
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    start_http_server,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)
QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                      5.0, 10.0)


class PlaceIndexSize(Protocol):
    """What the metrics read of a place index."""

    size: int
    nbytes: int


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """One bucket per batch size up to 16, then powers of two, always ending at max_batch_size."""
    sizes = {size for size in range(1, min(max_batch_size, 16) + 1)}
    power = 32
    while power < max_batch_size:
        sizes.add(power)
        power *= 2
    sizes.add(max_batch_size)
    return tuple(float(size) for size in sorted(sizes))


class ServerMetrics:
    """All server metrics; also the batcher's observer (queue depth, batch sizes, timings)."""

    def __init__(self, max_batch_size: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.requests = Counter("netvlad_requests", "RPCs (stream messages for the streaming "
                                "method) by method and gRPC status code", ["method", "code"],
                                registry=reg)
        self.images = Counter("netvlad_images", "Images described successfully", registry=reg)
        self.image_errors = Counter("netvlad_image_errors", "Images refused, by reason",
                                    ["reason"], registry=reg)
        self.batch_size = Histogram("netvlad_batch_size", "Images per model call",
                                    buckets=batch_size_buckets(max_batch_size), registry=reg)
        self.queue_wait = Histogram("netvlad_queue_wait_seconds",
                                    "Time an image waited in the queue before its batch ran",
                                    buckets=QUEUE_WAIT_BUCKETS, registry=reg)
        self.inference = Histogram("netvlad_inference_seconds",
                                   "Duration of one model call (a whole batch)",
                                   buckets=LATENCY_BUCKETS, registry=reg)
        self.request_duration = Histogram("netvlad_request_duration_seconds",
                                          "End-to-end handling time of an RPC (or stream message)",
                                          ["method"], buckets=LATENCY_BUCKETS, registry=reg)
        self.depth = Gauge("netvlad_queue_depth", "Images waiting in the queue", registry=reg)
        self.model_info = Info("netvlad_model", "The loaded model", registry=reg)
        self.serving = Gauge("netvlad_serving", "1 while the gRPC health service named by "
                             "`service` answers SERVING, 0 while NOT_SERVING (loading, draining, "
                             "model thread stopped)", ["service"], registry=reg)
        self.auth_failures = Counter("netvlad_auth_failures", "Calls refused UNAUTHENTICATED, by "
                                     "reason (missing or invalid bearer token)", ["reason"],
                                     registry=reg)
        self.security_reloads = Counter("netvlad_security_reloads", "Changed TLS or token files "
                                        "re-read, by file kind and result (ok, or error: the "
                                        "files read before stay in force)", ["file", "result"],
                                        registry=reg)
        ProcessCollector(registry=reg)  # process_resident_memory_bytes, CPU seconds, fds
        self.class_requests = Counter("netvlad_class_requests", "DescribeImages calls and stream "
                                      "messages by priority class, method and gRPC status code",
                                      ["class", "method", "code"], registry=reg)
        self.class_request_duration = Histogram(
            "netvlad_class_request_duration_seconds", "End-to-end handling time of a "
            "DescribeImages call or stream message, by priority class", ["class", "method"],
            buckets=LATENCY_BUCKETS, registry=reg)
        self.class_depth = Gauge("netvlad_class_queue_depth", "Images waiting in the queue, by "
                                 "priority class", ["class"], registry=reg)
        self.class_limit = Gauge("netvlad_class_queue_limit", "Most images the queue of a "
                                 "priority class holds (beyond it: RESOURCE_EXHAUSTED)", ["class"],
                                 registry=reg)
        self.class_queue_wait = Histogram("netvlad_class_queue_wait_seconds", "Time an image "
                                          "waited in the queue before its batch ran, by priority "
                                          "class", ["class"], buckets=QUEUE_WAIT_BUCKETS,
                                          registry=reg)

        self.place_index_places = Gauge("netvlad_place_index_places", "Places held, by place "
                                        "index", ["index"], registry=reg)
        self.place_index_bytes = Gauge("netvlad_place_index_bytes", "Memory a place index takes",
                                       ["index"], registry=reg)
        self.place_query_seconds = Histogram("netvlad_place_query_seconds", "Duration of one "
                                             "place-index search", buckets=QUEUE_WAIT_BUCKETS,
                                             registry=reg)
        self.place_add_seconds = Histogram("netvlad_place_add_seconds", "Duration of a place "
                                           "add until durable (describing images included)",
                                           buckets=LATENCY_BUCKETS, registry=reg)
        self.place_requests = Counter("netvlad_place_requests", "PlaceIndexService calls (stream "
                                      "messages for the stream) by method and gRPC status code",
                                      ["method", "code"], registry=reg)
        self.place_refusals = Counter("netvlad_place_refused", "Place-index changes refused by "
                                      "a limit, by reason", ["reason"], registry=reg)

    def place_index_changed(self, name: str, index: PlaceIndexSize | None) -> None:
        """Publish an index's size and memory (None: it was dropped)."""
        if index is None:
            for gauge in (self.place_index_places, self.place_index_bytes):
                with contextlib.suppress(KeyError):
                    gauge.remove(name)
            return
        self.place_index_places.labels(name).set(index.size)
        self.place_index_bytes.labels(name).set(index.nbytes)

    def place_request_done(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Count one finished place-index call (or stream message)."""
        self.place_requests.labels(method, code.name).inc()
        self.request_duration.labels(method).observe(seconds)

    def place_refused(self, reason: str) -> None:
        """Count one place-index change refused by a limit."""
        self.place_refusals.labels(reason).inc()

    def request_done(self, method: str, code: grpc.StatusCode, seconds: float,
                     priority_class: str | None = None) -> None:
        """Count one finished RPC (or stream message) and its duration, by class if it has one."""
        self.requests.labels(method, code.name).inc()
        self.request_duration.labels(method).observe(seconds)
        if priority_class is not None:
            self.class_requests.labels(priority_class, method, code.name).inc()
            self.class_request_duration.labels(priority_class, method).observe(seconds)

    def set_queue_limits(self, limits: Mapping[str, int]) -> None:
        """Publish each priority class's queue budget (and show its depth, 0 until work comes)."""
        for name, limit in limits.items():
            self.class_limit.labels(name).set(limit)
            self.class_depth.labels(name)
            self.class_queue_wait.labels(name)

    def set_serving(self, services: Sequence[str], serving: bool) -> None:
        """Publish the health state just given to these gRPC service names."""
        for name in services:
            self.serving.labels(name).set(1 if serving else 0)

    def auth_refused(self, reason: str) -> None:
        """Count one call refused for its bearer token ("missing" or "invalid")."""
        self.auth_failures.labels(reason).inc()

    def security_reloaded(self, kind: str, result: str) -> None:
        """Count one re-read of changed TLS ("tls") or token ("tokens") files."""
        self.security_reloads.labels(kind, result).inc()

    def image_refused(self, reason: str) -> None:
        """Count one refused image under its reason code."""
        self.image_errors.labels(reason).inc()

    def set_model(self, *, model: str, precision: str, output_dims: int, weight_format: str,
                  demo: bool) -> None:
        """Publish which model is loaded."""
        self.model_info.info({"model": model, "precision": precision,
                              "output_dims": str(output_dims), "format": weight_format,
                              "demo": "true" if demo else "false"})

    def queue_depth(self, depths: Mapping[str, int]) -> None:
        """Batcher observer: the number of queued images changed (depths by class)."""
        for name, depth in depths.items():
            self.class_depth.labels(name).set(depth)
        self.depth.set(sum(depths.values()))

    def batch_done(self, class_name: str, size: int, queue_waits: Sequence[float],
                   run_seconds: float, failed: bool) -> None:
        """Batcher observer: a batch of one priority class ran."""
        self.batch_size.observe(size)
        self.inference.observe(run_seconds)
        by_class = self.class_queue_wait.labels(class_name)
        for wait in queue_waits:
            self.queue_wait.observe(wait)
            by_class.observe(wait)

    def serve(self, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
        """Start the /metrics HTTP endpoint on a daemon thread; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)
