"""A small Hugging Face Hub look-alike on 127.0.0.1, for tests that drive the real ``huggingface_hub`` client.

Usage::

    import hub_server
    from hub_server import HubServer

    hub = hub_server.hub  # the pytest fixture, bound in the test module (importing the name trips ruff's F811)

    def test_something(hub: HubServer) -> None:
        sha = hub.seed_dataset("owner/shards", {"a.parquet": data})
        path = hf_hub_download("owner/shards", "a.parquet", repo_type="dataset", revision=sha)

The ``hub`` fixture starts a server with its storage in ``tmp_path``, sets ``HF_ENDPOINT``, ``HF_TOKEN`` (the
server's write token), a per-test ``HF_HOME``, ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_DISABLE_XET=1`` and
``HF_HUB_DISABLE_UPDATE_CHECK=1`` and unsets ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``/``HF_HUB_CACHE`` and friends,
so that a subprocess (our CLIs) talks to this server with nothing but its environment. ``HubServer.client_env``
gives the same variables for a hand-built environment.

How in-process clients are redirected. ``huggingface_hub`` and ``datasets`` read ``HF_ENDPOINT`` and ``HF_HOME``
once, at import, into module constants (``huggingface_hub.constants.ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``,
``HF_HUB_CACHE``...; ``datasets.config.HF_ENDPOINT``...), and the module-level ``huggingface_hub.hf_api.api``
behind ``huggingface_hub.create_repo`` & co. copies the endpoint at import too. Setting the environment inside a
test is therefore too late, and setting it before the first import would stick for the rest of the session. So
``redirect_hf_clients`` imports both libraries first (their import-time values stay the defaults) and then
monkeypatches those constants, the default ``api.endpoint``, the host lists used to decide which redirects keep
the token, and ``datasets.config``; monkeypatch restores all of it after the test. ``HfFileSystem`` instances are
cached per (endpoint, token, thread) and the fixture clears that cache before and after the test; it also closes
``huggingface_hub``'s shared HTTP client afterwards so no keep-alive connection outlives the server. Code that copied
a constant with ``from huggingface_hub.constants import X`` before the test is not redirected (in this
``huggingface_hub``: only ``utils._cache_manager.HF_HUB_CACHE`` and the ``hf`` CLI's ``ENDPOINT``); run such code in a
subprocess, or pass ``endpoint=``/``cache_dir=`` explicitly.

Auth. ``Authorization: Bearer <token>`` is checked on every request that carries it: an unknown token gets 401
"Invalid credentials in Authorization header", as the Hub answers. Write endpoints (create repo, preupload,
commit, tag, branch) need a token: none gives 401, ``readonly_token`` gives 403. Reading a public repo needs no
token. There are no users or permissions beyond that: a private repo is readable with any valid token, and without
one it answers like a missing repo does, 401 with ``X-Error-Code: RepoNotFound`` (a missing repo answers 404 to a
valid token), as the Hub does so that private names do not leak. One difference from production is the
client's, not the server's: ``hf_raise_for_status`` turns a 401 on ``/api/{models,datasets}/...`` into
``RepositoryNotFoundError`` only for ``https://`` URLs, so against this ``http://`` server a 401 without
``X-Error-Code`` (missing token on a write, unknown token) stays a plain ``HfHubHTTPError`` with status 401; on the
real Hub the missing-token case would raise ``RepositoryNotFoundError`` (a subclass of ``HfHubHTTPError``).

Endpoints implemented (repo types ``model`` and ``dataset``; ``{t}`` is ``models`` or ``datasets``; ``{rev}`` is
a branch, a tag, ``refs/heads/X``, ``refs/tags/X`` or a full 40-hex commit id, percent-encoded as one segment):

- ``POST /api/repos/create``: ``{"name", "organization", "type", "visibility"|"private"}``; 409 if it exists,
  with the repo's ``url`` in the body as on the Hub (``create_repo(exist_ok=True)`` returns it).
  A new repo gets an initial commit holding a short ``.gitattributes``, as the Hub does (its file is longer).
- ``GET /api/{t}/{ns}/{name}`` and ``.../revision/{rev}``: repo info (id, author, sha, private, dates, siblings;
  ``?blobs=true`` adds sizes and blob ids).
- ``GET /api/{t}/{ns}/{name}/tree/{rev}[/{path}]``: ``?recursive=``, ``?expand=`` (adds ``lastCommit``); one page,
  no ``Link`` pagination. Directories are listed as entries of type ``directory``. A path that is not a
  directory (missing, or a file) answers 404 ``EntryNotFound``.
- ``POST /api/{t}/{ns}/{name}/paths-info/{rev}``: form fields ``paths`` (repeated) and ``expand``; unknown paths
  are left out, as on the Hub.
- ``GET /api/{t}/{ns}/{name}/refs`` (``?include_prs=1`` adds an empty ``pullRequests``; ``converts`` is empty)
  and ``GET .../commits/{rev}`` (first-parent history, newest first, one page, no ``formatted`` field).
- ``POST /api/{t}/{ns}/{name}/preupload/{rev}``: answers ``uploadMode: "regular"`` for every file (so the client
  never uses the LFS batch API or Xet), ``shouldIgnore: false`` and the current blob ``oid`` of each path (so
  unchanged files are skipped, as on the Hub).
- ``POST /api/{t}/{ns}/{name}/commit/{rev}``: NDJSON ``header`` (summary, description, ``parentCommit`` -> 412 if
  stale), ``file`` (base64), ``deletedFile``, ``deletedFolder``; ``rev`` must be a branch. Every commit gets a new
  id and keeps its parent, so old revisions stay downloadable.
- ``POST /api/{t}/{ns}/{name}/tag/{rev}`` (``{"tag"}``; 409 if it exists), ``DELETE .../tag/{tag}``,
  ``POST /api/{t}/{ns}/{name}/branch/{branch}`` (``{"startingPoint"}``), ``DELETE .../branch/{branch}``.
- ``GET|HEAD /{ns}/{name}/resolve/{rev}/{path}`` and ``/datasets/{ns}/{name}/resolve/...``: the file, with
  ``X-Repo-Commit``, ``ETag`` (the quoted git blob id), ``Content-Length``, ``Accept-Ranges: bytes``; a single
  ``Range: bytes=a-b`` / ``a-`` / ``-n`` answers 206 with ``Content-Range`` (416 past the end); several ranges
  are ignored (200, whole file). Errors carry ``X-Error-Code`` ``RepoNotFound``/``RevisionNotFound``/
  ``EntryNotFound`` (with ``X-Repo-Commit``), which the client turns into its typed errors. Files are served
  directly (200), never through a redirect to a CDN, so ``Location`` and ``X-Linked-Etag``/``X-Linked-Size`` are
  never sent.
- ``GET /api/whoami-v2`` (a user named ``test-user``, the token's role), ``POST /api/validate-yaml`` (accepts
  everything: README metadata is not validated), ``GET /api/agent-harnesses`` (an empty registry).

Not implemented: LFS (preupload never asks for it; an ``lfsFile`` commit line answers 400) and Xet, pull requests
and ``create_pr``, spaces, buckets, ``delete_repo``/``move_repo``/settings, ``super_squash``, search and listing
endpoints (``list_models``, ``list_datasets``), discussions, the dataset viewer, pagination, rate limits, gated
repos, ``.gitignore`` handling, short commit ids. Anything else answers 404 with a body naming the unimplemented
route (and no ``X-Error-Code``), so a new client call shows up as an ``HfHubHTTPError`` that says what is missing.

What the ``hf://`` clients use, as observed in tests/test_hub_server.py: ``HfFileSystem`` needs repo info
(``/revision/{rev}`` when the path pins one), ``tree`` (``ls``/``glob``/``find``/``info``), ``paths-info``
(``info`` of an uncached path) and ranged ``GET`` on ``resolve``; writing through it uses preupload + commit.
``datasets.load_dataset("parquet", data_files=["hf://datasets/..."], streaming=True)`` needs nothing more (repo
info, the tree of each file's folder, ranged ``resolve``): no dataset-viewer, parquet-export or README lookups.

Storage: file contents live under ``storage/blobs`` (content-addressed by git blob id); repos, commits and refs
are in memory. ``log`` records every request (``requests`` is its ``(method, path)`` view) for assertions.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple, final
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

_URL_TYPES = {"models": "model", "datasets": "dataset"}  # URL segment -> repo type
_URL_PREFIX = {"model": "", "dataset": "datasets/"}  # repo type -> prefix of its web URLs
_GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_SHA_RE = re.compile(r"[0-9a-f]{40}")
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


class LoggedRequest(NamedTuple):
    method: str
    path: str  # as sent, still percent-encoded, without the query
    query: str
    range: str | None  # the Range header
    authorized: bool  # whether an Authorization header was sent
    status: int
    sent: int  # body bytes sent back (0 for HEAD)


@dataclass
class _Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, str]  # path -> git blob id


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)


class _HubError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}  # more fields of the JSON body


@dataclass
class _Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(obj: Any, status: int = 200) -> _Reply:
    return _Reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})


def _now() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob with this content: what the Hub reports as ``oid``/``ETag`` of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@final
class HubServer:
    """A Hub-API-compatible server on 127.0.0.1 (see the module docstring). Use as a context manager."""

    def __init__(
        self,
        storage: Path,
        *,
        token: str = "hf_test_write_token",
        readonly_token: str = "hf_test_read_token",
        user: str = "test-user",
    ) -> None:
        self.storage = Path(storage)
        (self.storage / "blobs").mkdir(parents=True, exist_ok=True)
        self.token, self.readonly_token, self.user = token, readonly_token, user
        self.tokens = {token: "write", readonly_token: "read"}
        self.log: list[LoggedRequest] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._sizes: dict[str, int] = {}
        self._lock = threading.RLock()
        self._seq = itertools.count()
        self._httpd = _HTTPServer(self)
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )

    # -- lifecycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """``(method, path)`` of every request so far, in the order they were answered."""
        return [(r.method, r.path) for r in self.log]

    def client_env(self, hf_home: Path) -> dict[str, str]:
        """The environment that points a fresh ``huggingface_hub``/``datasets`` process at this server."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_TOKEN": self.token,
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        }

    # -- direct access for test set-up and assertions (no HTTP) ------------------------------------------------

    def seed(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        repo_type: str = "model",
        branch: str = "main",
        message: str = "Seed files",
        private: bool = False,
    ) -> str:
        """Create the repo if needed (like ``create_repo``) and commit ``files`` on ``branch``; return the commit id."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id)) or self._create_repo(repo_type, repo_id, private)
            head = repo.commits[repo.branches[branch]]
            return self._commit(repo, branch, head, {**head.files, **self._store_all(files)}, message, "")

    def seed_dataset(self, repo_id: str, files: dict[str, bytes], **kwargs: Any) -> str:
        """``seed`` for a dataset repo."""
        return self.seed(repo_id, files, repo_type="dataset", **kwargs)

    def file_bytes(self, repo_id: str, path: str, *, repo_type: str = "model", revision: str = "main") -> bytes:
        """A file's content at a revision, read from storage."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            return self._blob(self._resolve(repo, revision).files[path])

    def head(self, repo_id: str, *, repo_type: str = "model", branch: str = "main") -> str:
        """The commit id a branch points at."""
        with self._lock:
            return self._repos[(repo_type, repo_id)].branches[branch]

    # -- storage ---------------------------------------------------------------------------------------------

    def _store(self, data: bytes) -> str:
        oid = git_blob_id(data)
        path = self.storage / "blobs" / oid
        if not path.exists():
            tmp = path.with_name(f"{oid}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        self._sizes[oid] = len(data)
        return oid

    def _store_all(self, files: dict[str, bytes]) -> dict[str, str]:
        return {_check_path(path): self._store(data) for path, data in files.items()}

    def _blob(self, oid: str) -> bytes:
        return (self.storage / "blobs" / oid).read_bytes()

    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(repo_type, repo_id, private, _now())
        self._repos[(repo_type, repo_id)] = repo
        self._commit(repo, "main", None, self._store_all({".gitattributes": _GITATTRIBUTES}), "initial commit", "")
        return repo

    def _commit(
        self, repo: _Repo, branch: str, parent: _Commit | None, files: dict[str, str], title: str, message: str
    ) -> str:
        date = _now()
        seed = json.dumps([parent.oid if parent else None, sorted(files.items()), title, message, date, next(self._seq)])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = _Commit(oid, parent.oid if parent else None, title, message, date, dict(files))
        repo.branches[branch] = oid
        return oid

    def _resolve(self, repo: _Repo, revision: str) -> _Commit:
        oid = None
        if revision.startswith("refs/heads/"):
            oid = repo.branches.get(revision[len("refs/heads/") :])
        elif revision.startswith("refs/tags/"):
            oid = repo.tags.get(revision[len("refs/tags/") :])
        else:
            oid = repo.branches.get(revision) or repo.tags.get(revision)
            if oid is None and _SHA_RE.fullmatch(revision) and revision in repo.commits:
                oid = revision
        if oid is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    # -- request handling ------------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: Message, body: bytes) -> _Reply:
        split = urlsplit(raw_path)
        query = parse_qs(split.query, keep_blank_values=True)
        segments = split.path.split("/")[1:]
        try:
            role = self._role(headers)
            return self._route(method, segments, query, headers, body, role)
        except _HubError as error:
            message = error.message.replace("\n", " ")
            reply = _json({"error": message, **error.extra}, error.status)
            reply.headers["X-Error-Message"] = message
            if error.code:
                reply.headers["X-Error-Code"] = error.code
            reply.headers.update(error.headers)
            return reply

    def _role(self, headers: Message) -> str | None:
        value = headers.get("Authorization")
        if value is None:
            return None
        scheme, _, token = value.partition(" ")
        role = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if role is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return role

    @staticmethod
    def _need_write(role: str | None) -> None:
        if role is None:
            raise _HubError(401, "This endpoint needs a token: send 'Authorization: Bearer <token>'")
        if role != "write":
            raise _HubError(403, "Your token is read-only: this action needs a token with write access")

    def _repo(self, repo_type: str, repo_id: str, role: str | None) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and role is None):
            raise _HubError(401 if role is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _route(
        self, method: str, seg: list[str], query: dict[str, list[str]], headers: Message, body: bytes, role: str | None
    ) -> _Reply:
        if seg[:1] == ["api"]:
            if seg[1:] == ["whoami-v2"] and method == "GET":
                return self._whoami(role)
            if seg[1:] == ["repos", "create"] and method == "POST":
                return self._create(_body_json(body), role)
            if seg[1:] == ["validate-yaml"] and method == "POST":
                return _json({"errors": [], "warnings": []})
            if seg[1:] == ["agent-harnesses"] and method == "GET":
                return _json({"standardEnvVars": [], "harnesses": {}})
            if len(seg) >= 4 and seg[1] in _URL_TYPES:
                repo_type, repo_id = _URL_TYPES[seg[1]], f"{unquote(seg[2])}/{unquote(seg[3])}"
                action, rest = (seg[4], [unquote(s) for s in seg[5:]]) if len(seg) > 4 else ("", [])
                with self._lock:
                    reply = self._repo_api(method, repo_type, repo_id, action, rest, query, body, role)
                if reply is not None:
                    return reply
        else:
            repo_type = "model"
            if seg[:1] in (["datasets"], ["models"]):
                repo_type, seg = _URL_TYPES[seg[0]], seg[1:]
            if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
                repo_id, revision, path = f"{unquote(seg[0])}/{unquote(seg[1])}", unquote(seg[3]), unquote("/".join(seg[4:]))
                return self._resolve_file(repo_type, repo_id, revision, path, headers, role)
        raise _HubError(404, f"tests/hub_server.py does not implement {method} /{'/'.join(seg)}")

    def _whoami(self, role: str | None) -> _Reply:
        if role is None:
            raise _HubError(401, "This endpoint needs a token: send 'Authorization: Bearer <token>'")
        token = {"displayName": f"{role} token", "role": role}
        return _json({"type": "user", "id": "0" * 24, "name": self.user, "fullname": self.user, "orgs": [],
                      "auth": {"type": "access_token", "accessToken": token}})

    def _create(self, payload: dict[str, Any], role: str | None) -> _Reply:
        self._need_write(role)
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HubError(400, f"tests/hub_server.py does not support repo type {repo_type!r}")
        name = payload.get("name") or ""
        if not re.fullmatch(r"[\w.-]+", name):
            raise _HubError(400, f"Invalid repo name {name!r}")
        repo_id = f"{payload.get('organization') or self.user}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                # The Hub's 409 carries the url: create_repo(exist_ok=True) returns it.
                raise _HubError(409, f"You already created this {repo_type} repo: {repo_id}", extra={"url": url})
            self._create_repo(repo_type, repo_id, private)
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _repo_api(
        self, method: str, repo_type: str, repo_id: str, action: str, rest: list[str],
        query: dict[str, list[str]], body: bytes, role: str | None,
    ) -> _Reply | None:
        writes = {("POST", "preupload"), ("POST", "commit"), ("POST", "tag"), ("DELETE", "tag"),
                  ("POST", "branch"), ("DELETE", "branch")}
        if (method, action) in writes:
            self._need_write(role)
        repo = self._repo(repo_type, repo_id, role)
        arg = rest[0] if rest else ""
        if method == "GET" and (action == "" or (action == "revision" and len(rest) == 1)):
            return self._info(repo, arg or "main", _flag(query, "blobs"))
        if method == "GET" and action == "refs" and not rest:
            return self._refs(repo, _flag(query, "include_prs"))
        if method == "GET" and action == "commits" and len(rest) == 1:
            return self._commits(repo, self._resolve(repo, arg))
        if method == "GET" and action == "tree" and rest:
            commit = self._resolve(repo, arg)
            return _json(self._tree(repo, commit, "/".join(rest[1:]).strip("/"), _flag(query, "recursive"),
                                    _flag(query, "expand")))
        if method == "POST" and action == "paths-info" and len(rest) == 1:
            form = parse_qs(body.decode(), keep_blank_values=True)
            return _json(self._paths_info(repo, self._resolve(repo, arg), form.get("paths", []), _flag(form, "expand")))
        if method == "POST" and action == "preupload" and len(rest) == 1:
            return self._preupload(repo, arg, _body_json(body), query)
        if method == "POST" and action == "commit" and len(rest) == 1:
            return self._commit_ndjson(repo, arg, body, query)
        if method == "POST" and action == "tag" and len(rest) == 1:
            tag = _body_json(body).get("tag") or ""
            commit = self._resolve(repo, arg)
            if not tag:
                raise _HubError(400, "Missing 'tag' in the request body")
            if tag in repo.tags:
                raise _HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = commit.oid
            return _json({})
        if method == "DELETE" and action == "tag" and len(rest) == 1:
            if repo.tags.pop(arg, None) is None:
                raise _HubError(404, f"Invalid rev id: {arg}", "RevisionNotFound")
            return _json({})
        if method == "POST" and action == "branch" and len(rest) == 1:
            start = self._resolve(repo, _body_json(body).get("startingPoint") or "main")
            if arg in repo.branches:
                raise _HubError(409, f"Branch {arg} already exists")
            repo.branches[arg] = start.oid
            return _json({})
        if method == "DELETE" and action == "branch" and len(rest) == 1:
            if arg == "main":
                raise _HubError(403, "Cannot delete the default branch 'main'")
            if repo.branches.pop(arg, None) is None:
                raise _HubError(404, f"Invalid rev id: {arg}", "RevisionNotFound")
            return _json({})
        return None

    def _info(self, repo: _Repo, revision: str, blobs: bool) -> _Reply:
        commit = self._resolve(repo, revision)
        siblings = [
            {"rfilename": path, **({"size": self._sizes[oid], "blobId": oid} if blobs else {})}
            for path, oid in sorted(commit.files.items())
        ]
        author = repo.repo_id.split("/")[0]
        return _json({
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id, "author": author,
            "sha": commit.oid, "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private,
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
        })

    def _refs(self, repo: _Repo, include_prs: bool) -> _Reply:
        def refs(kind: str, names: dict[str, str]) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid} for n, oid in sorted(names.items())]

        out: dict[str, Any] = {"branches": refs("heads", repo.branches), "tags": refs("tags", repo.tags), "converts": []}
        if include_prs:
            out["pullRequests"] = []
        return _json(out)

    def _history(self, repo: _Repo, commit: _Commit) -> Iterator[_Commit]:
        current: _Commit | None = commit
        while current is not None:
            yield current
            current = repo.commits[current.parent] if current.parent else None

    def _commits(self, repo: _Repo, commit: _Commit) -> _Reply:
        return _json([
            {"id": c.oid, "title": c.title, "message": c.message, "date": c.date, "authors": [{"user": self.user}]}
            for c in self._history(repo, commit)
        ])

    def _last_commit(self, repo: _Repo, commit: _Commit, path: str, is_dir: bool) -> dict[str, str]:
        def state(c: _Commit | None) -> Any:
            if c is None:
                return None
            if not is_dir:
                return c.files.get(path)
            return sorted((p, o) for p, o in c.files.items() if p.startswith(path + "/"))

        for c in self._history(repo, commit):
            if state(c) != state(repo.commits[c.parent] if c.parent else None):
                return {"id": c.oid, "title": c.title, "date": c.date}
        return {"id": commit.oid, "title": commit.title, "date": commit.date}

    def _file_entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict[str, Any]:
        oid = commit.files[path]
        entry: dict[str, Any] = {"type": "file", "oid": oid, "size": self._sizes[oid], "path": path}
        if expand:
            entry["lastCommit"] = self._last_commit(repo, commit, path, is_dir=False)
        return entry

    def _dir_entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict[str, Any]:
        content = sorted((p, o) for p, o in commit.files.items() if p.startswith(path + "/"))
        oid = hashlib.sha1(json.dumps(content).encode()).hexdigest()
        entry: dict[str, Any] = {"type": "directory", "oid": oid, "size": 0, "path": path}
        if expand:
            entry["lastCommit"] = self._last_commit(repo, commit, path, is_dir=True)
        return entry

    def _tree(self, repo: _Repo, commit: _Commit, base: str, recursive: bool, expand: bool) -> list[dict[str, Any]]:
        prefix = base + "/" if base else ""
        if base and not any(p.startswith(prefix) for p in commit.files):
            raise _HubError(404, f"Entry not found: {base} is not a directory", "EntryNotFound",
                            {"X-Repo-Commit": commit.oid})
        dirs: set[str] = set()
        files: list[str] = []
        for path in sorted(p for p in commit.files if p.startswith(prefix)):
            parts = path[len(prefix) :].split("/")
            if recursive:
                dirs.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
                files.append(path)
            elif len(parts) > 1:
                dirs.add(prefix + parts[0])
            else:
                files.append(path)
        return [self._dir_entry(repo, commit, d, expand) for d in sorted(dirs)] + [
            self._file_entry(repo, commit, f, expand) for f in files
        ]

    def _paths_info(self, repo: _Repo, commit: _Commit, paths: list[str], expand: bool) -> list[dict[str, Any]]:
        out = []
        for path in (p.strip("/") for p in paths):
            if path in commit.files:
                out.append(self._file_entry(repo, commit, path, expand))
            elif path and any(p.startswith(path + "/") for p in commit.files):
                out.append(self._dir_entry(repo, commit, path, expand))
        return out

    def _branch_head(self, repo: _Repo, revision: str, query: dict[str, list[str]]) -> _Commit:
        if _flag(query, "create_pr"):
            raise _HubError(400, "tests/hub_server.py does not support pull requests (create_pr)")
        branch = revision.removeprefix("refs/heads/")
        if branch not in repo.branches:
            raise _HubError(404, f"Invalid rev id: {revision} (commits must target an existing branch)",
                            "RevisionNotFound")
        return repo.commits[repo.branches[branch]]

    def _preupload(self, repo: _Repo, revision: str, payload: dict[str, Any], query: dict[str, list[str]]) -> _Reply:
        head = self._branch_head(repo, revision, query)
        files = []
        for item in payload.get("files", []):
            entry = {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False}
            if item["path"] in head.files:
                entry["oid"] = head.files[item["path"]]
            files.append(entry)
        return _json({"files": files, "commitOid": head.oid})

    def _commit_ndjson(self, repo: _Repo, revision: str, body: bytes, query: dict[str, list[str]]) -> _Reply:
        head = self._branch_head(repo, revision, query)
        branch = revision.removeprefix("refs/heads/")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if not header or not header.get("summary"):
            raise _HubError(400, "The commit needs a header line with a summary")
        if header.get("parentCommit") not in (None, head.oid):
            raise _HubError(412, f"A commit has happened since {header['parentCommit']}: the branch is at {head.oid}")
        files = dict(head.files)
        for line in lines:
            key, value = line.get("key"), line.get("value") or {}
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HubError(400, f"Unsupported file encoding {value.get('encoding')!r}")
                files[_check_path(value["path"])] = self._store(base64.b64decode(value["content"]))
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise _HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                doomed = [p for p in files if p.startswith(folder)]
                if not doomed:
                    raise _HubError(404, f"A folder with this name doesn't exist: {value['path']}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            elif key == "lfsFile":
                raise _HubError(400, "tests/hub_server.py does not support LFS files (preupload answers 'regular')")
            elif key != "header":
                raise _HubError(400, f"Unknown commit operation {key!r}")
        oid = self._commit(repo, branch, head, files, header["summary"], header.get("description") or "")
        url = f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{oid}"
        return _json({"success": True, "commitOid": oid, "commitUrl": url, "hookOutput": ""})

    def _resolve_file(
        self, repo_type: str, repo_id: str, revision: str, path: str, headers: Message, role: str | None
    ) -> _Reply:
        with self._lock:
            commit = self._resolve(self._repo(repo_type, repo_id, role), revision)
            oid = commit.files.get(path)
        if oid is None:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        data = self._blob(oid)
        size = len(data)
        reply_headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{oid}"', "Accept-Ranges": "bytes",
                         "Content-Type": "application/octet-stream"}
        match = _RANGE_RE.fullmatch((headers.get("Range") or "").strip())
        if match is None or match.groups() == ("", ""):
            return _Reply(200, data, reply_headers)
        first, last = match.groups()
        if first:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
        else:
            start, end = max(size - int(last), 0), size - 1
        if start >= size or start > end or (not first and int(last) == 0):
            reply_headers["Content-Range"] = f"bytes */{size}"
            return _Reply(416, b"", reply_headers)
        reply_headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return _Reply(206, data[start : end + 1], reply_headers)


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return (query.get(name) or ["false"])[-1].lower() in ("1", "true", "yes")


