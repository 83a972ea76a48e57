"""The HTTP side of a private run: the certificate exchange, and the gate in front of every other route.

    POST /api/v1/certificate   {"token", "peer_id", "key", "time", "proof"} -> {"certificate", "run_key", "ttl",
                               "revocations"}; 401 bad token, 403 revoked token (always open: it is how one gets in)
    GET  /api/v1/revocations   the signed list of revoked token ids (always open: it is signed, and says nothing secret)

The gate (`access_middleware`), in a private run:
  * lease calls (``/api/v1/leases...``) need the peer's certificate and a signature with its key
    (`Issuer.verify_request`), and the body's ``peer_id`` must be the certificate's;
  * the page and its data (``/``, ``/api/status``, ``/metrics``, ``/api/v1/data``, ``/checkpoints/...``) need a join
    token (``Authorization: Bearer TOKEN``, ``?token=TOKEN`` which also sets a cookie for the page's own requests, or
    a signed certificate), unless the coordinator runs with ``--public-status``;
  * ``/healthz`` stays open (peers probe which announced URL answers).
A public run installs none of this.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from aiohttp import web

from .access import DEFAULT_TTL, AccessError, Issuer, open_issuer

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/api/v1/certificate", "/api/v1/revocations"})
TOKEN_COOKIE = "convforever_token"


def _refusal(e: AccessError) -> web.Response:
    return web.json_response({"error": str(e)}, status=e.status)


class AccessApi:
    """Routes that hand out certificates and the revocation list."""

    def __init__(self, issuer: Issuer) -> None:
        self.issuer = issuer

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/api/v1/certificate", self.certificate), web.get("/api/v1/revocations", self.revocations)]

    async def certificate(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response({"error": "the body must be a JSON object"}, status=400)
        fields = {"token": str, "peer_id": str, "key": str, "proof": str}
        for name, kind in fields.items():
            if not isinstance(body.get(name), kind) or not 0 < len(body[name]) <= 4096:
                return web.json_response({"error": f"field {name!r} must be a non-empty string"}, status=400)
        at = body.get("time")
        if isinstance(at, bool) or not isinstance(at, (int, float)):
            return web.json_response({"error": "field 'time' must be a number (unix seconds)"}, status=400)
        try:
            cert = self.issuer.issue(body["token"], body["peer_id"], body["key"], float(at), body["proof"])
        except AccessError as e:
            logger.info(f"refused a certificate to {body['peer_id']}: {e}")
            return _refusal(e)
        logger.info(f"issued a certificate to {cert.peer_id} (token {cert.token_id}, {self.issuer.ttl:.0f}s)")
        return web.json_response({
            "certificate": cert.to_wire(), "run_key": self.issuer.run_key.public.hex(), "ttl": self.issuer.ttl,
            "revocations": self.issuer.revocations().to_wire(),
        })

    async def revocations(self, request: web.Request) -> web.Response:
        return web.json_response({"revocations": self.issuer.revocations().to_wire()})


def _status_token(request: web.Request) -> tuple[Optional[str], bool]:
    """The join token a page or status request carries, and whether it came in the URL (then set the cookie)."""
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[7:].strip(), False
    if "token" in request.query:
        return request.query["token"], True
    return request.cookies.get(TOKEN_COOKIE), False


def access_middleware(issuer: Issuer, public_status: bool = False):
    """The private run's gate (see the module docstring); add it to the HttpServer's middlewares."""

    @web.middleware
    async def gate(request: web.Request, handler):
        path = request.path
        if path in OPEN_PATHS:
            return await handler(request)
        if path.startswith("/api/v1/leases"):
            body = await request.read()  # aiohttp keeps it: the handler reads the same bytes again
            try:
                cert = issuer.verify_request(request.method, request.path_qs, request.headers, body)
            except AccessError as e:
                return _refusal(e)
            try:
                claimed = json.loads(body).get("peer_id") if body else None
            except (ValueError, AttributeError):
                claimed = None
            if claimed is not None and claimed != cert.peer_id:
                return _refusal(AccessError(403, f"the certificate is for peer {cert.peer_id}, the body names "
                                                 f"{claimed}; a peer may only act for itself"))
            return await handler(request)
        if public_status:
            return await handler(request)
        token, from_url = _status_token(request)
        try:
            if token:
                issuer.tokens.check(token)
            else:
                issuer.verify_request(request.method, request.path_qs, request.headers, b"")
        except AccessError as e:
            if not token and e.status == 401:
                e = AccessError(401, "this run's page is private: open it with ?token=TOKEN (a join token from "
                                     "the run's owner) or send Authorization: Bearer TOKEN")
            return _refusal(e)
        response = await handler(request)
        if from_url and token:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
        return response

    return gate


class PrivateRun:
    """What a private run adds to the coordinator: the issuer, its routes and gate, and its own membership."""

    def __init__(self, run_id: str, checkpoint_dir: Path, identity: Optional[Path], ttl: float = DEFAULT_TTL,
                 public_status: bool = False) -> None:
        from convforever.peer.access import SelfCertifiedMember

        self.issuer = open_issuer(run_id, checkpoint_dir, ttl)
        self.public_status = public_status
        self.member = SelfCertifiedMember(self.issuer, identity)

    def routes(self) -> list[web.RouteDef]:
        return AccessApi(self.issuer).routes()

    def middlewares(self) -> tuple:
        return (access_middleware(self.issuer, self.public_status),)

    def close(self) -> None:
        self.member.close()
        self.issuer.tokens.close()
