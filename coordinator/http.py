"""The coordinator's HTTP API: JSON over aiohttp, on a uvloop event loop in a background thread.

The coordinator's main loop (DHT reads, checkpoints) is blocking code; the API runs beside it on its own
event loop, so a slow checkpoint never delays a peer's lease renewal. Routes (documented in the README):

    GET  /healthz                        "ok": the process is up
    GET  /api/v1/data                    the data plan's progress (passes, shards done, rows, skips)
    POST /api/v1/leases                  {"peer_id"} -> {"lease": {...} | null, "retry_after": s}
    POST /api/v1/leases/{id}/renew       {"peer_id", "rows_done"} -> {"ttl": s}      (410: lease lost)
    POST /api/v1/leases/{id}/complete    {"peer_id", "used", "skipped": {reason: n}} (409: already done)
    POST /api/v1/leases/{id}/release     {"peer_id", "rows_done"}: a leaving peer hands its shard back

`web.py` adds the run's page (``/``), ``/api/status``, ``/metrics`` and the checkpoint files.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Optional

import uvloop
from aiohttp import web

from .leases import LeaseError, LeaseLedger

logger = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # lease calls carry a few counters; anything bigger is not ours


class BadRequest(Exception):
    pass


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except Exception:
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _field(body: dict, name: str, kind: type, default=None):
    value = body.get(name, default)
    if value is None or (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise BadRequest(f"field {name!r} must be {kind.__name__}, got {value!r}")
    if kind is int and value < 0:
        raise BadRequest(f"field {name!r} must be >= 0")
    if kind is str and not 0 < len(value) <= 200:
        raise BadRequest(f"field {name!r} must be 1-200 characters")
    return value


def _skipped(body: dict) -> dict[str, int]:
    skipped = body.get("skipped", {})
    if not isinstance(skipped, dict) or len(skipped) > 100 or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in skipped.items()):
        raise BadRequest("field 'skipped' must map up to 100 reasons to counts >= 0")
    return skipped


class LeaseApi:
    """The lease routes over a `LeaseLedger` (None: this coordinator has no dataset, peers bring their own)."""

    def __init__(self, ledger: Optional[LeaseLedger], retry_after: float = 10.0) -> None:
        self.ledger = ledger
        self.retry_after = retry_after

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/v1/data", self.data),
            web.post("/api/v1/leases", self.grant),
            web.post("/api/v1/leases/{lease_id}/renew", self.renew),
            web.post("/api/v1/leases/{lease_id}/complete", self.complete),
            web.post("/api/v1/leases/{lease_id}/release", self.release),
        ]

    def _ledger(self) -> LeaseLedger:
        if self.ledger is None:
            raise web.HTTPNotFound(text='{"error": "this coordinator has no --dataset; peers train on their own --data"}',
                                   content_type="application/json")
        return self.ledger

    async def data(self, request: web.Request) -> web.Response:
        return web.json_response(await _offload(self._ledger().summary))

    async def grant(self, request: web.Request) -> web.Response:
        ledger = self._ledger()
        body = await _json_body(request)
        grant = await _offload(ledger.grant, _field(body, "peer_id", str))
        if grant is None:
            return web.json_response({"lease": None, "retry_after": self.retry_after})
        return web.json_response({"lease": grant.to_dict()})

    async def renew(self, request: web.Request) -> web.Response:
        ledger = self._ledger()
        body = await _json_body(request)
        ttl = await _offload(ledger.renew, request.match_info["lease_id"], _field(body, "peer_id", str),
                             _field(body, "rows_done", int, 0))
        return web.json_response({"ttl": ttl})

    async def complete(self, request: web.Request) -> web.Response:
        ledger = self._ledger()
        body = await _json_body(request)
        await _offload(ledger.complete, request.match_info["lease_id"], _field(body, "peer_id", str),
                       _field(body, "used", int), _skipped(body))
        return web.json_response({"ok": True})

    async def release(self, request: web.Request) -> web.Response:
        ledger = self._ledger()
        body = await _json_body(request)
        await _offload(ledger.release, request.match_info["lease_id"], _field(body, "peer_id", str),
                       _field(body, "rows_done", int, 0))
        return web.json_response({"ok": True})


async def _offload(fn, *args):
    """SQLite commits fsync: run them off the event loop so one slow disk write never blocks the others."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


@web.middleware
async def _errors(request: web.Request, handler):
    """Every refusal is JSON with a message that says what to do next."""
    try:
        return await handler(request)
    except BadRequest as e:
        return web.json_response({"error": str(e)}, status=400)
    except LeaseError as e:
        return web.json_response({"error": str(e)}, status=e.status)


class HttpServer:
    """aiohttp on a uvloop loop in a daemon thread; `start` returns once the socket is listening."""

    def __init__(self, routes: list[web.RouteDef], host: str = "0.0.0.0", port: int = 0,
                 middlewares: tuple = ()) -> None:
        # extra middlewares run inside the error handler: a private run's access gate (access_http.py)
        self.app = web.Application(middlewares=[_errors, *middlewares], client_max_size=MAX_BODY)
        self.app.add_routes([web.get("/healthz", self._health), *routes])
        self.host, self.port = host, port
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="coordinator-http", daemon=True)
        self.runner: Optional[web.AppRunner] = None

    @staticmethod
    async def _health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _start(self) -> int:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    def start(self) -> int:
        self.thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        except OSError as e:
            self.stop()
            raise OSError(f"could not listen on http://{self.host}:{self.port} ({e}); is the port in use? "
                          "pick another with --http-port (0 picks a free one)") from None
        return self.port

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
            self.runner = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
