"""The dashboard's HTTP server: the page, ``/api/v1/state``, ``/api/v1/history`` and ``/metrics``.

:class:`DashboardServer` ties a :class:`~swarmtrain.dashboard.collector.SwarmCollector` (a thread polling the
DHT), a :class:`~swarmtrain.dashboard.history.HistoryStore` (SQLite time series) and a stdlib
``ThreadingHTTPServer`` together. Every endpoint is a read: only GET is answered, any other method gets 405, and
nothing here ever writes a swarm record. It binds 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import json
import logging
import math
import mimetypes
import os
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from swarmtrain.dht.directory import SwarmDirectory
from swarmtrain.dashboard.collector import SwarmCollector
from swarmtrain.dashboard.history import HistoryStore
from swarmtrain.dashboard.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, make_registry, render

logger = logging.getLogger(__name__)

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class DashboardServer:
    """Serve a live view of one run: a collector thread polls the DHT, an HTTP thread serves the page and API.

    :param directory: a reader of the run's records, e.g. over a client-mode :class:`~swarmtrain.dht.node.SwarmNode`
    :param run_id: the run shown
    :param host / port: where to listen (port 0 picks a free one; see :attr:`url`)
    :param db_path: SQLite file of the time series (None: in memory, lost on stop); reuse it across restarts
    :param retention_s / max_db_rows: history bounds (older rows, then the oldest rows past the cap, are deleted)
    :param poll_s: seconds between DHT polls

    Example::

        node = SwarmNode(run_id, Identity.load_or_create(None), initial_peers=[coordinator_maddr],
                         client_mode=True, start_p2p=False)
        server = DashboardServer(SwarmDirectory(node.dht, run_id, node.peer_id), run_id, port=8080)
        server.start()
        print("dashboard at", server.url)
        ...
        server.stop()
        node.shutdown()
    """

    def __init__(self, directory: SwarmDirectory, run_id: str, *, host: str = "127.0.0.1", port: int = 8080,
                 db_path: Optional[str] = None, retention_s: float = 7 * 86400, poll_s: float = 2.0,
                 max_db_rows: int = 200_000):
        self.run_id = run_id
        self.host = host
        self.history = HistoryStore(db_path or ":memory:", run_id, retention_s=retention_s, max_rows=max_db_rows)
        self.collector = SwarmCollector(directory, run_id, history=self.history, poll_s=poll_s)
        self.registry = make_registry(self.collector.state)
        self._requested_port = int(port)
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._http_thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Bind the HTTP server (raises OSError if the port is taken), then start both threads."""
        if self._httpd is not None:
            raise RuntimeError("the dashboard is already started")
        handler = type("BoundDashboardHandler", (_Handler,), {"dashboard": self})
        self._httpd = ThreadingHTTPServer((self.host, self._requested_port), handler)
        self._httpd.daemon_threads = True
        self.collector.start()
        self._http_thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="swarmtrain-dashboard-http",
            daemon=True,
        )
        self._http_thread.start()
        logger.info(f"dashboard of run {self.run_id!r} at {self.url}")

    @property
    def url(self) -> str:
        """The page's address, e.g. ``http://127.0.0.1:8080/``."""
        if self._httpd is None:
            raise RuntimeError("the dashboard is not started")
        host, port = self._httpd.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"

    def stop(self) -> None:
        """Stop serving, stop polling and close the history (the DHT node is the caller's to shut down)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._http_thread.join(timeout=5)
        self.collector.stop()
        self.history.close()

    def history_json(self, query: dict[str, list[str]]) -> dict:
        window_s = _float_arg(query, "window_s", 3600.0, 1.0, self.history.retention_s)
        max_points = int(_float_arg(query, "max_points", 300, 2, 5000))
        max_peers = int(_float_arg(query, "max_peers", 32, 0, 256))
        now = self.collector.clock()
        return {"run_id": self.run_id, "now": now,
                **self.history.query(window_s=window_s, max_points=max_points, max_peers=max_peers, now=now)}


class _Handler(BaseHTTPRequestHandler):
    """Routes GET requests; every other method is answered 405 (see ``__getattr__``)."""

    dashboard: DashboardServer  # set on the bound subclass
    server_version = "swarmtrain-dashboard"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        path = parsed.path
        try:
            if path in ("/", "/index.html"):
                self._send_file("index.html")
            elif path.startswith("/static/"):
                self._send_file(path[len("/static/"):])
            elif path == "/api/v1/state":
                self._send_json(self.dashboard.collector.state())
            elif path == "/api/v1/history":
                self._send_json(self.dashboard.history_json(urllib.parse.parse_qs(parsed.query)))
            elif path == "/metrics":
                self._send(HTTPStatus.OK, render(self.dashboard.registry), METRICS_CONTENT_TYPE)
            elif path == "/favicon.ico":
                self._send(HTTPStatus.NO_CONTENT, b"", "text/plain")
            else:
                self._send_error(HTTPStatus.NOT_FOUND, "not found")
        except _BadRequest as e:
            self._send_error(HTTPStatus.BAD_REQUEST, str(e))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-answer
        except Exception as e:  # a bug or a stopped dashboard: say so instead of dropping the connection
            logger.exception(f"dashboard request {path!r} failed")
            self.close_connection = True
            self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {str(e)[:200]}")

    def __getattr__(self, name: str):
        # BaseHTTPRequestHandler dispatches method M to do_M and answers 501 when it is missing: answer 405 instead
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def _method_not_allowed(self) -> None:
        self.close_connection = True  # a request body we did not read must not be taken for the next request
        self._send_error(HTTPStatus.METHOD_NOT_ALLOWED, "the dashboard is read-only: only GET is allowed",
                         extra={"Allow": "GET", "Connection": "close"})

    def _send_file(self, relative: str) -> None:
        root = os.path.realpath(STATIC_DIR)
        full = os.path.realpath(os.path.join(root, urllib.parse.unquote(relative)))
        if not full.startswith(root + os.sep) or not os.path.isfile(full):
            self._send_error(HTTPStatus.NOT_FOUND, "not found")
            return
        with open(full, "rb") as f:
            body = f.read()
        kind = mimetypes.guess_type(full)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind in ("application/javascript", "text/javascript"):
            kind += "; charset=utf-8"
        self._send(HTTPStatus.OK, body, kind)

    def _send_json(self, data: dict) -> None:
        body = json.dumps(data, allow_nan=False, default=_json_default, separators=(",", ":")).encode()
        self._send(HTTPStatus.OK, body, "application/json")

    def _send_error(self, status: HTTPStatus, message: str, extra: Optional[dict] = None) -> None:
        body = json.dumps({"error": message, "status": int(status)}).encode()
        self._send(status, body, "application/json", extra)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, extra: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", _CSP)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        logger.debug(f"{self.address_string()} {format % args}")


class _BadRequest(ValueError):
    pass


def _float_arg(query: dict[str, list[str]], name: str, default: float, low: float, high: float) -> float:
    values = query.get(name)
    if not values:
        return default
    try:
        value = float(values[0])
    except ValueError:
        raise _BadRequest(f"query parameter {name} must be a number, got {values[0][:32]!r}") from None
    if not math.isfinite(value):
        raise _BadRequest(f"query parameter {name} must be finite")
    return min(max(value, low), high)


def _json_default(value):
    raise TypeError(f"cannot serialize {type(value).__name__} in the dashboard state")
