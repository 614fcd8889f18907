"""Prometheus metrics. Under gunicorn each worker writes its samples to PROMETHEUS_MULTIPROC_DIR (set by
gunicorn.conf.py before any worker imports prometheus_client) and a scrape merges them; sandbox counts by state
are read from the shared registry at scrape time, so every worker reports the same numbers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import falcon
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class _SandboxStates:
    """A collector that asks the registry at scrape time (a gauge per process would disagree across workers)."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("appliance_sandboxes", "Sandboxes in the registry by state", labels=["state"])
        for state, count in sorted(self._counts().items()):
            family.add_metric([state], count)
        yield family


class Metrics:
    def __init__(self, sandbox_counts: Callable[[], dict[str, int]]) -> None:
        self._sandbox_counts = sandbox_counts
        self.registry = CollectorRegistry(auto_describe=True)
        self.exec_seconds = Histogram(
            "appliance_exec_seconds", "Exec latency as the API serves it (request to final event)",
            ["language", "mode"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.create_seconds = Histogram(
            "appliance_create_seconds", "Sandbox create latency", buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.lifecycle_seconds = Histogram(
            "appliance_lifecycle_seconds", "Fork, freeze and resume latency as the API serves them", ["op"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.creates = Counter("appliance_creates", "Sandboxes created", registry=self.registry)
        self.errors = Counter(
            "appliance_errors", "Error responses by error code", ["code"], registry=self.registry
        )
        self.requests = Counter(
            "appliance_requests", "Requests by route and status", ["route", "method", "status"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        directory = os.environ.get(MULTIPROC_ENV)
        if directory:
            from prometheus_client import multiprocess

            scrape = CollectorRegistry()
            multiprocess.MultiProcessCollector(scrape, path=directory)
        else:
            scrape = self.registry
        output = generate_latest(scrape)
        states = CollectorRegistry()
        states.register(_SandboxStates(self._sandbox_counts))
        return output + generate_latest(states)


class MetricsMiddleware:
    """Counts every response by route template (not raw path: ids would explode the label set) and error code."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        route = req.uri_template or "unmatched"
        self._metrics.requests.labels(route, req.method, str(resp.status_code)).inc()
        code = getattr(req.context, "error_code", None)
        if code is not None:
            self._metrics.errors.labels(code).inc()


class MetricsResource:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self._metrics.exposition()
        resp.content_type = CONTENT_TYPE_LATEST
