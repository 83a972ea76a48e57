"""Tests for convforever.data.fetch against a local HTTP server (tests/http_fixtures.py).

Timeouts are short (0.5 s) and backoffs tiny so the file runs in seconds; time is asserted only as
generous upper bounds (something returned promptly) or as lower bounds a correct sleep cannot miss.
"""

from __future__ import annotations

import threading
import time

import pytest
from http_fixtures import ImageServer, Route, png_bytes, refused_url

from convforever.data.fetch import (
    RETRY_AFTER_CAP,
    SKIP_REASONS,
    FetchConfig,
    _retry_after_seconds,
    fetch_images,
)

FAST = FetchConfig(timeout=0.5, retries=2, backoff=0.01, max_bytes=10_000, concurrency=4)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy set in the environment must not route the tests' 127.0.0.1 requests elsewhere."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def _fetch_one(url: str, config: FetchConfig = FAST) -> tuple[bytes | None, str | None]:
    results = list(fetch_images([("key", url)], config))
    assert len(results) == 1 and results[0][0] == "key"
    return results[0][1], results[0][2]


def _fetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("convforever-fetch")]


# ------------------------------------------------------------------------------------------------ success


def test_good_png_is_returned_byte_identical() -> None:
    body = png_bytes((10, 20, 30), size=16)
    with ImageServer({"/a.png": Route(body=body)}) as server:
        assert _fetch_one(server.url("/a.png")) == (body, None)
        assert server.hits["/a.png"] == 1


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_body_without_content_length_is_read_to_the_end(framing: str) -> None:
    body = bytes(range(256)) * 30  # 7680 bytes: several chunks, under max_bytes
    with ImageServer({"/b": Route(body=body, framing=framing)}) as server:  # type: ignore[arg-type]
        assert _fetch_one(server.url("/b")) == (body, None)


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "image/jpeg; charset=binary"])
def test_missing_or_generic_content_type_is_accepted(content_type: str | None) -> None:
    with ImageServer({"/c": Route(body=b"bytes", content_type=content_type)}) as server:
        assert _fetch_one(server.url("/c")) == (b"bytes", None)


def test_redirect_to_http_is_followed_and_to_other_schemes_refused() -> None:
    body = png_bytes()
    routes = {
        "/moved": Route(status=302, headers={"Location": "/real.png"}, content_type=None),
        "/real.png": Route(body=body),
        "/to-ftp": Route(status=302, headers={"Location": "ftp://127.0.0.1/x.png"}, content_type=None),
    }
    with ImageServer(routes) as server:
        assert _fetch_one(server.url("/moved")) == (body, None)
        assert _fetch_one(server.url("/to-ftp")) == (None, "url_http_error")


def test_spaces_and_non_ascii_in_path_are_percent_encoded() -> None:
    with ImageServer({"/a%20b%C3%A9.png": Route(body=b"x")}) as server:
        assert _fetch_one(server.url("/a bé.png")) == (b"x", None)


# ----------------------------------------------------------------------------------------- HTTP failures


@pytest.mark.parametrize("status", [404, 410])
def test_not_found_is_not_retried(status: int) -> None:
    with ImageServer({"/gone": Route(status=status, content_type="text/plain")}) as server:
        assert _fetch_one(server.url("/gone")) == (None, "url_not_found")
        assert server.hits["/gone"] == 1


def test_other_4xx_is_not_retried() -> None:
    with ImageServer({"/no": Route(status=403, content_type="text/plain")}) as server:
        assert _fetch_one(server.url("/no")) == (None, "url_http_error")
        assert server.hits["/no"] == 1


def test_persistent_500_is_retried_then_reported() -> None:
    with ImageServer({"/err": Route(status=500, content_type="text/plain")}) as server:
        assert _fetch_one(server.url("/err")) == (None, "url_http_error")
        assert server.hits["/err"] == 1 + FAST.retries


def test_flaky_500_then_success() -> None:
    body = png_bytes()
    with ImageServer({"/flaky": Route(body=body, fail_times=1)}) as server:
        assert _fetch_one(server.url("/flaky")) == (body, None)
        assert server.hits["/flaky"] == 2


def test_429_is_retried_after_retry_after() -> None:
    route = Route(body=b"ok", fail_times=1, fail_status=429, headers={"Retry-After": "1"})
    with ImageServer({"/busy": route}) as server:
        start = time.monotonic()
        assert _fetch_one(server.url("/busy")) == (b"ok", None)
        assert time.monotonic() - start >= 0.9  # waited for Retry-After, not just the 0.01 s backoff
        assert server.hits["/busy"] == 2


def test_retry_after_is_parsed_and_capped() -> None:
    assert _retry_after_seconds(None) is None
    assert _retry_after_seconds("garbage") is None
    assert _retry_after_seconds("2") == 2.0
    assert _retry_after_seconds("86400") == RETRY_AFTER_CAP
    assert _retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: no wait


def test_no_retries_means_one_attempt() -> None:
    config = FetchConfig(timeout=0.5, retries=0, backoff=0.01)
    with ImageServer({"/err": Route(status=503, content_type="text/plain")}) as server:
        assert _fetch_one(server.url("/err"), config) == (None, "url_http_error")
        assert server.hits["/err"] == 1


# ------------------------------------------------------------------------------------ content and size


