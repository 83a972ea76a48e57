"""Optional caption labelling by an LLM behind any OpenAI-compatible endpoint (OpenRouter, vLLM, llama.cpp, ...).

Why: the keyword rules in ``labels.py`` drop every row whose caption names none of their keywords; a language
model reads the whole caption and labels many of those. Its answers are not reproducible run to run, so peers
must never call it themselves: one person labels a dataset once and publishes the result as a *labels
dataset* (``id, label, label_name, source``) that every peer joins to its rows by ``id`` (``load_labels``),
so all peers still agree on every row's class.

A labelling run is cheap to interrupt. Every answer is appended to ``OUT/labels.jsonl`` and flushed after each
batch; a rerun with the same ``--out`` reads it back and asks only about ids it lacks. The same caption text is
asked once per run and never again in later runs. ``OUT/labels.parquet`` is rewritten from that cache now and
then and when the run ends, however it ends.

Nothing here trusts the endpoint: replies in code fences, with prose around them, with unknown category names,
missing items or no JSON at all leave the affected rows unlabelled (``label`` null) instead of failing the run;
only errors that need the user (a refused key, an unknown model, an unreachable URL) stop it, with a one-line
message that names the flag or variable to fix.
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import http.client
import json
import logging
import os
import queue
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from .labels import CATEGORIES, CATEGORY_INDEX, keywords_for, label_from_value
from .parquet import resolve_files

logger = logging.getLogger(__name__)

API_KEY_ENV = ("CONVFOREVER_LLM_API_KEY", "OPENAI_API_KEY")
LABELS_FILE = "labels.parquet"
CACHE_FILE = "labels.jsonl"
SOURCE = "llm"
LABELS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("label", pa.int64()),  # index into CATEGORIES; null when the model named no category
    ("label_name", pa.string()),
    ("source", pa.string()),
])

# Answer statuses. Only the first three are the model's own verdict on a caption, so only they are reused for
# the same caption text later; the others leave their rows unlabelled without speaking for other rows. REFUSED:
# the endpoint rejected the caption itself (HTTP 400 alone in its request, e.g. a moderation filter).
LABELLED, NONE, UNKNOWN = "labelled", "none", "unknown"
MISSING, UNPARSABLE, EMPTY, REFUSED = "missing", "unparsable", "empty", "refused"
_REUSABLE = frozenset({LABELLED, NONE, UNKNOWN})
_NONE_WORDS = frozenset({"none", "null", "nothing", "n/a", "na", "no category", "unknown", "other", "-", ""})
_RETRYABLE_HTTP = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
_BATCH_REJECTED_HTTP = frozenset({400, 413, 422})
_EXAMPLES_PER_CATEGORY = 6


def api_key_from_env() -> str:
    """The first non-empty of CONVFOREVER_LLM_API_KEY, OPENAI_API_KEY; empty is fine for local servers."""
    return next((os.environ[name] for name in API_KEY_ENV if os.environ.get(name)), "")


@dataclass
class LabellerConfig:
    """How to reach the model and how hard to push it.

    ``requests_per_minute`` is a hard ceiling on HTTP attempts (retries included) across all ``concurrency``
    threads; concurrency only helps when one request takes longer than ``60 / requests_per_minute`` seconds.
    """

    base_url: str
    model: str
    api_key: str = field(default_factory=api_key_from_env, repr=False)
    batch_size: int = 20  # captions per request: fewer requests, but a confused reply costs more rows
    requests_per_minute: float = 60.0
    concurrency: int = 4
    timeout: float = 120.0  # seconds per HTTP attempt
    retries: int = 6  # extra attempts after 429, 5xx, timeouts and connection errors
    backoff: float = 2.0  # first retry delay in seconds when the server gives no Retry-After; doubles each time
    max_backoff: float = 60.0
    max_retry_wait: float = 600.0  # a longer Retry-After (an exhausted daily quota) stops the run instead
    malformed_retries: int = 1  # ask again when a reply holds no usable JSON at all
    max_caption_chars: int = 500
    temperature: float = 0.0
    max_tokens: int | None = None  # None: the server's default
    json_mode: bool = False  # send response_format={"type": "json_object"}; not every server accepts it

    def __post_init__(self) -> None:
        self.base_url = self.base_url.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", self.base_url):
            raise ValueError(f"--llm-base-url {self.base_url!r} is not an http(s) URL; "
                             "expected e.g. https://openrouter.ai/api/v1 or http://127.0.0.1:8000/v1")
        self.base_url = self.base_url.removesuffix("/chat/completions")
        if not self.model.strip():
            raise ValueError("--llm-model is empty; name a model the endpoint serves")
        checks = {"--batch-size": self.batch_size >= 1, "--requests-per-minute": self.requests_per_minute > 0,
                  "--concurrency": self.concurrency >= 1, "--timeout": self.timeout > 0,
                  "--retries": self.retries >= 0}
        bad = [flag for flag, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be positive (retries may be 0)")

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/chat/completions"


class Answer(NamedTuple):
    """The model's verdict on one caption: a category index (or None) and why."""

    label: int | None
    status: str


class LabellerError(RuntimeError):
    """A failure only the user can fix (key, model, URL, quota); the message is one line naming what to fix."""


