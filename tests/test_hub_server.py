"""The real ``huggingface_hub`` / ``datasets`` / ``hf://`` clients against tests/hub_server.py."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import fsspec
import hub_server
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_server import HubServer, git_blob_id
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

hub = hub_server.hub  # the fixture: a name pytest finds in this module (an import would trip F811)

DATASET = "owner/shards"
MODEL = "owner/model"


def _parquet(first_id: int, rows: int, row_group_size: int) -> tuple[pa.Table, bytes]:
    """A table of ``rows`` rows with incompressible payloads, written in row groups of ``row_group_size``."""
    table = pa.table({
        "id": list(range(first_id, first_id + rows)),
        "payload": [os.urandom(1024) for _ in range(rows)],
    })
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size, compression="none")
    return table, buffer.getvalue()


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def test_commits_tags_and_downloads_by_branch_tag_and_sha(hub: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    url = api.create_repo(DATASET, repo_type="dataset", private=False)
    assert url.startswith(hub.url) and url.repo_id == DATASET and url.repo_type == "dataset"
    api.create_repo(DATASET, repo_type="dataset", exist_ok=True)  # a second time: 409, swallowed by exist_ok
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(DATASET, repo_type="dataset")
    assert conflict.value.response.status_code == 409

    first = api.upload_file(
        path_or_fileobj=b"version 1", path_in_repo="data/a.txt", repo_id=DATASET, repo_type="dataset",
        commit_message="first",
    )
    api.create_tag(DATASET, tag="v1", revision=first.oid, repo_type="dataset")
    folder = tmp_path / "folder"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "a.txt").write_bytes(b"version 2")
    (folder / "data" / "b.txt").write_bytes(b"bee")
    second = api.upload_folder(
        folder_path=folder, repo_id=DATASET, repo_type="dataset", commit_message="second",
        commit_description="two files",
    )
    assert first.oid != second.oid
    assert second.repo_url.repo_id == DATASET

    def download(revision: str | None) -> bytes:
        return _read(hf_hub_download(DATASET, "data/a.txt", repo_type="dataset", revision=revision))

    assert download(None) == b"version 2"
    assert download("main") == b"version 2"
    assert download("v1") == b"version 1"
    assert download(first.oid) == b"version 1"
    assert download(second.oid) == b"version 2"
    assert hub.file_bytes(DATASET, "data/a.txt", repo_type="dataset", revision="v1") == b"version 1"

    refs = api.list_repo_refs(DATASET, repo_type="dataset")
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", second.oid)]
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1", "refs/tags/v1", first.oid)]
    with pytest.raises(HfHubHTTPError) as tag_again:
        api.create_tag(DATASET, tag="v1", repo_type="dataset")
    assert tag_again.value.response.status_code == 409
    api.create_tag(DATASET, tag="v1", repo_type="dataset", exist_ok=True)

    commits = api.list_repo_commits(DATASET, repo_type="dataset")
    assert [(c.commit_id, c.title) for c in commits[:2]] == [(second.oid, "second"), (first.oid, "first")]
    assert commits[0].message == "two files" and len(commits) == 3  # the repo's initial commit comes last

    assert api.list_repo_files(DATASET, repo_type="dataset", revision="v1") == [".gitattributes", "data/a.txt"]
    assert huggingface_hub.list_repo_files(DATASET, repo_type="dataset") == [  # the module-level default `api`
        ".gitattributes", "data/a.txt", "data/b.txt",
    ]
    tree = {e.path: e for e in api.list_repo_tree(DATASET, repo_type="dataset", recursive=True)}
    assert sorted(tree) == [".gitattributes", "data", "data/a.txt", "data/b.txt"]
    assert tree["data/a.txt"].size == 9 and tree["data/a.txt"].blob_id == git_blob_id(b"version 2")
    top = {e.path for e in api.list_repo_tree(DATASET, repo_type="dataset")}
    assert top == {".gitattributes", "data"}
    expanded = list(api.list_repo_tree(DATASET, "data", repo_type="dataset", expand=True))
    assert {e.path: e.last_commit.oid for e in expanded} == {"data/a.txt": second.oid, "data/b.txt": second.oid}

    info = api.dataset_info(DATASET)
    assert info.id == DATASET and info.sha == second.oid and info.private is False
    assert {s.rfilename for s in info.siblings} == {".gitattributes", "data/a.txt", "data/b.txt"}
    assert api.repo_info(DATASET, repo_type="dataset", revision="v1").sha == first.oid
    assert api.file_exists(DATASET, "data/b.txt", repo_type="dataset")
    assert not api.file_exists(DATASET, "data/b.txt", repo_type="dataset", revision="v1")
    assert not api.file_exists(DATASET, "data/c.txt", repo_type="dataset")
    assert api.revision_exists(DATASET, "v1", repo_type="dataset")
    assert not api.revision_exists(DATASET, "v2", repo_type="dataset")

    # Unchanged files are skipped: the preupload answer carries their blob id, as on the Hub.
    same = api.upload_file(path_or_fileobj=b"bee", path_in_repo="data/b.txt", repo_id=DATASET, repo_type="dataset")
    assert same.oid == second.oid
    assert ("POST", f"/api/datasets/{DATASET}/preupload/main") in hub.requests


def test_create_commit_and_snapshot_download_of_a_model_at_a_revision(hub: HubServer) -> None:
    api = HfApi()
    first = hub.seed(MODEL, {"config.json": b'{"v": 1}', "weights/w.bin": b"\0" * 100})
    second = api.create_commit(
        MODEL,
        operations=[CommitOperationAdd("config.json", b'{"v": 2}'), CommitOperationDelete("weights/")],
        commit_message="drop the weights",
        parent_commit=first,
    )
    assert hub.head(MODEL) == second.oid
    with pytest.raises(HfHubHTTPError) as stale:  # parent_commit is no longer the branch's head
        api.create_commit(MODEL, operations=[CommitOperationAdd("x", b"x")], commit_message="x", parent_commit=first)
    assert stale.value.response.status_code == 412

    old = Path(snapshot_download(MODEL, revision=first))
    assert sorted(p.relative_to(old).as_posix() for p in old.rglob("*") if p.is_file()) == [
        ".gitattributes", "config.json", "weights/w.bin",
    ]
    assert (old / "weights" / "w.bin").read_bytes() == b"\0" * 100
    new = Path(snapshot_download(MODEL))  # main
    assert new.name == second.oid and (new / "config.json").read_bytes() == b'{"v": 2}'
    assert not (new / "weights").exists()
    assert str(new).startswith(os.environ["HF_HOME"])  # the per-test cache

    api.create_branch(MODEL, branch="dev", revision=first)
    assert _read(hf_hub_download(MODEL, "config.json", revision="dev")) == b'{"v": 1}'
    assert _read(hf_hub_download(MODEL, "config.json", revision="refs/heads/dev")) == b'{"v": 1}'


def test_errors_surface_as_typed_hub_errors_with_their_status(hub: HubServer) -> None:
    hub.seed_dataset(DATASET, {"a.txt": b"a"})
    hub.seed_dataset("owner/secret", {"a.txt": b"s"}, private=True)

    with pytest.raises(HfHubHTTPError) as no_token:
        HfApi(token=False).upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=DATASET, repo_type="dataset")
    assert no_token.value.response.status_code == 401
    assert "needs a token" in str(no_token.value)

    readonly = HfApi(token=hub.readonly_token)
    with pytest.raises(HfHubHTTPError) as forbidden:
        readonly.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=DATASET, repo_type="dataset")
    assert forbidden.value.response.status_code == 403
    assert "403 Forbidden" in str(forbidden.value) and "read-only" in str(forbidden.value)
    with pytest.raises(HfHubHTTPError) as forbidden_tag:
        readonly.create_tag(DATASET, tag="nope", repo_type="dataset")
    assert forbidden_tag.value.response.status_code == 403
    assert _read(hf_hub_download(DATASET, "a.txt", repo_type="dataset", token=hub.readonly_token)) == b"a"

    with pytest.raises(HfHubHTTPError) as bad_token:
        HfApi(token="hf_wrong").dataset_info(DATASET)
    assert bad_token.value.response.status_code == 401
    assert "Invalid credentials in Authorization header" in str(bad_token.value)

    with pytest.raises(RepositoryNotFoundError) as hidden:
        HfApi(token=False).dataset_info("owner/secret")
    assert hidden.value.response.status_code == 401
    assert HfApi().dataset_info("owner/secret").private is True  # visible with a valid token
    with pytest.raises(RepositoryNotFoundError) as missing:
        HfApi().dataset_info("owner/missing")
    assert missing.value.response.status_code == 404
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(DATASET, "a.txt", repo_type="dataset", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(DATASET, "b.txt", repo_type="dataset")
    with pytest.raises(HfHubHTTPError) as unknown:  # an endpoint the server lacks says so
        next(iter(HfApi().list_datasets(limit=1)))
    assert unknown.value.response.status_code == 404 and "does not implement GET /api/datasets" in str(unknown.value)


def test_resolve_answers_hub_headers_and_byte_ranges(hub: HubServer) -> None:
    sha = hub.seed_dataset(DATASET, {"dir/f.bin": b"0123456789"})
    url = f"{hub.url}/datasets/{DATASET}/resolve/main/dir/f.bin"

    def fetch(method: str = "GET", range_: str | None = None) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(url, method=method, headers={"Range": range_} if range_ else {})
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    status, headers, body = fetch("HEAD")
    assert (status, body) == (200, b"")
    assert headers["X-Repo-Commit"] == sha and headers["ETag"] == f'"{git_blob_id(b"0123456789")}"'
    assert headers["Content-Length"] == "10" and headers["Accept-Ranges"] == "bytes"
    assert fetch(range_="bytes=2-4")[::2] == (206, b"234")
    assert fetch(range_="bytes=7-")[1]["Content-Range"] == "bytes 7-9/10"
    assert fetch(range_="bytes=-3")[::2] == (206, b"789")
    assert fetch(range_="bytes=5-100")[::2] == (206, b"56789")
    status, headers, _ = fetch(range_="bytes=10-")
    assert (status, headers["Content-Range"]) == (416, "bytes */10")
    status, headers, _ = fetch(range_="bytes=0-1,4-5")  # several ranges: ignored, whole file
    assert status == 200
    status, headers, body = fetch()
    assert status == 200 and body == b"0123456789"
    assert [(r.method, r.range, r.status) for r in hub.log[-3:]] == [
        ("GET", "bytes=10-", 416), ("GET", "bytes=0-1,4-5", 200), ("GET", None, 200),
    ]


def test_hf_file_system_lists_globs_and_reads_one_row_group_with_ranges(hub: HubServer) -> None:
    table, data = _parquet(0, rows=512, row_group_size=64)  # eight row groups of ~64 KiB
    hub.seed_dataset(DATASET, {"train/part-0.parquet": data, "train/part-1.parquet": data, "README.md": b"# shards"})
    fs = HfFileSystem()
    root = f"datasets/{DATASET}"
    assert fs.ls(f"{root}/train", detail=False) == [f"{root}/train/part-0.parquet", f"{root}/train/part-1.parquet"]
    assert fs.glob(f"hf://{root}/**/*.parquet") == [f"{root}/train/part-0.parquet", f"{root}/train/part-1.parquet"]
    assert fs.info(f"{root}/train/part-0.parquet")["size"] == len(data)
    assert fs.isdir(f"{root}/train") and not fs.exists(f"{root}/train/part-2.parquet")
    paths = HfApi().get_paths_info(DATASET, ["train", "README.md", "missing.txt"], repo_type="dataset")
    assert [(type(p).__name__, p.path) for p in paths] == [("RepoFolder", "train"), ("RepoFile", "README.md")]

    hub.log.clear()
    with fsspec.open(f"hf://{root}/train/part-0.parquet", "rb", block_size=16 * 1024) as f:
        parquet = pq.ParquetFile(f)
        assert parquet.num_row_groups == 8
        group = parquet.read_row_group(2)
    assert group.equals(table.slice(128, 64))
    downloads = [r for r in hub.log if r.method == "GET" and "/resolve/" in r.path]
    assert downloads and all(r.status == 206 and r.range for r in downloads)
    # pyarrow reads the last 64 KiB for the footer, then row group 2 (plus 16 KiB of read-ahead): not the file
    assert sum(r.sent for r in downloads) < len(data) / 2

    with fs.open(f"{root}/README.md", "rb") as f:  # read() from 0: one streamed GET
        assert f.read() == b"# shards"


def test_datasets_streams_parquet_rows_over_hf_urls(hub: HubServer) -> None:
    from datasets import load_dataset

    first, first_bytes = _parquet(0, rows=30, row_group_size=10)
    _, second_bytes = _parquet(30, rows=20, row_group_size=10)
    sha = hub.seed_dataset(DATASET, {"shards/s0.parquet": first_bytes, "shards/s1.parquet": second_bytes})
    hub.seed_dataset(DATASET, {"shards/s1.parquet": first_bytes})  # main moves on; the pinned sha must not
    files = [f"hf://datasets/{DATASET}/shards/s0.parquet", f"hf://datasets/{DATASET}@{sha}/shards/s1.parquet"]
    stream = load_dataset("parquet", data_files=files, split="train", streaming=True)
    rows = list(stream)
    assert [row["id"] for row in rows] == list(range(50))
    assert rows[5]["payload"] == first.column("payload")[5].as_py()
    assert any(path.endswith("/resolve/" + sha + "/shards/s1.parquet") for _, path in hub.requests)


def test_a_subprocess_with_only_the_environment_downloads_and_uploads(hub: HubServer, tmp_path: Path) -> None:
    sha = hub.seed_dataset(DATASET, {"a.txt": b"hello"})
    script = textwrap.dedent("""
        import json, sys
        from huggingface_hub import HfApi, hf_hub_download
        repo, sha = sys.argv[1:]
        path = hf_hub_download(repo, "a.txt", repo_type="dataset", revision=sha)
        info = HfApi().upload_file(path_or_fileobj=b"from the child", path_in_repo="b.txt", repo_id=repo,
                                   repo_type="dataset", commit_message="child")
        print(json.dumps({"path": path, "text": open(path).read(), "commit": info.oid}))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script, DATASET, sha], capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["text"] == "hello"
    assert out["path"].startswith(str(tmp_path / "hf-home" / "hub"))
    assert hub.head(DATASET, repo_type="dataset") == out["commit"]
    assert hub.file_bytes(DATASET, "b.txt", repo_type="dataset") == b"from the child"
    assert ("HEAD", f"/datasets/{DATASET}/resolve/{sha}/a.txt") in hub.requests