def test_html_is_not_an_image() -> None:
    with ImageServer({"/page": Route(body=b"<html></html>", content_type="text/html; charset=utf-8")}) as server:
        assert _fetch_one(server.url("/page")) == (None, "url_not_image")
        assert server.hits["/page"] == 1


def test_content_length_over_max_bytes_is_too_large() -> None:
    # The header lies (the body is 5 bytes), so only the header check can call it too large.
    route = Route(body=b"small", headers={"Content-Length": str(10**9)})
    with ImageServer({"/huge": route}) as server:
        assert _fetch_one(server.url("/huge")) == (None, "url_too_large")
        assert server.hits["/huge"] == 1


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_body_over_max_bytes_without_content_length_is_too_large(framing: str) -> None:
    with ImageServer({"/big": Route(body=b"\0" * 50_000, framing=framing)}) as server:  # type: ignore[arg-type]
        assert _fetch_one(server.url("/big")) == (None, "url_too_large")


def test_body_of_exactly_max_bytes_is_accepted() -> None:
    body = b"\1" * FAST.max_bytes
    with ImageServer({"/edge": Route(body=body, framing="close")}) as server:
        assert _fetch_one(server.url("/edge")) == (body, None)


# ------------------------------------------------------------------------------------ network failures


def test_slow_server_times_out_and_is_retried() -> None:
    config = FetchConfig(timeout=0.5, retries=1, backoff=0.01)
    with ImageServer({"/slow": Route(body=b"late", delay=3.0)}) as server:
        start = time.monotonic()
        assert _fetch_one(server.url("/slow"), config) == (None, "url_timeout")
        assert time.monotonic() - start < 2.9  # gave up on its own, not when the server finally answered
        assert server.hits["/slow"] == 2


def test_connection_refused_is_unreachable() -> None:
    assert _fetch_one(refused_url()) == (None, "url_unreachable")


@pytest.mark.parametrize("url", [
    "ftp://x", "file:///etc/passwd", "data:image/png;base64,AAAA", "not a url", "", "http://", "https:///path",
    "http://127.0.0.1:notaport/x.png", "http://127.0.0.1:99999/x.png", "http://[::1/x", None, 42,
])
def test_bad_urls_are_reported_not_raised(url: object) -> None:
    assert _fetch_one(url) == (None, "url_bad")  # type: ignore[arg-type]


def test_reasons_are_the_documented_ones() -> None:
    assert set(SKIP_REASONS) == {
        "url_not_found", "url_http_error", "url_timeout", "url_unreachable", "url_too_large", "url_not_image",
        "url_bad",
    }


# -------------------------------------------------------------------------------- concurrency and bounds


def test_many_urls_each_returned_once_with_their_key() -> None:
    routes = {f"/img{i}.png": Route(body=f"image {i}".encode()) for i in range(100)}
    routes["/missing"] = Route(status=404, content_type="text/plain")
    with ImageServer(routes) as server:
        items = [(i, server.url(f"/img{i}.png")) for i in range(100)] + [(-1, server.url("/missing"))]
        results = list(fetch_images(items, FetchConfig(timeout=5.0, retries=0, concurrency=8)))
        assert sorted(key for key, _, _ in results) == [-1, *range(100)]
        for key, body, reason in results:
            if key == -1:
                assert (body, reason) == (None, "url_not_found")
            else:
                assert (body, reason) == (f"image {key}".encode(), None)
        assert all(server.hits[f"/img{i}.png"] == 1 for i in range(100))


def test_input_is_consumed_lazily() -> None:
    config = FetchConfig(timeout=5.0, retries=0, concurrency=3)
    consumed = 0
    with ImageServer({"/x": Route(body=b"x")}) as server:

        def items():  # endless: only a lazy, bounded reader can return at all
            nonlocal consumed
            while True:
                consumed += 1
                yield consumed, server.url("/x")

        results = fetch_images(items(), config)
        for _ in range(10):
            assert next(results)[1:] == (b"x", None)
        results.close()
    assert consumed <= 10 + 2 * config.concurrency + 1


def test_closing_early_returns_promptly_and_stops_downloads() -> None:
    config = FetchConfig(timeout=1.0, retries=3, backoff=0.5, concurrency=4)
    routes = {"/fast": Route(body=b"fast"), "/slow": Route(body=b"slow", delay=30.0)}
    with ImageServer(routes) as server:
        items = [(0, server.url("/fast"))] + [(i, server.url("/slow")) for i in range(1, 50)]
        results = fetch_images(items, config)
        assert next(results) == (0, b"fast", None)
        start = time.monotonic()
        results.close()
        assert time.monotonic() - start < 0.5
        # Running downloads end within about one timeout; queued ones never start, nothing retries.
        deadline = time.monotonic() + 5.0
        while _fetch_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _fetch_threads()
        assert server.hits["/slow"] <= config.concurrency


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(("field", "value"), [
    ("timeout", 0), ("timeout", -1.0), ("timeout", float("inf")), ("retries", -1), ("retries", 1.5),
    ("backoff", -0.1), ("max_bytes", 0), ("concurrency", 0), ("user_agent", ""), ("user_agent", "a\r\nb"),
])
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        FetchConfig(**{field: value})  # type: ignore[arg-type]


def test_default_config_is_valid() -> None:
    config = FetchConfig()
    assert (config.timeout, config.retries, config.concurrency) == (10.0, 2, 16)