class _Retryable(Exception):
    def __init__(self, what: str, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.retry_after = retry_after


class _BatchRejected(Exception):
    """HTTP 400/413/422: this request was refused, which may be its content rather than the configuration."""


class _Stopped(LabellerError):
    def __init__(self) -> None:
        super().__init__("stopped before every caption was labelled")


# ------------------------------------------------------------------------------------------------ rate limit


class RateLimiter:
    """Spaces request starts at least ``60 / per_minute`` seconds apart, across threads.

    A token bucket of depth one: no bursts, because free tiers count requests per short window. A server's
    Retry-After pushes the next slot back for every thread, not just the one that was told.
    """

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 60.0 / per_minute
        self._clock = clock
        self._next = -float("inf")
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Claim the next slot; returns how many seconds the caller must wait for it."""
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
            return slot - now

    def push_back(self, delay: float) -> None:
        with self._lock:
            self._next = max(self._next, self._clock() + delay)


@dataclass
class RequestCounters:
    """HTTP attempts and outcomes, shared by the request threads."""

    requests: int = 0
    retries: int = 0
    replies: int = 0
    unparsable: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)


# ---------------------------------------------------------------------------------------------------- prompt


def normalize_caption(caption: str | None, max_chars: int = 500) -> str:
    """One line, single spaces, bounded length: what is sent, and what makes two captions "the same"."""
    return " ".join((caption or "").split())[:max_chars].strip()


def caption_key(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _category_lines() -> list[str]:
    """'- dog (puppy, hound, terrier, ...)': the names plus the keyword rules' examples, so the model draws the
    category borders where labels.py does (big cats are "cat", vases are "vessel", eagles are "raptor")."""
    lines = []
    for name in CATEGORIES:
        examples = [k for k in keywords_for(name) if k != name][:_EXAMPLES_PER_CATEGORY]
        lines.append(f"- {name}" + (f" (e.g. {', '.join(examples)})" if examples else ""))
    return lines


def build_messages(texts: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages asking for one category name (or "none") per numbered caption, as a JSON object."""
    system = "\n".join([
        ("You classify image captions. Each caption describes one image; pick the single category of its main "
         "subject from this list, using the category name exactly as written:"),
        *_category_lines(),
        'Use "none" when the caption names nothing that fits a category (e.g. "untitled", "scan of page 4").',
        ('Prefer the most specific category: an eagle is "raptor", not "bird"; a lion is "cat"; a bowl of '
         'strawberries is "fruit".'),
        ('Reply with only a JSON object mapping every caption number, as a string, to a category name or "none", '
         'for example {"1": "dog", "2": "none"}. No explanations.'),
    ])
    numbered = "\n".join(f"{i}. {text}" for i, text in enumerate(texts, 1))
    user = f"Captions:\n{numbered}\n\nReply with a JSON object with keys \"1\" to \"{len(texts)}\"."
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ------------------------------------------------------------------------------------------------- parsing

_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.DOTALL)
# '1: dog', '2. none', '"3": "cat",' lines: the fallback for replies that are not JSON at all.
_LINE_PAIR = re.compile(r"""^\s*["']?#?(\d+)["']?\s*[:=.)\-]+\s*["']?([A-Za-z][A-Za-z /-]*?)["']?\s*,?\s*$""",
                        re.MULTILINE)
_KEY_NUMBER = re.compile(r"^\W*(?:caption|item|no|number|n)?\W*(\d+)\W*$", re.IGNORECASE)
_LIST_LABEL_KEYS = ("category", "label", "name", "answer", "class")
_LIST_INDEX_KEYS = ("id", "index", "number", "n", "caption", "item", "key")


def _json_candidates(text: str) -> Iterator[object]:
    """JSON values found in a reply: whole fenced blocks, the whole text, then the first braces that parse."""
    decoder = json.JSONDecoder()
    for chunk in [*_FENCE.findall(text), text]:
        chunk = chunk.strip()
        try:
            yield json.loads(chunk)
        except ValueError:
            pass
        starts = [m.start() for m in re.finditer(r"[{\[]", chunk)][:50]
        for start in starts:
            try:
                yield decoder.raw_decode(chunk, start)[0]
            except ValueError:
                continue


