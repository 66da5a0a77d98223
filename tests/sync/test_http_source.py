"""HTTP(S) sources against a real local http.server: index parsing, ETag/Last-Modified, errors."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from eir_server.store.register import RegisterError
from eir_server.sync.source import HttpSource, SourceError


class Handler(http.server.SimpleHTTPRequestHandler):
    """Autoindex plus strong ETags and If-None-Match, counting requests per path and
    recording (path, status) of every file answer (also used by test_https_source)."""

    hits: dict[str, int] = {}
    answers: list[tuple[str, int]] = []
    truncate: set[str] = set()

    def log_message(self, *args) -> None:
        pass

    def send_head(self):  # type: ignore[override]
        Handler.hits[self.path] = Handler.hits.get(self.path, 0) + 1
        path = Path(self.translate_path(self.path))
        if path.is_file():
            data = path.read_bytes()
            etag = '"' + hashlib.md5(data).hexdigest() + '"'
            if self.headers.get("If-None-Match") == etag:
                Handler.answers.append((self.path, 304))
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                return None
            Handler.answers.append((self.path, 200))
            self.send_response(200)
            self.send_header("ETag", etag)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            body = data[: len(data) // 2] if path.name in Handler.truncate else data
            import io

            return io.BytesIO(body)
        return super().send_head()


@pytest.fixture
def http_dir(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    Handler.hits = {}
    Handler.answers = []
    Handler.truncate = set()
    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()


def test_http_index_conditional_get_and_sync(http_dir, tmp_path, redis_url, sync_dir, dirbs):
    root, url = http_dir
    dirbs.root = root
    dirbs.publish(
        "blacklist",
        "20240101_000000",
        [["35000000000001", "20240101", "stolen"]],
        checksum="sha256",
    )
    src = HttpSource(url, tmp_path / "cache")
    assert [str(k) for k in src.list_zips()] == ["blacklist"]
    p = src.fetch("20240101_000000_blacklist.zip")
    assert p.read_bytes() == (root / "20240101_000000_blacklist.zip").read_bytes()
    assert (src.downloads, src.not_modified) == (2, 0)  # zip + sidecar
    src.fetch("20240101_000000_blacklist.zip")
    assert src.not_modified == 2  # both revalidated with 304

    from eir_server.store.urls import parse_store_url
    from eir_server.sync.engine import SyncOptions, run_once
    from eir_server.sync.redis_db import RegisterDB

    db = RegisterDB(parse_store_url(redis_url))
    try:
        r = run_once(HttpSource(url, tmp_path / "cache"), db, SyncOptions(grace=0))
        assert r.mode == "full" and r.imeis == 1
        r = run_once(HttpSource(url, tmp_path / "cache"), db, SyncOptions(grace=0))
        assert r.mode == "noop"
    finally:
        db.close()


def test_http_truncated_download_and_errors(http_dir, tmp_path, dirbs):
    root, url = http_dir
    dirbs.root = root
    dirbs.publish("blacklist", "20240101_000000", [["35000000000001", "20240101", "x"]] * 50)
    Handler.truncate = {"20240101_000000_blacklist.zip"}
    src = HttpSource(url, tmp_path / "cache")
    with pytest.raises((RegisterError, SourceError)):
        src.fetch("20240101_000000_blacklist.zip")
    assert not (tmp_path / "cache" / "20240101_000000_blacklist.zip").exists()
    with pytest.raises(SourceError):
        HttpSource(url + "missing.zip", tmp_path / "cache").fetch("missing.zip")
    with pytest.raises(SourceError):
        HttpSource("http://127.0.0.1:1/", tmp_path / "c2", timeout=1).list_zips()


def test_single_zip_url(http_dir, tmp_path, dirbs):
    root, url = http_dir
    dirbs.root = root
    dirbs.publish("exceptions_op1", "20240101_000000", [["35000000000001", "310150000000001", ""]])
    src = HttpSource(url + "20240101_000000_exceptions_op1.zip", tmp_path / "cache")
    assert [str(k) for k in src.list_zips()] == ["exceptions_op1"]
    assert src.fetch("20240101_000000_exceptions_op1.zip").exists()
