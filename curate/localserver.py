"""A small HTTP image server on 127.0.0.1, with faults on purpose.

The demo, the tests and the benchmarks serve images from it so downloads are real HTTP
without network access. Routes are exact paths mapped to a `Route` (status, body,
headers, delay before answering, or a redirect).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str = "image/jpeg"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (a hanging server)
    redirect_to: str | None = None
    declared_length: int | None = None  # Content-Length to announce (> len(body): truncated transfer)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    routes: dict[str, Route] = {}

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        route = self.routes.get(self.path.split("?", 1)[0])
        if route is None:
            route = Route(b"not found", 404, "text/plain")
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
            self.send_header("Content-Length", str(route.declared_length or len(route.body)))
            for k, v in route.headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(route.body)
            if route.declared_length:
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            pass


class LocalServer:
    """``with LocalServer(routes) as srv: srv.url('/a.jpg')``"""

    def __init__(self, routes: dict[str, Route], host: str = "127.0.0.1", port: int = 0):
        handler = type("Handler", (_Handler,), {"routes": dict(routes)})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.httpd.request_queue_size = 1024
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, route: Route) -> str:
        self.httpd.RequestHandlerClass.routes[path] = route
        return self.url(path)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