def _caption_number(key: object) -> int | None:
    """1 from 1, "1", "1.", "#1" or "caption 1"; None from anything else (a caption echoed back: "3 dogs")."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    match = _KEY_NUMBER.match(str(key)) if isinstance(key, str) else None
    return int(match.group(1)) if match else None


def _as_mapping(data: object, depth: int = 0) -> dict[int, object] | None:
    """{caption number: answer} from a dict keyed by numbers, a one-key wrapper of one, or a list."""
    if isinstance(data, dict):
        numbered = {}
        for key, value in data.items():
            number = _caption_number(key)
            if number is not None:
                numbered.setdefault(number, value)
        if numbered:
            return numbered
        if len(data) == 1 and depth < 2:  # {"labels": {...}} or {"results": [...]}
            return _as_mapping(next(iter(data.values())), depth + 1)
        return None
    if isinstance(data, list) and data:
        if all(isinstance(v, str) or v is None for v in data):
            return {i: v for i, v in enumerate(data, 1)}
        if all(isinstance(v, dict) for v in data):
            numbered = {}
            for item in data:
                index = next((item[k] for k in _LIST_INDEX_KEYS if k in item), None)
                label = next((item[k] for k in _LIST_LABEL_KEYS if k in item), None)
                number = _caption_number(index)
                if number is not None:
                    numbered.setdefault(number, label)
            return numbered or None
    return None


def parse_category(value: object) -> Answer:
    """One answer cell -> Answer; names are matched case-blind, and a plural ("birds") finds its category."""
    if isinstance(value, dict):
        value = next((value[k] for k in _LIST_LABEL_KEYS if k in value), value)
    if value is None:
        return Answer(None, NONE)
    if not isinstance(value, str):
        return Answer(None, UNKNOWN)
    text = " ".join(value.strip().strip("\"'.,;:!*`").lower().split())
    if text in _NONE_WORDS:
        return Answer(None, NONE)
    for candidate in (text, text.removesuffix("s"), text.removesuffix("es")):
        if candidate in CATEGORY_INDEX:
            return Answer(CATEGORY_INDEX[candidate], LABELLED)
    return Answer(None, UNKNOWN)


def parse_reply(content: object, count: int) -> list[Answer] | None:
    """Answers for captions 1..count from the model's reply text; None when the reply holds no usable answers.

    Items the reply leaves out are MISSING; names outside CATEGORIES are UNKNOWN; both leave the row unlabelled.
    """
    if not isinstance(content, str):
        return None
    text = _THINK.sub("", content)
    mapping = next((m for m in map(_as_mapping, _json_candidates(text)) if m), None)
    if mapping is None:
        pairs = {int(n): name for n, name in _LINE_PAIR.findall(text)}  # "1: dog" lines, no JSON at all
        mapping = pairs if any(1 <= n <= count for n in pairs) else None
    if mapping is None or not any(1 <= n <= count for n in mapping):
        return None
    if 0 in mapping and count not in mapping:  # numbered from 0 despite the prompt
        mapping = {n + 1: v for n, v in mapping.items()}
    return [parse_category(mapping[i]) if i in mapping else Answer(None, MISSING) for i in range(1, count + 1)]


def _reply_content(body: bytes) -> object:
    """choices[0].message.content, or None when the body is not shaped like a chat completion."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    try:
        return data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None


# ------------------------------------------------------------------------------------------------ requests