def _body_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except json.JSONDecodeError as error:
        raise _HubError(400, f"Invalid JSON body: {error}") from None
    if not isinstance(value, dict):
        raise _HubError(400, "The JSON body must be an object")
    return value


def _check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise _HubError(400, f"Invalid path in repo: {path!r}")
    return path


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # keep-alive handler threads end when close_connections() cuts their sockets
    request_queue_size = 128  # the default 5 makes the kernel drop connections when a client opens many at once

    def __init__(self, hub: HubServer) -> None:
        self.hub = hub
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall for seconds without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def _read_body(self) -> bytes:
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        hub = self.server.hub
        body = self._read_body()
        try:
            reply = hub.handle(self.command, self.path, self.headers, body)
        except Exception as error:  # noqa: BLE001 - a server bug: answer 500 with the reason, not hang the client
            reply = _json({"error": f"tests/hub_server.py crashed: {error!r}"}, 500)
        sent = 0 if self.command == "HEAD" else len(reply.body)
        split = urlsplit(self.path)
        with hub._lock:
            hub.log.append(LoggedRequest(self.command, split.path, split.query, self.headers.get("Range"),
                                         self.headers.get("Authorization") is not None, reply.status, sent))
        try:
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away (e.g. it stopped reading a stream)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def log_message(self, format: str, *args: object) -> None:  # the base class's signature
        pass  # keep test output clean; ``HubServer.log`` records what was asked


