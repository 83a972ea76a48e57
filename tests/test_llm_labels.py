"""The LLM labeller against a fake OpenAI-compatible server on 127.0.0.1 that labels by keyword rules.

The fake answers with ``classify_caption``'s category for each numbered caption, so every label is checkable,
and misbehaves on request: captions containing GARBAGE get a reply without JSON, MYSTERY an unknown category,
SKIPME no entry at all, FENCED a reply wrapped in prose and a code fence; a request holding REJECT gets HTTP 400
(as a moderation filter answers).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from convforever.data import CATEGORIES, classify_caption, write_demo_dataset
from convforever.data.llm_labels import (
    CACHE_FILE,
    LABELS_FILE,
    LABELS_SCHEMA,
    Answer,
    LabellerConfig,
    LabellerError,
    RateLimiter,
    RequestCounters,
    label_captions,
    label_dataset,
    load_labels,
    main,
    normalize_caption,
    parse_reply,
    write_labels_parquet,
)

MODEL = "fake-model"

# ------------------------------------------------------------------------------------------- fake server


class FakeLLM:
    """State of the fake endpoint: what it was asked, and how it should misbehave next."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict] = []  # {"at": monotonic arrival, "captions": [...], "status": int}
        self.fail_429 = 0  # answer this many next requests with 429
        self.retry_after = "1"
        self.api_key: str | None = None  # when set, other keys get 401
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def asked(self, ok_only: bool = True) -> list[str]:
        """Every caption sent, in arrival order (a caption asked twice appears twice)."""
        with self.lock:
            return [c for r in self.requests if r["status"] == 200 or not ok_only for c in r["captions"]]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                captions = re.findall(r"^\d+\. (.*)$", body["messages"][-1]["content"], re.MULTILINE)
                status, headers, reply = fake.respond(self.path, self.headers.get("Authorization"), body, captions)
                with fake.lock:
                    fake.requests.append({"at": time.monotonic(), "captions": captions, "status": status})
                data = json.dumps(reply).encode()
                self.send_response(status)
                for name, value in {**headers, "Content-Type": "application/json"}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def respond(self, path: str, auth: str | None, body: dict, captions: list[str]) -> tuple[int, dict, object]:
        if path != "/v1/chat/completions":
            return 404, {}, {"error": {"message": f"no route {path}"}}
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            return 401, {}, {"error": {"message": "Incorrect API key provided"}}
        if body.get("model") != MODEL:
            return 404, {}, {"error": {"message": f"The model `{body.get('model')}` does not exist"}}
        if any("REJECT" in c for c in captions):
            return 400, {}, {"error": {"message": "Input was flagged by the content filter"}}
        with self.lock:
            if self.fail_429 > 0:
                self.fail_429 -= 1
                return 429, {"Retry-After": self.retry_after}, {"error": {"message": "Rate limit exceeded"}}
        return 200, {}, {"object": "chat.completion",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": reply_text(captions)}}]}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def fake_category(caption: str) -> str:
    if "MYSTERY" in caption:
        return "unicorn"
    label = classify_caption(caption)
    return "none" if label is None else CATEGORIES[label]


def reply_text(captions: list[str]) -> str:
    if any("GARBAGE" in c for c in captions):
        return "Sorry, I can't classify these images."
    answer = json.dumps({str(i): fake_category(c) for i, c in enumerate(captions, 1) if "SKIPME" not in c})
    if any("FENCED" in c for c in captions):
        return f"Sure! Here are the labels:\n```json\n{answer}\n```\nLet me know if you need more."
    return answer


@pytest.fixture
def fake():
    server = FakeLLM()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("CONVFOREVER_LLM_API_KEY", "OPENAI_API_KEY", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo_dataset(out, train_rows=48, eval_rows=1, image_size=16, num_shards=2, seed=3)
    return out / "train"


def _config(fake: FakeLLM, **overrides) -> LabellerConfig:
    settings = {"requests_per_minute": 60_000, "batch_size": 4, "concurrency": 2, "timeout": 10, "retries": 2,
                "backoff": 0.01} | overrides
    return LabellerConfig(base_url=fake.base_url, model=MODEL, **settings)


def _cli(fake: FakeLLM, data: Path, out: Path, *extra: str) -> None:
    main(["--data", str(data), "--out", str(out), "--llm-base-url", fake.base_url, "--llm-model", MODEL,
          "--requests-per-minute", "60000", "--batch-size", "5", "--retries", "2", *extra])


def _data_rows(data: Path) -> list[tuple[str, str]]:
    tables = [pq.read_table(p, columns=["id", "caption"]) for p in sorted(data.glob("*.parquet"))]
    return [(r["id"], r["caption"]) for t in tables for r in t.to_pylist()]


def _write_captions(path: Path, captions: list[str | None]) -> Path:
    table = pa.table({"id": [f"r{i}" for i in range(len(captions))], "caption": captions},
                     schema=pa.schema([("id", pa.string()), ("caption", pa.string())]))
    pq.write_table(table, path)
    return path


def _jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / CACHE_FILE).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ tests


def test_labels_follow_the_models_answers(fake, demo_dir, tmp_path, capsys):
    out = tmp_path / "labels"
    _cli(fake, demo_dir, out)
    table = pq.read_table(out / LABELS_FILE)
    assert table.schema.equals(LABELS_SCHEMA)
    got = {r["id"]: r for r in table.to_pylist()}
    rows = _data_rows(demo_dir)
    assert len(got) == len(rows) == table.num_rows
    for row_id, caption in rows:
        expected = classify_caption(caption)
        assert got[row_id]["label"] == expected, caption
        assert got[row_id]["label_name"] == (None if expected is None else CATEGORIES[expected])
        assert got[row_id]["source"] == "llm"
    assert sum(r["label"] is not None for r in got.values()) > 40  # the demo's captions nearly all name a class
    printed = capsys.readouterr().out
    assert f"labels {len(rows)}/{len(rows)} rows (100.0%)" in printed and f"wrote {out / LABELS_FILE}" in printed


def test_429_is_retried_after_retry_after(fake):
    fake.fail_429, fake.retry_after = 1, "1"
    counters = RequestCounters()
    answers = label_captions(["a dog", "a red car"], _config(fake), counters=counters)
    assert answers == [Answer(CATEGORIES.index("dog"), "labelled"), Answer(CATEGORIES.index("vehicle"), "labelled")]
    assert [r["status"] for r in fake.requests] == [429, 200]
    assert fake.requests[1]["captions"] == fake.requests[0]["captions"]
    assert fake.requests[1]["at"] - fake.requests[0]["at"] >= 0.9  # waited for Retry-After, not the 10 ms backoff
    assert (counters.requests, counters.retries) == (2, 1)


def test_rate_limiter_spaces_slots_and_honours_push_back():
    now = [100.0]
    limiter = RateLimiter(per_minute=120, clock=lambda: now[0])  # one request every 0.5 s
    assert [limiter.reserve() for _ in range(3)] == [0.0, 0.5, 1.0]
    now[0] += 10  # idle time does not bank a burst
    assert [limiter.reserve() for _ in range(2)] == [0.0, 0.5]
    limiter.push_back(5.0)
    assert limiter.reserve() == 5.0


def test_rate_limit_spaces_requests_across_threads(fake, tmp_path):
    data = _write_captions(tmp_path / "d.parquet", ["a dog", "a cat", "a boat", "a rose"])
    label_dataset(data, tmp_path / "out", _config(fake, requests_per_minute=150, batch_size=1, concurrency=4))
    arrivals = sorted(r["at"] for r in fake.requests)
    assert len(arrivals) == 4  # four threads, yet one request at a time
    assert min(b - a for a, b in itertools.pairwise(arrivals)) >= 0.25  # 0.4 s apart, less generous jitter
    assert len(load_labels(tmp_path / "out")) == 4


def test_resume_asks_only_for_rows_not_done(fake, demo_dir, tmp_path):
    out = tmp_path / "labels"
    rows = _data_rows(demo_dir)
    _cli(fake, demo_dir, out, "--limit", "15")
    first = fake.asked()
    assert len(pq.read_table(out / LABELS_FILE)) == 15
    assert set(pq.read_table(out / LABELS_FILE).column("id").to_pylist()) == {i for i, _ in rows[:15]}
    with open(out / CACHE_FILE, "ab") as cache:  # a run killed mid-write leaves half a line, half a character
        cache.write(b'{"id": "' + rows[20][0].encode() + b'", "model": "caf\xc3')

    _cli(fake, demo_dir, out)
    second = fake.asked()[len(first):]
    assert not set(first) & set(second)  # nothing the first run answered is asked again
    assert len(first) + len(second) == len({normalize_caption(c) for _, c in rows})  # each caption once
    ids = pq.read_table(out / LABELS_FILE).column("id").to_pylist()
    assert sorted(ids) == sorted(i for i, _ in rows)  # every id exactly once
    assert load_labels(out) == {i: classify_caption(c) for i, c in rows if classify_caption(c) is not None}

    _cli(fake, demo_dir, out)  # a third run has nothing left to ask
    assert len(fake.asked()) == len(first) + len(second)


def test_duplicate_captions_are_asked_once(fake, tmp_path):
    captions = ["a dog", "a dog", "  a   dog ", "a cat", "a cat", None, "", "a boat", "a dog", "a cat"]
    data = _write_captions(tmp_path / "d.parquet", captions)
    summary = label_dataset(data, tmp_path / "out", _config(fake, batch_size=2, concurrency=2))
    assert sorted(fake.asked()) == ["a boat", "a cat", "a dog"]
    labels = load_labels(tmp_path / "out")
    assert len(labels) == 8 and labels["r2"] == CATEGORIES.index("dog") and labels["r9"] == CATEGORIES.index("cat")
    assert "r5" not in labels and "r6" not in labels  # empty captions: unlabelled, never sent
    assert summary.rows_written == 10 and summary.stats.asked == 3


def test_malformed_replies_leave_rows_unlabelled(fake, tmp_path):
    captions = ["a dog GARBAGE", "a cat", "MYSTERY beast", "a rose SKIPME", "a fish FENCED", "a boat"]
    data = _write_captions(tmp_path / "d.parquet", captions)
    summary = label_dataset(data, tmp_path / "out", _config(fake, batch_size=2, concurrency=1))
    status = {r["id"]: r["status"] for r in _jsonl(tmp_path / "out")}
    assert status == {"r0": "unparsable", "r1": "unparsable", "r2": "unknown", "r3": "missing",
                      "r4": "labelled", "r5": "labelled"}
    assert fake.asked().count("a dog GARBAGE") == 2  # one more try for a reply without JSON, then give up
    assert load_labels(tmp_path / "out") == {"r4": CATEGORIES.index("fish"), "r5": CATEGORIES.index("watercraft")}
    assert summary.stats.done == 6 and summary.stats.labelled == 2


def test_a_rejected_request_is_split_down_to_the_rejected_caption(fake, tmp_path):
    captions = ["a dog", "a cat", "REJECT this", "a boat", "a rose"]
    data = _write_captions(tmp_path / "d.parquet", captions)
    label_dataset(data, tmp_path / "out", _config(fake, batch_size=2, concurrency=1))
    status = {r["id"]: r["status"] for r in _jsonl(tmp_path / "out")}
    assert status == {"r0": "labelled", "r1": "labelled", "r2": "refused", "r3": "labelled", "r4": "labelled"}
    assert [r["status"] for r in fake.requests] == [200, 400, 400, 200, 200]  # [2,3] -> [2] refused, [3] asked

    # Before anything succeeded, a rejection is configuration (a bad parameter, a model name): stop.
    data = _write_captions(tmp_path / "e.parquet", ["REJECT first", "a dog"])
    with pytest.raises(LabellerError, match="HTTP 400"):
        label_dataset(data, tmp_path / "out2", _config(fake, batch_size=2))


@pytest.mark.parametrize("reply, expected", [
    ('{"1": "dog", "2": "none"}', ["dog", None]),
    ('```json\n{"1": "Dogs", "2": "CAT"}\n```', ["dog", "cat"]),
    ('Here you go: {"labels": {"1": "fish", "2": "unicorn"}} Done.', ["fish", None]),
    ('["vehicle", "none"]', ["vehicle", None]),
    ('[{"id": 1, "category": "bird"}, {"id": 2, "category": "raptor"}]', ["bird", "raptor"]),
    ('<think>{"1": "cat"}</think>\n1: dog\n2. none', ["dog", None]),
    ('{"0": "dog", "1": "cat"}', ["dog", "cat"]),  # numbered from 0
    ('{"1": 5, "2": {"category": "sports"}}', [None, "sports"]),
])
def test_parse_reply_shapes(reply, expected):
    answers = parse_reply(reply, 2)
    assert [None if a.label is None else CATEGORIES[a.label] for a in answers] == expected


@pytest.mark.parametrize("reply", ["Sorry, I cannot help.", "", None, 42, '{"a photo of 3 dogs": "dog"}', "{}", "[]"])
def test_parse_reply_without_answers(reply):
    assert parse_reply(reply, 3) is None


def test_refused_key_unknown_model_and_unreachable_url_stop_with_one_line(fake, demo_dir, tmp_path, monkeypatch):
    fake.api_key = "secret"
    with pytest.raises(SystemExit) as error:
        _cli(fake, demo_dir, tmp_path / "a")
    message = str(error.value)
    assert "HTTP 401" in message and "CONVFOREVER_LLM_API_KEY" in message and "\n" not in message

    monkeypatch.setenv("OPENAI_API_KEY", "secret")  # the fallback variable works
    _cli(fake, demo_dir, tmp_path / "a", "--limit", "3")
    assert len(load_labels(tmp_path / "a")) == 3

    with pytest.raises(SystemExit) as error:
        main(["--data", str(demo_dir), "--out", str(tmp_path / "b"), "--llm-base-url", fake.base_url,
              "--llm-model", "no-such-model"])
    assert "--llm-model 'no-such-model'" in str(error.value) and "HTTP 404" in str(error.value)

    with pytest.raises(LabellerError, match="--llm-base-url http://127.0.0.1:9/v1"):
        label_captions(["a dog"], LabellerConfig(base_url="http://127.0.0.1:9/v1", model=MODEL, retries=0))


def test_load_labels_round_trip(tmp_path, monkeypatch):
    done = {"a": 3, "b": None, "c": 0}
    write_labels_parquet(done, tmp_path / LABELS_FILE)
    assert load_labels(tmp_path / LABELS_FILE) == load_labels(tmp_path) == {"a": 3, "c": 0}
    assert load_labels(str(tmp_path / LABELS_FILE)) == {"a": 3, "c": 0}

    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"id": "a", "label": 1}\n{"id": "b", "label": 99}\n{"id": "c", "label": "dog"}\n'
                     '{"id": "a", "label": 2}\n{"id": 7, "label": 1}\n{"id": "d", "lab')
    assert load_labels(jsonl) == {"a": 2, "c": CATEGORIES.index("dog")}

    calls = []

    def fake_download(repo_id, filename, *, repo_type):
        calls.append((repo_id, filename, repo_type))
        return str(tmp_path / LABELS_FILE)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    assert load_labels("someone/pd-labels") == {"a": 3, "c": 0}
    assert calls == [("someone/pd-labels", LABELS_FILE, "dataset")]
    with pytest.raises(ValueError, match="no such file"):
        load_labels(str(tmp_path / "missing" / "labels.parquet"))


