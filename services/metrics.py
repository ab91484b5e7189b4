"""Prometheus metrics (`GET /metrics`), with `prometheus-client`.

With `uvicorn --workers N` each worker is its own process with its own counters, and a scrape
reaches one of them. Set `PROMETHEUS_MULTIPROC_DIR` to an empty folder (created and emptied before
the app starts) and every process writes its counters there; `/metrics` then adds them all up
(prometheus-client's multiprocess mode). The queue gauges are read from the shared journal at
scrape time, so they are right either way.
"""

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector

from schemas import QueueStats

CONTENT_TYPE = CONTENT_TYPE_LATEST

ROBOT_CALLS = Counter(
    "robot_calls_total",
    "Robot calls by outcome: accepted, duplicate (on arrival); created, answered_with_error, "
    "failed, abandoned (when the workflow's answer is settled)",
    ["outcome"],
)
# Counted on every robot call: looked up once, not per call.
CALLS_ACCEPTED = ROBOT_CALLS.labels(outcome="accepted")
CALLS_DUPLICATE = ROBOT_CALLS.labels(outcome="duplicate")
ACK_SECONDS = Histogram(
    "robot_acknowledgement_seconds",
    "Time from a robot call's arrival to its reply (the 200 means the call is on disk)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
REST_REQUESTS = Counter(
    "bitrix_rest_requests_total",
    "REST requests to the portal by method and HTTP status (`error`: no reply)",
    ["method", "status"],
)
REST_SECONDS = Histogram(
    "bitrix_rest_request_seconds", "Latency of REST requests to the portal, by method", ["method"]
)
PORTAL_OVERLOAD = Counter(
    "bitrix_portal_overload_total",
    "Portal replies 503 (QUERY_LIMIT_EXCEEDED, overload) and 429 (too many requests)",
    ["status"],
)
TOKEN_REFRESHES = Counter(
    "bitrix_token_refreshes_total",
    "Access-token refreshes by outcome: ok, refused (the OAuth server said no), error (no answer)",
    ["outcome"],
)


def observe_rest(method: str, status: int | None, seconds: float) -> None:
    """One REST request: its status, its latency, and whether the portal pushed back."""
    label = str(status) if status else "error"
    REST_REQUESTS.labels(method=method, status=label).inc()
    REST_SECONDS.labels(method=method).observe(seconds)
    if status in (429, 503):
        PORTAL_OVERLOAD.labels(status=label).inc()


class _QueueCollector(Collector):
    def __init__(self, stats: QueueStats, connected: bool) -> None:
        self._stats = stats
        self._connected = connected

    def collect(self):  # type: ignore[no-untyped-def]  # the base class leaves it untyped
        portal = GaugeMetricFamily(
            "robot_portal_connected", "1 when a portal is connected (tokens that can be refreshed)"
        )
        portal.add_metric([], 1.0 if self._connected else 0.0)
        pending = GaugeMetricFamily("robot_queue_pending", "Robot calls accepted and not yet answered")
        pending.add_metric([], self._stats.pending)
        oldest = GaugeMetricFamily(
            "robot_queue_oldest_pending_age_seconds", "Age of the oldest pending robot call (0: none)"
        )
        oldest.add_metric([], self._stats.oldest_pending_age_seconds or 0.0)
        return [portal, pending, oldest]


def render(stats: QueueStats, connected: bool) -> bytes:
    """The exposition text: this process's (or all processes') counters and the queue gauges."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        output = generate_latest(registry)
    else:
        output = generate_latest(REGISTRY)
    queue = CollectorRegistry()
    queue.register(_QueueCollector(stats, connected))
    return output + generate_latest(queue)