def _server_message(body: bytes) -> str:
    """The error text a server put in its body, on one short line."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
        error = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(error, dict):
            text = str(error.get("message") or error.get("detail") or error)
        elif isinstance(error, str):
            text = error
    except ValueError:
        pass
    return " ".join(text.split())[:300] or "no details"


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


_MODEL_PROBLEM = re.compile(r"model.*(not (found|exist|valid|available|supported)|invalid|unknown|no such|"
                            r"does ?n[o']t exist)|(not a valid|invalid|unknown|no such) model", re.IGNORECASE)
_FLAGGED = re.compile(r"moderation|flagged|content (policy|filter)", re.IGNORECASE)


def _http_error(config: LabellerConfig, code: int, message: str, retry_after: float | None) -> Exception:
    """Map an HTTP error status to retry, reject-this-batch, or stop with what to fix."""
    where = f"{config.chat_url} answered HTTP {code} ({message})"
    if code in _RETRYABLE_HTTP:
        return _Retryable(f"HTTP {code} ({message})", retry_after)
    if code in _BATCH_REJECTED_HTTP or (code == 403 and _FLAGGED.search(message)):  # OpenRouter: 403 if flagged
        return _BatchRejected(where) if not _MODEL_PROBLEM.search(message) else LabellerError(
            f"{where}: check --llm-model {config.model!r}; does {config.base_url} serve it?")
    if code in (401, 403):
        return LabellerError(f"{where}: the API key is missing or refused; set {API_KEY_ENV[0]} (or "
                             f"{API_KEY_ENV[1]}) to a key valid for --llm-base-url {config.base_url} "
                             f"and --llm-model {config.model}")
    if code == 402:
        return LabellerError(f"{where}: the account behind the API key is out of credits; top it up, or pick a "
                             "free --llm-model")
    if code == 404:
        return LabellerError(f"{where}: check --llm-model {config.model!r} (does this endpoint serve it?) and "
                             f"--llm-base-url {config.base_url!r} (OpenAI-compatible servers usually end in /v1, "
                             "OpenRouter in /api/v1)")
    return LabellerError(f"{where}: check --llm-base-url {config.base_url!r} and --llm-model {config.model!r}")


def _request_payload(config: LabellerConfig, texts: Sequence[str]) -> bytes:
    payload: dict[str, object] = {"model": config.model, "messages": build_messages(texts),
                                  "temperature": config.temperature}
    if config.max_tokens is not None:
        payload["max_tokens"] = config.max_tokens
    if config.json_mode:
        payload["response_format"] = {"type": "json_object"}
    return json.dumps(payload).encode("utf-8")


def _post_once(config: LabellerConfig, payload: bytes) -> bytes:
    """One HTTP attempt; raises _Retryable, _BatchRejected or LabellerError instead of urllib's errors."""
    headers = {"Content-Type": "application/json", "Accept": "application/json",
               "User-Agent": "convforever-label", "X-Title": "ConvForever"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    request = urllib.request.Request(config.chat_url, data=payload, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=config.timeout) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        body = error.read() if error.fp is not None else b""
        raise _http_error(config, error.code, _server_message(body),
                          _retry_after(error.headers.get("Retry-After") if error.headers else None)) from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            raise _Retryable(f"no answer within --timeout {config.timeout:g}s") from None
        raise _Retryable(f"cannot reach --llm-base-url {config.base_url} ({error.reason})") from None
    except TimeoutError:
        raise _Retryable(f"no answer within --timeout {config.timeout:g}s") from None
    except (http.client.HTTPException, OSError) as error:
        raise _Retryable(f"connection to --llm-base-url {config.base_url} broke ({error!r})") from None


def _wait(stop: threading.Event, seconds: float) -> None:
    """Sleep, unless the run is being closed: then give up at once."""
    if stop.wait(max(seconds, 0.0)):
        raise _Stopped()


def _post_with_retries(config: LabellerConfig, payload: bytes, limiter: RateLimiter, counters: RequestCounters,
                       stop: threading.Event) -> bytes:
    """POST within the rate limit, retrying transient failures with backoff or the server's Retry-After."""
    for attempt in range(config.retries + 1):
        _wait(stop, limiter.reserve())
        counters.add("requests")
        try:
            return _post_once(config, payload)
        except _Retryable as error:
            if attempt == config.retries:
                raise LabellerError(f"{error} after {attempt + 1} tries; lower --requests-per-minute or "
                                    "--concurrency, or check --llm-base-url, then rerun (the run resumes)") from None
            if error.retry_after is not None and error.retry_after > config.max_retry_wait:
                raise LabellerError(f"{error}: the endpoint asks to wait {error.retry_after:.0f}s (quota "
                                    "exhausted?); rerun later, the run resumes") from None
            delay = error.retry_after
            if delay is None:
                delay = min(config.max_backoff, config.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
            logger.warning("%s; retrying in %.1fs (try %d of %d)", error, delay, attempt + 2, config.retries + 1)
            counters.add("retries")
            limiter.push_back(delay)
    raise AssertionError("unreachable")


def _label_batch(texts: Sequence[str], config: LabellerConfig, limiter: RateLimiter, counters: RequestCounters,
                 stop: threading.Event) -> list[Answer]:
    """One request (more if the reply is unusable) for up to batch_size normalised, non-empty captions.

    A request the endpoint rejects (HTTP 400) is split in halves until the caption it objects to is alone, so one
    filtered caption costs one row, not a batch that every rerun would send again; before any request has
    succeeded a rejection is taken as misconfiguration and raised instead.
    """
    payload = _request_payload(config, texts)
    for attempt in range(config.malformed_retries + 1):
        try:
            body = _post_with_retries(config, payload, limiter, counters, stop)
        except _BatchRejected as error:
            if counters.replies == 0:
                raise
            if len(texts) == 1:
                logger.warning("%s; caption %.80r stays unlabelled", error, texts[0])
                return [Answer(None, REFUSED)]
            half = len(texts) // 2
            return (_label_batch(texts[:half], config, limiter, counters, stop)
                    + _label_batch(texts[half:], config, limiter, counters, stop))
        counters.add("replies")
        answers = parse_reply(_reply_content(body), len(texts))
        if answers is not None:
            return answers
        counters.add("unparsable")
        logger.warning("reply %d of %d for %d captions held no usable answers: %.200r", attempt + 1,
                       config.malformed_retries + 1, len(texts), body)
    return [Answer(None, UNPARSABLE)] * len(texts)


def label_captions(captions: Sequence[str | None], config: LabellerConfig, *, limiter: RateLimiter | None = None,
                   counters: RequestCounters | None = None, stop: threading.Event | None = None) -> list[Answer]:
    """Label captions in order, ``config.batch_size`` per request; empty captions are answered without asking.

    Raises LabellerError when the endpoint cannot be used; unusable replies only leave their rows unlabelled.
    """
    limiter = limiter or RateLimiter(config.requests_per_minute)
    counters = counters or RequestCounters()
    stop = stop or threading.Event()
    texts = [normalize_caption(c, config.max_caption_chars) for c in captions]
    answers: list[Answer] = [Answer(None, EMPTY)] * len(texts)
    asked = [i for i, text in enumerate(texts) if text]
    for lo in range(0, len(asked), config.batch_size):
        chunk = asked[lo:lo + config.batch_size]
        try:
            replies = _label_batch([texts[i] for i in chunk], config, limiter, counters, stop)
        except _BatchRejected as error:
            raise LabellerError(f"{error}; lower --batch-size or check --llm-model") from None
        for i, answer in zip(chunk, replies):
            answers[i] = answer
    return answers


# ----------------------------------------------------------------------------------------- cache and output


def _record(row_id: str, answer: Answer, key: str | None, model: str) -> dict[str, object]:
    name = None if answer.label is None else CATEGORIES[answer.label]
    return {"id": row_id, "label": answer.label, "label_name": name, "status": answer.status,
            "caption_key": key, "model": model}


class LabelCache:
    """The append-only ``labels.jsonl``: what earlier runs (and this one) decided, readable after a kill."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, int | None] = {}  # id -> label
        self.answers: dict[str, Answer] = {}  # caption key -> the model's verdict
        self._file = None
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        bad = 0
        with open(self.path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                    row_id, value = record["id"], record["label"]
                    label = None if value is None else label_from_value(value)
                    if not isinstance(row_id, str) or (value is not None and label is None):
                        raise ValueError(line)
                except (ValueError, KeyError, TypeError):
                    bad += line.strip() != ""
                    continue
                self.done[row_id] = label
                key, status = record.get("caption_key"), record.get("status")
                if isinstance(key, str) and status in _REUSABLE:
                    self.answers[key] = Answer(label, status)
        if bad:  # a run killed mid-write leaves one partial last line; more means someone edited the file
            logger.warning("%s: skipped %d unreadable line(s); their rows will be asked again", self.path, bad)
        logger.info("%s: %d rows already labelled, %d distinct captions known", self.path, len(self.done),
                    len(self.answers))

    def add(self, records: Iterable[dict[str, object]]) -> None:
        """Append records (buffered: call flush() to make them survive a kill)."""
        records = list(records)
        if not records:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial_line = self.path.exists() and self.path.stat().st_size > 0 and not self._ends_with_newline()
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run
            if partial_line:
                self._file.write("\n")
        for record in records:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.done[record["id"]] = record["label"]

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # flushes
            self._file = None


def write_labels_parquet(done: dict[str, int | None], path: Path) -> None:
    """Write the labels dataset atomically, so a reader (or --push-to-hub) never sees half a file."""
    labels = list(done.values())
    table = pa.Table.from_pydict({
        "id": list(done), "label": labels, "label_name": [None if v is None else CATEGORIES[v] for v in labels],
        "source": [SOURCE] * len(labels),
    }, schema=LABELS_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".tmp-{os.getpid()}")
    pq.write_table(table, partial)
    os.replace(partial, path)


# ------------------------------------------------------------------------------------------------ input


def count_rows(files: Sequence[str]) -> int:
    return sum(pq.ParquetFile(path).metadata.num_rows for path in files)


def iter_captions(files: Sequence[str], limit: int | None = None) -> Iterator[tuple[str | None, str | None]]:
    """(id, caption) for the first ``limit`` rows of the files, reading only those two columns."""
    remaining = limit
    for path in files:
        try:
            parquet = pq.ParquetFile(path)
        except (OSError, pa.ArrowInvalid) as error:
            raise ValueError(f"{path} is not a readable parquet file: {error}") from error
        missing = [c for c in ("id", "caption") if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"{path} has no {' or '.join(map(repr, missing))} column (it has: "
                             f"{', '.join(parquet.schema_arrow.names)}); labels need both, to join on id")
        for batch in parquet.iter_batches(batch_size=4096, columns=["id", "caption"]):
            rows = zip(batch.column("id").to_pylist(), batch.column("caption").to_pylist())
            for row in rows:
                if remaining is not None:
                    if remaining <= 0:
                        return
                    remaining -= 1
                yield row


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class LabelStats:
    """Where a run stands; rows count once each, whichever run labelled them."""

    total: int = 0  # rows this run covers (after --limit)
    seen: int = 0
    done: int = 0  # rows with a record, earlier runs included
    labelled: int = 0  # of those, rows with a category
    resumed: int = 0  # rows an earlier run already did
    reused: int = 0  # rows answered from another row's identical caption
    asked: int = 0  # distinct captions sent to the model
    failed: int = 0  # rows whose request was refused; a rerun asks again
    no_id: int = 0  # rows without an id cannot be joined, so are not labelled
    requests: int = 0
    retries: int = 0
    statuses: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    def count(self, label: int | None, n: int = 1) -> None:
        self.done += n
        self.labelled += n * (label is not None)


def format_progress(stats: LabelStats) -> str:
    """done/total, how many got a category, requests and rates: enough to decide whether to keep paying."""
    elapsed = max(time.monotonic() - stats.started, 1e-9)
    new_rows = stats.done - stats.resumed
    parts = [
        f"labels {stats.done}/{stats.total} rows ({100 * stats.done / max(stats.total, 1):.1f}%)",
        f"{100 * stats.labelled / max(stats.done, 1):.1f}% with a category",
        f"{stats.requests} requests ({stats.retries} retries)",
        f"{60 * stats.requests / elapsed:.1f} req/min, {60 * new_rows / elapsed:.0f} rows/min",
    ]
    if stats.resumed:
        parts.append(f"{stats.resumed} from earlier runs")
    problems = {k: v for k, v in stats.statuses.items() if k in (UNKNOWN, MISSING, UNPARSABLE, REFUSED)}
    if stats.failed or stats.no_id or problems:
        problems |= {"for a rerun": stats.failed, "no id": stats.no_id}
        parts.append("unlabelled: " + ", ".join(f"{k} {v}" for k, v in sorted(problems.items()) if v))
    return " | ".join(parts)


@dataclass
class LabelSummary:
    """What ``label_dataset`` did and wrote."""

    stats: LabelStats
    labels_path: Path
    cache_path: Path
    rows_written: int


class _DaemonPool:
    """A minimal thread pool whose threads never hold up interpreter exit: Ctrl+C must not wait out a reply."""

    def __init__(self, workers: int) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"convforever-label-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., object], *args: object) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as error:  # noqa: BLE001 - handed to whoever reads the future
                future.set_exception(error)

    def shutdown(self) -> None:
        """Cancel queued jobs and let the threads end after their current one."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)


class _Run:
    """One labelling run's mutable state: rows waiting on an answer, requests in flight, the cache."""

    def __init__(self, config: LabellerConfig, out_dir: Path, stats: LabelStats, interrupt: threading.Event,
                 progress: Callable[[LabelStats], None] | None, progress_every: float,
                 parquet_every: float) -> None:
        self.config, self.stats, self.interrupt = config, stats, interrupt
        self.cache = LabelCache(out_dir / CACHE_FILE)
        self.labels_path = out_dir / LABELS_FILE
        self.limiter = RateLimiter(config.requests_per_minute)
        self.counters = RequestCounters()
        self.stop = threading.Event()  # tells request threads to give up waiting; set only by close()
        self.pool = _DaemonPool(config.concurrency)
        self.inflight: dict[Future, list[tuple[str, str]]] = {}
        self.waiting: dict[str, list[str]] = {}  # caption key -> ids wanting its answer
        self.queued: set[str] = set()  # ids waiting, so a repeated id is not queued twice
        self.batch: list[tuple[str, str]] = []
        self.progress, self.progress_every, self.parquet_every = progress, progress_every, parquet_every
        self.last_progress = self.last_parquet = time.monotonic()
        self.anything_answered = False

    def add_row(self, row_id: str | None, caption: str | None) -> None:
        self.stats.seen += 1
        if row_id is None:
            self.stats.no_id += 1
            return
        row_id = str(row_id)
        if row_id in self.queued:
            return
        if row_id in self.cache.done:
            self.stats.resumed += 1
            self.stats.count(self.cache.done[row_id])
            return
        text = normalize_caption(caption, self.config.max_caption_chars)
        key = caption_key(text) if text else None
        known = self.cache.answers.get(key) if key else Answer(None, EMPTY)
        if known is not None:
            self.stats.reused += key is not None
            self._resolve([row_id], known, key)
            return
        self.queued.add(row_id)
        if key in self.waiting:
            self.waiting[key].append(row_id)
            return
        self.waiting[key] = [row_id]
        self.batch.append((key, text))
        if len(self.batch) >= self.config.batch_size:
            self.submit()

    def submit(self) -> None:
        if self.batch:
            batch, self.batch = self.batch, []
            self.stats.asked += len(batch)
            future = self.pool.submit(_label_batch, [text for _, text in batch], self.config, self.limiter,
                                      self.counters, self.stop)
            self.inflight[future] = batch
        self.drain(max_inflight=2 * self.config.concurrency)

    def drain(self, max_inflight: int = 0) -> None:
        """Record every finished request, then wait until at most ``max_inflight`` remain (or an interrupt)."""
        while not self.interrupt.is_set():
            finished = [future for future in self.inflight if future.done()]
            if not finished and len(self.inflight) <= max_inflight:
                break
            if not finished:
                finished, _ = wait(self.inflight, timeout=self.progress_every, return_when=FIRST_COMPLETED)
            for future in finished:
                self._finish(future, self.inflight.pop(future))
            self.tick()

    def _finish(self, future: Future, batch: list[tuple[str, str]]) -> None:
        try:
            answers = future.result()
        except _BatchRejected as error:
            if not self.anything_answered:  # the very first requests failing is configuration, not content
                raise LabellerError(f"{error}; check --llm-model and --batch-size") from None
            logger.warning("%s; leaving %d captions for a later run", error, len(batch))
            for key, _ in batch:
                ids = self.waiting.pop(key)
                self.queued.difference_update(ids)
                self.stats.failed += len(ids)
            return
        self.anything_answered = True
        for (key, _), answer in zip(batch, answers):
            if answer.status in _REUSABLE:
                self.cache.answers[key] = answer
            ids = self.waiting.pop(key)
            self.queued.difference_update(ids)
            self._resolve(ids, answer, key)
        self.cache.flush()

    def _resolve(self, ids: list[str], answer: Answer, key: str | None) -> None:
        self.cache.add(_record(row_id, answer, key, self.config.model) for row_id in ids)
        self.stats.count(answer.label, len(ids))
        self.stats.statuses[answer.status] += len(ids)

    def tick(self) -> None:
        now = time.monotonic()
        self.stats.requests, self.stats.retries = self.counters.requests, self.counters.retries
        if self.progress is not None and now - self.last_progress >= self.progress_every:
            self.last_progress = now
            self.progress(self.stats)
        if self.parquet_every > 0 and now - self.last_parquet >= self.parquet_every:
            self.last_parquet = now
            self.cache.flush()
            write_labels_parquet(self.cache.done, self.labels_path)

    def close(self) -> int:
        """Stop the request threads, keep every answer received, write labels.parquet; returns its row count."""
        self.stop.set()
        self.pool.shutdown()
        self.cache.close()
        self.stats.requests, self.stats.retries = self.counters.requests, self.counters.retries
        write_labels_parquet(self.cache.done, self.labels_path)
        return len(self.cache.done)


def label_dataset(data: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  config: LabellerConfig, *, limit: int | None = None,
                  progress: Callable[[LabelStats], None] | None = None, progress_every: float = 5.0,
                  parquet_every: float = 300.0, stop: threading.Event | None = None) -> LabelSummary:
    """Label the first ``limit`` rows (all by default) of the parquet data into ``out_dir``; resumable.

    ``labels.parquet`` is rewritten every ``parquet_every`` seconds (0: only at the end) and whenever the run
    ends, also by an error or Ctrl+C, so it always matches what the cache holds. Setting ``stop`` ends the run
    early the same way; answers still in flight are dropped and asked again by the next run.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"--limit {limit}: must be >= 0")
    files = resolve_files(data)
    total = count_rows(files)
    stats = LabelStats(total=total if limit is None else min(limit, total))
    interrupt = stop or threading.Event()
    run = _Run(config, Path(out_dir), stats, interrupt, progress, progress_every, parquet_every)
    try:
        for row_id, caption in iter_captions(files, limit):
            run.add_row(row_id, caption)
            if interrupt.is_set():
                break
            if stats.seen % 1000 == 0:  # also while skipping rows done earlier: collect replies, report
                run.drain(2 * config.concurrency)
                run.tick()
        else:  # every row seen and not interrupted: ask about the last partial batch, wait for all replies
            run.submit()
            run.drain()
    finally:
        rows_written = run.close()
    logger.info("labelled %d of %d rows (%d with a category) into %s", stats.done, stats.total, stats.labelled,
                run.labels_path)
    return LabelSummary(stats, run.labels_path, run.cache.path, rows_written)


# ------------------------------------------------------------------------------------------- hub and load


def push_labels(labels_path: str | os.PathLike, repo: str, *, private: bool = False,
                token: str | None = None) -> str:
    """Upload labels.parquet to a Hub dataset repo (created if needed); returns the repo's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalTokenNotFoundError,
    )

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, repo_type="dataset", exist_ok=True, private=private)
        api.upload_file(path_or_fileobj=str(labels_path), path_in_repo=LABELS_FILE, repo_id=repo,
                        repo_type="dataset", commit_message="convforever-label: update labels.parquet")
    except HFValidationError as error:
        raise LabellerError(f"--push-to-hub {repo!r} is not a valid repo name; use 'user-or-org/name' "
                            f"({error})") from None
    except LocalTokenNotFoundError:
        raise LabellerError(f"--push-to-hub {repo}: no Hugging Face token; run `hf auth login` or set HF_TOKEN to a "
                            "token with write access") from None
    except HfHubHTTPError as error:
        code = getattr(getattr(error, "response", None), "status_code", None)
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        if code == 401:
            fix = "the Hugging Face token is missing or invalid; run `hf auth login` or set HF_TOKEN"
        elif code == 403:
            fix = (f"the token may not write to {repo!r}; use a write token, and a namespace that is yours or "
                   "an organisation you can write to")
        elif code == 404:
            fix = f"repo {repo!r} was not found and could not be created; check the name and the token"
        else:
            fix = "check the repo name and HF_TOKEN"
        raise LabellerError(f"--push-to-hub {repo}: Hub answered HTTP {code} ({first_line}): {fix}") from None
    except OSError as error:
        raise LabellerError(f"--push-to-hub {repo}: cannot reach the Hugging Face Hub ({error}); upload "
                            f"{labels_path} later with a rerun") from None
    return str(getattr(url, "url", url))


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _download_labels(repo: str) -> str:
    """labels.parquet of a Hub dataset repo, via the local Hugging Face cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
    )

    try:
        return str(hf_hub_download(repo_id=repo, filename=LABELS_FILE, repo_type="dataset"))
    except RepositoryNotFoundError:
        raise ValueError(f"labels {repo!r}: no such local path, and no Hub dataset repo of that name (a private "
                         "repo needs HF_TOKEN or `hf auth login`)") from None
    except EntryNotFoundError:
        raise ValueError(f"labels {repo!r}: the Hub dataset repo has no {LABELS_FILE}; make one with "
                         f"`convforever-label ... --push-to-hub {repo}`") from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise ValueError(f"labels {repo!r}: not a local path, and downloading {LABELS_FILE} from the Hub dataset "
                         f"repo failed ({error}); pass a local labels.parquet instead") from None


def _read_label_rows(path: Path) -> Iterator[tuple[object, object]]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                    yield record.get("id"), record.get("label")
                except (ValueError, AttributeError):
                    continue  # a partial last line from a killed run
        return
    try:
        table = pq.read_table(path, columns=["id", "label"])
    except (OSError, pa.ArrowInvalid, KeyError) as error:
        raise ValueError(f"labels {path}: not a labels parquet file with 'id' and 'label' columns ({error})") from None
    yield from zip(table.column("id").to_pylist(), table.column("label").to_pylist())


def _local_labels_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for name in (LABELS_FILE, CACHE_FILE):
        if (path / name).is_file():
            if name == CACHE_FILE:
                logger.warning("%s has no %s yet; reading the run's cache %s", path, LABELS_FILE, name)
            return path / name
    raise ValueError(f"labels directory {path} holds neither {LABELS_FILE} nor {CACHE_FILE}")


def load_labels(path: str | os.PathLike) -> dict[str, int]:
    """id -> category index from a labels dataset, dropping rows the labeller left unlabelled.

    ``path``: a labels.parquet, a directory holding one (or only a run's labels.jsonl), a .jsonl of
    {"id", "label"} records, or, when no such local path exists, a Hub dataset repo holding labels.parquet.
    Later records win, so a .jsonl that labelled an id twice gives its last answer.
    """
    local = Path(path)
    if not local.exists():
        text = os.fspath(path)
        if text.endswith((".parquet", ".jsonl")) or not _REPO_ID.match(text):
            raise ValueError(f"labels {text!r}: no such file or directory (nor a Hub dataset repo name like "
                             "'user/name')")
        local = Path(_download_labels(text))
    labels: dict[str, int] = {}
    bad = 0
    for row_id, value in _read_label_rows(_local_labels_file(local)):
        label = None if value is None else label_from_value(value)
        if not isinstance(row_id, str) or (value is not None and label is None):
            bad += 1
            continue
        if label is None:
            labels.pop(row_id, None)
        else:
            labels[row_id] = label
    if bad:
        logger.warning("labels %s: ignored %d row(s) without a string id or with a label outside 0..%d", path, bad,
                       len(CATEGORIES) - 1)
    return labels


# --------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = LabellerConfig(base_url="http://x", model="x", api_key="")  # defaults, shown in --help
    p = argparse.ArgumentParser(
        prog="convforever-label",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Label PD-Extended captions with an LLM behind an OpenAI-compatible endpoint; writes a "
                    f"resumable labels dataset (OUT/{LABELS_FILE}) that peers join by id. The API key comes from "
                    f"{API_KEY_ENV[0]} or {API_KEY_ENV[1]} (none for local servers).")
    p.add_argument("--data", required=True, help="parquet file, directory or glob with 'id' and 'caption' columns")
    p.add_argument("--out", required=True, type=Path,
                   help=f"output directory: {CACHE_FILE} (resume state) and {LABELS_FILE}; rerun to resume")
    p.add_argument("--llm-base-url", required=True,
                   help="OpenAI-compatible API root, e.g. https://openrouter.ai/api/v1 or http://127.0.0.1:8000/v1")
    p.add_argument("--llm-model", required=True, help="model name as the endpoint knows it")
    p.add_argument("--limit", type=int, help="label only the first N rows of --data (a trial run)")
    p.add_argument("--requests-per-minute", type=float, default=d.requests_per_minute,
                   help="ceiling on HTTP requests per minute, retries included")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="captions per request")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight at once")
    p.add_argument("--timeout", type=float, default=d.timeout, help="seconds to wait for one reply")
    p.add_argument("--retries", type=int, default=d.retries,
                   help="retries of a request after 429, 5xx, timeouts or connection errors")
    p.add_argument("--json-mode", action="store_true",
                   help="ask for response_format json_object (OpenAI, vLLM; some servers reject it)")
    p.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines")
    p.add_argument("--parquet-every", type=float, default=300.0,
                   help=f"seconds between rewrites of {LABELS_FILE} during the run (0: only at the end)")
    p.add_argument("--push-to-hub", metavar="REPO",
                   help=f"upload {LABELS_FILE} to this Hugging Face dataset repo (created if missing; needs HF_TOKEN)")
    p.add_argument("--hub-private", action="store_true", help="create the --push-to-hub repo as private")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    """Console script ``convforever-label``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.limit is not None and args.limit < 0:
        parser.error(f"--limit {args.limit}: must be >= 0")
    try:
        config = LabellerConfig(
            base_url=args.llm_base_url, model=args.llm_model, batch_size=args.batch_size,
            requests_per_minute=args.requests_per_minute, concurrency=args.concurrency, timeout=args.timeout,
            retries=args.retries, json_mode=args.json_mode)
        resolve_files(args.data)
    except ValueError as error:
        parser.error(str(error))

    def show(stats: LabelStats) -> None:
        print(format_progress(stats), flush=True)

    try:
        summary = label_dataset(args.data, args.out, config, limit=args.limit, progress=show,
                                progress_every=args.progress_every, parquet_every=args.parquet_every)
    except LabellerError as error:
        raise SystemExit(f"convforever-label: error: {error}") from None
    except ValueError as error:
        raise SystemExit(f"convforever-label: error: --data: {error}") from None
    except OSError as error:
        raise SystemExit(f"convforever-label: error: {error} (check --out and --data)") from None
    except KeyboardInterrupt:
        raise SystemExit(f"convforever-label: interrupted; answers so far are in {args.out / CACHE_FILE} and "
                         f"{args.out / LABELS_FILE}; rerun the same command to resume") from None
    show(summary.stats)
    print(f"wrote {summary.labels_path}: {summary.rows_written} rows", flush=True)
    if args.push_to_hub:
        try:
            url = push_labels(summary.labels_path, args.push_to_hub, private=args.hub_private)
        except LabellerError as error:
            raise SystemExit(f"convforever-label: error: {error}") from None
        print(f"uploaded {LABELS_FILE} to {url}", flush=True)


if __name__ == "__main__":
    main()
