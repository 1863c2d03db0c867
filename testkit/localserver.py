"""A small HTTP image server on 127.0.0.1, with faults on purpose.

The demo, the tests and the benchmarks serve images from it so downloads are real HTTP
without network access. Routes are exact request paths (as sent, percent-encoding
included, query left out) mapped to a `Route` (status, body, headers, delay before
answering, a redirect, or a hostile transfer: a slow drip, an endless or huge body, a
chunked body without length). Every request is logged in ``LocalServer.log`` (path,
Host header, bytes sent, start and end times), so tests can see what a client did.
"""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ZEROS = bytes(64 * 1024)


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str = "image/jpeg"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (a hanging server)
    redirect_to: str | None = None
    declared_length: int | None = None  # Content-Length to announce (> len(body): truncated transfer)
    drip: float = 0.0  # seconds between body bytes (a slow-drip server), one byte at a time
    stream_bytes: int = 0  # zero bytes sent after ``body``, generated, never held in memory
    chunked: bool = False  # Transfer-Encoding: chunked, no Content-Length


@dataclass
class Request:
    """One request as the server saw it."""

    path: str
    host: str | None
    start: float
    end: float | None = None
    sent: int = 0  # body bytes written before the transfer ended
    aborted: bool = False  # the client closed the connection before the body was complete


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    routes: dict[str, Route] = {}
    log: list[Request] = []

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        route = self.routes.get(self.path.split("?", 1)[0])
        if route is None:
            route = Route(b"not found", 404, "text/plain")
        rec = Request(self.path, self.headers.get("Host"), time.monotonic())
        self.log.append(rec)
        if route.delay:
            time.sleep(route.delay)
        try:
            if route.redirect_to:
                self.send_response(302)
                self.send_header("Location", route.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(route.status)
            self.send_header("Content-Type", route.content_type)
            if route.chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(route.declared_length or len(route.body) + route.stream_bytes))
            for k, v in route.headers.items():
                self.send_header(k, v)
            self.end_headers()
            self._body(route, rec)
            if route.declared_length or route.stream_bytes or route.drip:
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            rec.aborted = True
            self.close_connection = True
        finally:
            rec.end = time.monotonic()

    def _body(self, route: Route, rec: Request) -> None:
        def write(data: bytes) -> None:
            if not data:
                return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if route.chunked else data)
            rec.sent += len(data)

        if route.drip:
            for i in range(len(route.body)):
                write(route.body[i:i + 1])
                time.sleep(route.drip)
        else:
            write(route.body)
        left = route.stream_bytes
        while left > 0:
            write(_ZEROS[:min(left, len(_ZEROS))])
            left -= len(_ZEROS)
        if route.chunked:
            self.wfile.write(b"0\r\n\r\n")


class LocalServer:
    """``with LocalServer(routes) as srv: srv.url('/a.jpg')``"""

    def __init__(self, routes: dict[str, Route], host: str = "127.0.0.1", port: int = 0,
                 tls: ssl.SSLContext | None = None):
        self.log: list[Request] = []
        handler = type("Handler", (_Handler,), {"routes": dict(routes), "log": self.log})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.scheme = "http"
        if tls is not None:  # HTTPS with this server-side context
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.httpd.daemon_threads = True
        self.httpd.request_queue_size = 1024
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, route: Route) -> str:
        self.httpd.RequestHandlerClass.routes[path] = route
        return self.url(path)

    def requests(self, path: str) -> list[Request]:
        """The logged requests whose path (before any query) is ``path``."""
        return [r for r in self.log if r.path.split("?", 1)[0] == path]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
