"""Concurrent, bounded image downloads for URL-based datasets (jsonl / LAION rows: an image URL per line).

Standard library only (urllib + a thread pool): the peers already depend on enough. Every failure becomes
one of a few skip reasons (``SKIP_REASONS``) that the caller counts next to the decoder's, so one dead
host, a 404, an HTML error page or a 2 GB file costs one skipped row, never an exception or a stuck peer.

Why these choices:

* Only transient failures (5xx, 429, timeouts, dropped connections) are retried, with doubling backoff:
  a 404 stays a 404, and retrying it only hammers a host that already said no. A host whose name does
  not resolve, or whose TLS certificate does not verify, is not retried either: URL lists are full of
  dead domains and each retry would hold a download slot for nothing.
* Sizes are checked on ``Content-Length`` before reading, then counted while reading, because servers
  omit or lie about it; the body is read in pieces as they arrive so the per-attempt time limit holds
  even against a server that trickles bytes.
* Requests go through an opener with only the HTTP(S) handlers: a redirect to ``file:`` or ``ftp:``
  from an untrusted server is refused rather than followed.
* ``fetch_images`` consumes its input lazily and keeps at most ``2 * concurrency`` downloads submitted
  (running or finished but not yet yielded), so a billion-row URL list costs bounded memory.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import math
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

logger = logging.getLogger(__name__)

K = TypeVar("K")

#: Every reason ``fetch_images`` reports, for callers that print all counters (even the zero ones).
SKIP_REASONS: tuple[str, ...] = (
    "url_not_found", "url_http_error", "url_timeout", "url_unreachable", "url_too_large", "url_not_image",
    "url_bad",
)

#: The longest a ``Retry-After`` header can make one retry wait, in seconds: a server asking for an hour
#: gets the row skipped after the retries instead of a download slot blocked for that long.
RETRY_AFTER_CAP = 5.0

# Media types accepted besides image/*: what servers send when they do not know (S3 sends binary/...).
_GENERIC_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})
_READ_CHUNK = 1 << 16
_THREAD_PREFIX = "convforever-fetch"
# Left as they are when percent-encoding path and query: all printable ASCII but space, so a URL that
# http.client would send unchanged is sent unchanged (and existing %XX escapes are not escaped twice).
_URL_SAFE = "".join(chr(code) for code in range(0x21, 0x7F))


@dataclass
class FetchConfig:
    """How hard to try for each URL, and how many to try at once.

    ``timeout`` bounds one attempt, connecting and reading together (a stalled read can overrun it by at
    most one more ``timeout``, the socket's own limit). ``retries`` are extra attempts after the first,
    only for transient failures, waiting ``backoff`` seconds before the first retry and twice as long
    before each next one. Responses over ``max_bytes`` are abandoned as "url_too_large".
    """

    timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.5
    max_bytes: int = 20_000_000
    concurrency: int = 16
    user_agent: str = "convforever/0.1 (+https://github.com/convforever)"

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout={self.timeout!r}: use a positive number of seconds, e.g. 10")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries={self.retries!r}: use 0 (no retry) or a small positive integer")
        if not (isinstance(self.backoff, (int, float)) and math.isfinite(self.backoff) and self.backoff >= 0):
            raise ValueError(f"backoff={self.backoff!r}: use 0 or a positive number of seconds, e.g. 0.5")
        if not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ValueError(f"max_bytes={self.max_bytes!r}: use a positive number of bytes, e.g. 20_000_000")
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency!r}: use at least 1 download in flight")
        agent = self.user_agent
        if not (isinstance(agent, str) and agent.strip() and agent.isascii() and agent.isprintable()):
            raise ValueError(f"user_agent={self.user_agent!r}: use a non-empty single-line ASCII string")


class _Failure(Exception):
    """One attempt's outcome as a skip reason; ``transient`` failures are worth another attempt."""

    def __init__(self, reason: str, transient: bool, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.transient = transient
        self.retry_after = retry_after


class _Cancelled(Exception):
    """The generator was closed: stop without another attempt (nobody will read the result)."""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only; any other target leaves the 3xx as an "url_http_error"."""

    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _build_opener() -> urllib.request.OpenerDirector:
    """An opener that speaks HTTP(S) and nothing else (urllib's default also opens file:, ftp: and data:).

    Proxies come from the usual environment variables, as with ``urllib.request.urlopen``.
    """
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(context=ssl.create_default_context()),
        _HttpOnlyRedirects(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _normalize_url(url: object) -> str:
    """Return a URL http.client accepts, or raise _Failure("url_bad").

    Percent-encodes spaces, control and non-ASCII characters in the path and query (common in scraped URL
    lists, and rejected by http.client as they are); the host is left to http.client's IDNA encoding.
    """
    if not isinstance(url, str):
        raise _Failure("url_bad", False, f"not a string: {type(url).__name__}")
    try:
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme.lower() not in ("http", "https"):
            raise _Failure("url_bad", False, f"scheme {parts.scheme!r} is not http or https")
        if not parts.hostname:
            raise _Failure("url_bad", False, "no host")
        _ = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError as error:
        raise _Failure("url_bad", False, str(error)) from error
    path = urllib.parse.quote(parts.path, safe=_URL_SAFE) or "/"
    query = urllib.parse.quote(parts.query, safe=_URL_SAFE)
    # The fragment is never sent; dropping it avoids quoting it for nothing.
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, query, ""))


def _retry_after_seconds(value: str | None) -> float | None:
    """Parse ``Retry-After`` (delta seconds or an HTTP date) into seconds from now, capped; None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_CAP)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return min(max(when.timestamp() - time.time(), 0.0), RETRY_AFTER_CAP)


def _classify(error: BaseException) -> _Failure:
    """Map what urllib / http.client / socket raise to a skip reason and whether to retry."""
    if isinstance(error, urllib.error.HTTPError):
        code, detail = error.code, f"HTTP {error.code} {error.reason}"
        if code in (404, 410):
            return _Failure("url_not_found", False, detail)
        if code == 429 or code >= 500:
            return _Failure("url_http_error", True, detail, _retry_after_seconds(error.headers.get("Retry-After")))
        return _Failure("url_http_error", False, detail)
    if isinstance(error, urllib.error.URLError):
        reason = error.reason
        if isinstance(reason, BaseException):
            return _classify(reason)
        # A string reason: urllib refused the URL itself ("unknown url type", "no host given").
        return _Failure("url_bad", False, str(reason))
    if isinstance(error, TimeoutError):  # socket.timeout is TimeoutError from Python 3.10 on
        return _Failure("url_timeout", True, "timed out")
    if isinstance(error, socket.gaierror):
        # A name that does not exist will not exist in a second either; "try again" (EAI_AGAIN) might.
        permanent = error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))
        return _Failure("url_unreachable", not permanent, f"DNS: {error}")
    if isinstance(error, ssl.SSLCertVerificationError):
        return _Failure("url_unreachable", False, f"TLS: {error}")
    if isinstance(error, (OSError, http.client.IncompleteRead)):
        # Refused, reset, unreachable network, TLS handshake failure, body cut short.
        return _Failure("url_unreachable", True, f"{type(error).__name__}: {error}")
    if isinstance(error, http.client.HTTPException):
        # The server answered something that is not HTTP (bad status line, oversized headers).
        return _Failure("url_http_error", False, f"{type(error).__name__}: {error}")
    if isinstance(error, ValueError):
        # http.client.InvalidURL, UnicodeError from an unencodable host name, bad header values.
        return _Failure("url_bad", False, f"{type(error).__name__}: {error}")
    raise error  # anything else is a bug, not a property of the URL