def test_push_to_hub_uploads_and_explains_failures(fake, tmp_path, monkeypatch):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/datasets/{repo_id}"

        def upload_file(self, **kwargs):
            calls.append(("upload_file", kwargs["repo_id"], kwargs))

    data = _write_captions(tmp_path / "d.parquet", ["a dog", "a cat"])
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    _cli(fake, data, tmp_path / "out", "--push-to-hub", "me/pd-labels")
    assert calls[0][:2] == ("create_repo", "me/pd-labels")
    assert calls[0][2]["repo_type"] == "dataset" and calls[0][2]["exist_ok"] is True
    upload = calls[1][2]
    assert upload["path_in_repo"] == LABELS_FILE and upload["repo_type"] == "dataset"
    assert Path(upload["path_or_fileobj"]) == tmp_path / "out" / LABELS_FILE

    class RefusingApi(FakeApi):
        def create_repo(self, repo_id, **kwargs):
            response = httpx2.Response(401, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
            raise HfHubHTTPError("401 Client Error: Unauthorized", response=response)

    monkeypatch.setattr("huggingface_hub.HfApi", RefusingApi)
    with pytest.raises(SystemExit, match="HF_TOKEN"):
        _cli(fake, data, tmp_path / "out", "--push-to-hub", "me/pd-labels")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="--llm-base-url"):
        LabellerConfig(base_url="openrouter.ai", model=MODEL)
    with pytest.raises(ValueError, match="--batch-size"):
        LabellerConfig(base_url="http://127.0.0.1:1/v1", model=MODEL, batch_size=0)
    config = LabellerConfig(base_url="http://127.0.0.1:1/v1/chat/completions/", model=MODEL,
                            api_key="sk-secret-123")
    assert config.chat_url == "http://127.0.0.1:1/v1/chat/completions" and "sk-secret" not in repr(config)
