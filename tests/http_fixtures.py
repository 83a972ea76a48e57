"""A local HTTP server for tests that download images: good ones, broken ones, errors, slow ones.

Usage::

    from http_fixtures import ImageServer, Route, png_bytes, refused_url

    with ImageServer({"/ok.png": Route(body=png_bytes()), "/gone": Route(status=404)}) as server:
        url = server.url("/ok.png")
        ...
        assert server.hits["/gone"] == 1

It binds 127.0.0.1 on a free port and serves from a daemon thread, one thread per request, so slow routes
do not hold up the others. Each response is sent as configured and nothing more: no keep-alive (every
response closes its connection), no HEAD, no query handling (``/a?x=1`` is served by route ``/a``).
Paths without a route answer 404. ``routes`` may be changed while the server runs.
"""

from __future__ import annotations

import io
import socket
import socketserver
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal, final
from urllib.parse import urlsplit

from PIL import Image


@dataclass
class Route:
    """What one path answers.

    ``content_type=None`` sends no Content-Type header. ``delay`` waits before the status line (a server
    that is slow to answer); the wait ends early when the server closes. ``headers`` are sent as given
    and replace the server's own of the same name, e.g. a lying ``Content-Length``. ``fail_times``: the
    first that many requests get ``fail_status`` with an empty body instead (a flaky server), with
    ``headers`` still sent so that a 429 or 503 can carry ``Retry-After``. ``framing``
    is how the body's end is marked: "length" (Content-Length), "chunked" (Transfer-Encoding: chunked,
    no length) or "close" (no length, the body ends when the connection closes).
    """

    status: int = 200
    body: bytes = b""
    content_type: str | None = "image/png"
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    fail_times: int = 0
    fail_status: int = 500
    framing: Literal["length", "chunked", "close"] = "length"


_NOT_FOUND = Route(status=404, body=b"no such route", content_type="text/plain")


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 makes the kernel drop connections when a test opens many at once, and
    # dropped SYNs are retried after a second: slow tests that look like a downloader bug.
    request_queue_size = 128

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.closing = threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall for seconds without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # needed for chunked responses; every response still closes
    server: _Server

    def do_GET(self) -> None:  # the name http.server dispatches to
        path = urlsplit(self.path).path
        with self.server.lock:
            seen = self.server.hits[path]
            self.server.hits[path] += 1
        route = self.server.routes.get(path, _NOT_FOUND)
        if route.delay > 0:
            self.server.closing.wait(route.delay)
        if seen < route.fail_times:
            route = Route(status=route.fail_status, content_type="text/plain", headers=route.headers)
        try:
            self._answer(route)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout, or a body it did not want): expected in these tests

    def _answer(self, route: Route) -> None:
        self.close_connection = True
        self.send_response(route.status)
        own = {name.lower() for name in route.headers}
        if route.content_type is not None and "content-type" not in own:
            self.send_header("Content-Type", route.content_type)
        if route.framing == "length" and "content-length" not in own:
            self.send_header("Content-Length", str(len(route.body)))
        if route.framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        for name, value in route.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if route.framing == "chunked":
            for start in range(0, len(route.body), 4096):
                piece = route.body[start:start + 4096]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(route.body)

    def log_message(self, format: str, *args: object) -> None:  # the base class's signature
        pass  # keep test output clean; ``hits`` records what was asked


@final
class ImageServer:
    """Context manager running a local HTTP server with the given routes (see the module docstring)."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self._server = _Server(dict(routes))
        # A short poll interval: shutdown() waits for the next poll, and tests start and stop many servers.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="image-server", daemon=True,
        )

    @property
    def routes(self) -> dict[str, Route]:
        return self._server.routes

    @property
    def hits(self) -> Counter[str]:
        """Requests received per path (counted on arrival, before any delay), including unrouted paths."""
        return self._server.hits

    def url(self, path: str) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{path}"

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.closing.set()  # wakes delayed handlers so they finish instead of sleeping on
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def png_bytes(color: tuple[int, int, int] = (200, 100, 50), size: int = 32) -> bytes:
    """A valid size x size RGB PNG of one colour."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def refused_url(path: str = "/image.png") -> str:
    """A URL on 127.0.0.1 whose port was free a moment ago, so connecting to it is refused.

    Another process could take the port in between; on a test machine that is unlikely enough.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