def _attempt(opener: urllib.request.OpenerDirector, url: str, config: FetchConfig, stop: threading.Event) -> bytes:
    """One request; returns the body or raises _Failure / _Cancelled."""
    deadline = time.monotonic() + config.timeout
    request = urllib.request.Request(url, headers={
        "User-Agent": config.user_agent,
        "Accept": "image/*, application/octet-stream;q=0.9, */*;q=0.1",
        "Accept-Encoding": "identity",  # urllib does not decompress, and sizes must count real bytes
    })
    try:
        with opener.open(request, timeout=config.timeout) as response:
            content_type = (response.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
            if content_type and not content_type.startswith("image/") and content_type not in _GENERIC_TYPES:
                raise _Failure("url_not_image", False, f"Content-Type {content_type}")
            if response.length is not None and response.length > config.max_bytes:
                raise _Failure("url_too_large", False, f"Content-Length {response.length} > {config.max_bytes}")
            chunks: list[bytes] = []
            size = 0
            while True:
                if stop.is_set():
                    raise _Cancelled
                if time.monotonic() > deadline:
                    raise _Failure("url_timeout", True, f"body not read within {config.timeout} s")
                # read1 returns what one socket read gives, so the deadline is checked as bytes trickle in.
                chunk = response.read1(min(_READ_CHUNK, config.max_bytes + 1 - size))
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > config.max_bytes:
                    raise _Failure("url_too_large", False, f"body over {config.max_bytes} bytes")
                chunks.append(chunk)
    except (_Failure, _Cancelled):
        raise
    except urllib.error.HTTPError as error:
        failure = _classify(error)
        error.close()  # an HTTPError holds the response and its socket open
        raise failure from error
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise _classify(error) from error


def _fetch_one(
    opener: urllib.request.OpenerDirector, url: object, config: FetchConfig, stop: threading.Event,
) -> tuple[bytes | None, str | None]:
    """All attempts for one URL: (body, None) or (None, reason)."""
    try:
        normalized = _normalize_url(url)
        for attempt in range(config.retries + 1):
            if stop.is_set():
                raise _Cancelled
            try:
                return _attempt(opener, normalized, config, stop), None
            except _Failure as failure:
                if not failure.transient or attempt == config.retries:
                    raise
                delay = config.backoff * 2**attempt
                if failure.retry_after is not None:
                    delay = max(delay, failure.retry_after)
                logger.debug("retrying %s in %.2f s (%s)", url, delay, failure)
                if stop.wait(delay):
                    raise _Cancelled from None
        raise AssertionError("unreachable: the last attempt returns or raises")
    except _Failure as failure:
        logger.debug("skipping %s (%s)", url, failure)
        return None, failure.reason
    except _Cancelled:
        return None, "cancelled"  # never yielded: the generator that would yield it is closed


def fetch_images(items: Iterable[tuple[K, str]], config: FetchConfig) -> Iterator[tuple[K, bytes | None, str | None]]:
    """Download every (key, url); yield (key, body, None) on success or (key, None, reason) on failure.

    Lazily consumes `items` (bounded: at most ~2*concurrency in flight/buffered), yields in completion order.

    ``reason`` is one of ``SKIP_REASONS``; a bad URL is reported, never raised. The body is whatever the
    server sent (possibly empty, possibly not a decodable image): decoding is the caller's job. Closing the
    generator early (``close()``, ``break`` or garbage collection) cancels downloads not yet started and
    tells running ones to stop; it does not wait for them, and each ends within about one ``timeout``.
    """
    opener = _build_opener()
    stop = threading.Event()
    # Twice the thread count submitted, so a thread that finishes finds the next URL already queued
    # while the consumer is still busy with earlier results.
    limit = 2 * config.concurrency
    pending: dict[Future[tuple[bytes | None, str | None]], K] = {}
    executor = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix=_THREAD_PREFIX)
    try:
        source = iter(items)
        exhausted = False
        while True:
            while not exhausted and len(pending) < limit:
                try:
                    key, url = next(source)
                except StopIteration:
                    exhausted = True
                    break
                pending[executor.submit(_fetch_one, opener, url, config, stop)] = key
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                key = pending.pop(future)
                body, reason = future.result()
                yield key, body, reason
    finally:
        stop.set()
        executor.shutdown(wait=False, cancel_futures=True)
