"""The run's public face on the coordinator's HTTP server: a page, its JSON, and Prometheus metrics.

    GET /                                      the run's page (static/index.html: plots drawn in the browser)
    GET /api/status                            the status document (`status.build_status`); 503 before the first tick
    GET /metrics                               Prometheus text format 0.0.4; 503 before the first tick
    GET /checkpoints/step-N/model.safetensors  the checkpoint's files (config.json too), when `checkpoint_dir` is given

Handlers only read the `StatusBoard` the main loop fills, so a busy page never slows the DHT or the leases.
The page makes no request to any other host (its Content-Security-Policy forbids it), so it works offline
and leaks no visitor to a CDN.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import re
from pathlib import Path

from aiohttp import web

from convforever.model.checkpoint import CONFIG_NAME, EMA_WEIGHTS_NAME, WEIGHTS_NAME

from .status import StatusBoard, prometheus_text

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Never anything else from the checkpoint dir (the coordinator's key and the ledger live there).
CHECKPOINT_FILES = (WEIGHTS_NAME, EMA_WEIGHTS_NAME, CONFIG_NAME)
NOT_READY = b'{"error": "the coordinator has not finished its first look at the swarm yet; retry in a few seconds"}'


def _page() -> tuple[bytes, str]:
    """The page and a Content-Security-Policy that allows exactly its inline scripts and nothing remote."""
    html = importlib.resources.files(__package__).joinpath("static/index.html").read_bytes()
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
                      for script in re.findall(rb"<script>(.*?)</script>", html, flags=re.DOTALL))
    csp = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src 'self' data:; "
           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, csp


class WebApi:
    """The page routes over a `StatusBoard`; with `checkpoint_dir`, also serves the checkpoints' two files."""

    def __init__(self, board: StatusBoard, checkpoint_dir: Path | None = None) -> None:
        self.board = board
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.page, self.csp = _page()

    def routes(self) -> list[web.RouteDef]:
        routes = [
            web.get("/", self.index),
            web.get("/api/status", self.status),
            web.get("/metrics", self.metrics),
        ]
        if self.checkpoint_dir is not None:
            routes.append(web.get(r"/checkpoints/{step:step-[0-9]+}/{name}", self.checkpoint_file))
        return routes

    def checkpoint_url(self, path: str) -> str | None:
        """The page's link to a checkpoint folder's weights (relative to the server's root), if served here."""
        if self.checkpoint_dir is None or not path:
            return None
        folder = Path(path)
        if folder.parent.resolve() != self.checkpoint_dir.resolve() or not re.fullmatch(r"step-[0-9]+", folder.name):
            return None
        return f"checkpoints/{folder.name}/{CHECKPOINT_FILES[0]}"

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(body=self.page, content_type="text/html", charset="utf-8", headers={
            "Content-Security-Policy": self.csp, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    async def status(self, request: web.Request) -> web.Response:
        body = self.board.current_json()
        if body is None:
            return web.Response(body=NOT_READY, status=503, content_type="application/json",
                                headers={"Retry-After": "5"})
        response = web.Response(body=body, content_type="application/json", headers={"Cache-Control": "no-store"})
        response.enable_compression()  # the curves are up to a few hundred kB of numbers; gzip takes ~4x off
        return response

    async def metrics(self, request: web.Request) -> web.Response:
        status = self.board.current()
        if status is None:
            return web.Response(text="# the coordinator has not finished its first tick yet\n", status=503,
                                headers={"Retry-After": "5"})
        return web.Response(body=prometheus_text(status).encode(),
                            headers={"Content-Type": PROMETHEUS_CONTENT_TYPE, "Cache-Control": "no-store"})

    async def checkpoint_file(self, request: web.Request) -> web.StreamResponse:
        assert self.checkpoint_dir is not None
        name = request.match_info["name"]
        path = self.checkpoint_dir / request.match_info["step"] / name
        if name not in CHECKPOINT_FILES or not path.is_file():
            raise web.HTTPNotFound(text=f"no such checkpoint file; see {request.url.with_path('/api/status')} "
                                        "for the latest checkpoint")
        return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{name}"'})
