"""Prometheus metrics and the small HTTP server every service exposes.

Names follow `sluice_<service>_<thing>_<unit>`; labels stay low-cardinality (never a request or
entity id). `metric()` returns the already-registered collector when called twice with the same
name, so two workers in one process (tests, benchmarks) share their series instead of failing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app

C = TypeVar("C", Counter, Gauge, Histogram)

_lock = threading.Lock()
_collectors: dict[str, Counter | Gauge | Histogram] = {}

LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Histogram buckets for request-path latencies, in seconds."""


def metric(kind: type[C], name: str, documentation: str, labels: Sequence[str] = (), **kwargs) -> C:
    """Get or create the collector `name` of type `kind` in the default registry."""
    with _lock:
        existing = _collectors.get(name)
        if existing is None:
            existing = kind(name, documentation, list(labels), registry=REGISTRY, **kwargs)
            _collectors[name] = existing
        if not isinstance(existing, kind):
            raise TypeError(f"metric {name} already registered as {type(existing).__name__}")
        return existing


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        """Scrapes every few seconds would flood the log; access logs are not wanted here."""


def _health_app(ready: Callable[[], bool]):
    metrics_app = make_wsgi_app(REGISTRY)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/healthz":
            status, body = "200 OK", {"status": "ok"}
        elif path == "/readyz":
            is_ready = ready()
            status = "200 OK" if is_ready else "503 Service Unavailable"
            body = {"status": "ready" if is_ready else "not_ready"}
        else:
            status = "404 Not Found"
            body = {"error": {"code": "not_found", "message": f"no route {path}", "details": None}}
        start_response(status, [("Content-Type", "application/json")])
        return [orjson.dumps(body)]

    return app


def serve_health(port: int, ready: Callable[[], bool], host: str = "0.0.0.0") -> WSGIServer:
    """Serve `/metrics`, `/healthz` and `/readyz` on `port` from a daemon thread.

    `ready` is called on each `/readyz` request; `/healthz` answers 200 while the process lives.
    Port 0 picks a free port (read it back from `server.server_port`). Call `shutdown()` to stop.
    """
    server = make_server(host, port, _health_app(ready), handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server