_ENV_TO_UNSET = (
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH",
    "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HF_XET_CACHE",
    "HF_DATASETS_CACHE", "HF_MODULES_CACHE", "HF_DATASETS_DOWNLOADED_DATASETS_PATH",
    "HF_DATASETS_EXTRACTED_DATASETS_PATH", "HUGGINGFACE_CO_STAGING", "XDG_CACHE_HOME",
)


def redirect_hf_clients(monkeypatch: pytest.MonkeyPatch, server: HubServer, hf_home: Path) -> None:
    """Point this process's ``huggingface_hub``/``datasets`` and its subprocesses at ``server`` (module docstring)."""
    import datasets.config
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    for name in _ENV_TO_UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in server.client_env(hf_home).items():
        monkeypatch.setenv(name, value)

    home = str(hf_home)
    hub_constants: dict[str, Any] = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HOME": home,
        "HF_HUB_CACHE": os.path.join(home, "hub"),
        "HUGGINGFACE_HUB_CACHE": os.path.join(home, "hub"),
        "HF_ASSETS_CACHE": os.path.join(home, "assets"),
        "HUGGINGFACE_ASSETS_CACHE": os.path.join(home, "assets"),
        "HF_TOKEN_PATH": os.path.join(home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
        "HF_XET_CACHE": os.path.join(home, "xet"),
        "AGENT_HARNESSES_PATH": os.path.join(home, ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": os.path.join(home, ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": os.path.join(home, ".check_for_skill_update_done"),
    }
    for name, value in hub_constants.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", server.url)
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(server.url)})

    datasets_home = Path(home, "datasets")
    datasets_config: dict[str, Any] = {
        "HF_ENDPOINT": server.url,
        "HUB_DATASETS_URL": server.url + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_HUB_OFFLINE": False,
        "HF_DATASETS_OFFLINE": False,
        "HF_CACHE_HOME": home,
        "HF_DATASETS_CACHE": datasets_home,
        "HF_MODULES_CACHE": Path(home, "modules"),
        "DOWNLOADED_DATASETS_PATH": datasets_home / "downloads",
        "EXTRACTED_DATASETS_PATH": datasets_home / "downloads" / "extracted",
    }
    for name, value in datasets_config.items():
        if hasattr(datasets.config, name):
            monkeypatch.setattr(datasets.config, name, value)


def _forget_hf_clients() -> None:
    """Drop cached ``HfFileSystem`` instances and ``huggingface_hub``'s pooled connections."""
    from huggingface_hub import HfFileSystem
    from huggingface_hub.utils import _http

    HfFileSystem.clear_instance_cache()
    _http.close_session()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running ``HubServer`` that this process's clients and its subprocesses talk to (module docstring)."""
    with HubServer(tmp_path / "hub-storage") as server:
        redirect_hf_clients(monkeypatch, server, tmp_path / "hf-home")
        _forget_hf_clients()
        try:
            yield server
        finally:
            _forget_hf_clients()
