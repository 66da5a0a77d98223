"""Where register files come from: a local directory or an HTTP(S) location.

Both list the published zips (by name), hand back a local path for one of them with its
checksum sidecar (`<zip>.sha256` or `<zip>.md5`, first token = hex digest) verified when present,
and point at a GSMA TAC file if one is published beside the lists.

HTTP: the URL is either a directory index (any page whose links name the files, e.g. a server's
autoindex) or one zip. Downloads go to a cache directory and are revalidated with a conditional
GET (If-None-Match / If-Modified-Since), so an unchanged file costs one 304. HTTPS servers are
verified against the system trust store, or only against the CAs of `ca_file` (`--ca-file`) for a
register published under a private CA; a certificate that does not verify is a SourceError.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import ssl
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urljoin, urlsplit

import structlog

from eir_server.store.register import ListName, RegisterError, parse_zip_name

log = structlog.get_logger("eir.sync")

TAC_RE = re.compile(r"(?i).*tac.*\.(txt|csv|zip)")
_HREF_RE = re.compile(r"""href\s*=\s*["']?([^"' >]+)""", re.IGNORECASE)


class SourceError(Exception):
    """The source could not be read (network, permissions): retry later, nothing changed."""


class Source(Protocol):
    def list_zips(self) -> dict[ListName, list[str]]: ...

    def fetch(self, name: str) -> Path: ...

    def tac_file(self) -> Path | None: ...

    def describe(self) -> str: ...


def tls_context(ca_file: str | Path | None = None) -> ssl.SSLContext:
    """Verifying client context (hostname + chain): the system trust store, or when `ca_file`
    is given only the CA certificates in that PEM file. Raises OSError / ssl.SSLError when the
    file cannot be read or holds no certificate."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


_NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def _describe(url: str, e: BaseException) -> str:
    """A source error an operator can act on; TLS verification failures say what to do."""
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    host = urlsplit(url).hostname
    if isinstance(reason, ssl.SSLCertVerificationError):
        why = reason.verify_message or str(reason)
        if reason.verify_code in _NAME_MISMATCH:
            hint = "the URL must name a host the certificate was issued for"
        else:
            hint = "if the register is published under a private CA, pass it with --ca-file PEM"
        return f"{url}: TLS certificate of {host} does not verify ({why}); {hint}"
    if isinstance(reason, ssl.SSLError):
        return f"{url}: TLS handshake with {host} failed ({reason})"
    if isinstance(reason, urllib.error.URLError | OSError):
        return f"{url}: {reason}"
    return f"{url}: {e!r}"


def _group(names: list[str]) -> dict[ListName, list[str]]:
    found: dict[ListName, list[tuple[str, str]]] = {}
    for n in names:
        parsed = parse_zip_name(n)
        if parsed:
            found.setdefault(parsed[1], []).append((parsed[0], n))
    return {k: [n for _, n in sorted(v)] for k, v in found.items()}


def verify_checksum(path: Path, sidecar: Path) -> None:
    text = sidecar.read_text(errors="replace").split()
    if not text:
        raise RegisterError(f"{sidecar.name}: empty checksum file")
    expected = text[0].lower()
    algo = "md5" if sidecar.suffix == ".md5" else "sha256"
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != expected:
        raise RegisterError(
            f"{path.name}: {algo} mismatch (expected {expected}, got {h.hexdigest()})"
        )


def read_tac_text(path: Path) -> bytes:
    """The TAC file's bytes; for a zip, its first .txt/.csv member (CRC-checked)."""
    if path.suffix.lower() != ".zip":
        return path.read_bytes()
    try:
        with zipfile.ZipFile(path) as zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
            member = next((n for n in names if n.lower().endswith((".txt", ".csv"))), None)
            if member is None:
                raise RegisterError(f"{path.name}: no .txt/.csv member")
            return zf.read(member)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise RegisterError(f"{path.name}: unreadable or truncated zip ({e})") from e


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class DirSource:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def describe(self) -> str:
        return str(self.path)

    def _names(self) -> list[str]:
        try:
            return sorted(p.name for p in self.path.iterdir() if p.is_file())
        except OSError as e:
            raise SourceError(f"cannot list {self.path}: {e}") from e

    def list_zips(self) -> dict[ListName, list[str]]:
        return _group(self._names())

    def fetch(self, name: str) -> Path:
        p = self.path / name
        for ext in (".sha256", ".md5"):
            side = self.path / (name + ext)
            if side.exists():
                verify_checksum(p, side)
                break
        return p

    def tac_file(self) -> Path | None:
        names = [n for n in self._names() if TAC_RE.fullmatch(n) and not parse_zip_name(n)]
        return self.path / names[-1] if names else None


class HttpSource:
    def __init__(
        self,
        url: str,
        cache_dir: str | Path,
        timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.cache = Path(cache_dir)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self._listing: list[str] | None = None
        path = urlsplit(url).path
        self._single = path.endswith(".zip")
        self.base = urljoin(url, ".") if self._single else (url if url.endswith("/") else url + "/")
        self.downloads = 0
        self.not_modified = 0
        # None: http.client's default context (system trust store). Redirects keep the context.
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ssl_context))

    def _open(self, req: urllib.request.Request | str) -> Any:
        return self._opener.open(req, timeout=self.timeout)

    def describe(self) -> str:
        return self.url

    def _names(self) -> list[str]:
        if self._listing is None:
            if self._single:
                name = unquote(urlsplit(self.url).path.rsplit("/", 1)[-1])
                self._listing = [name]
            else:
                try:
                    with self._open(self.url) as r:
                        page = r.read().decode("utf-8", "replace")
                except urllib.error.HTTPError as e:
                    raise SourceError(f"cannot list {self.url}: HTTP {e.code}") from e
                except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                    raise SourceError(f"cannot list {_describe(self.url, e)}") from e
                names = {
                    unquote(h.split("?")[0].rstrip("/").rsplit("/", 1)[-1])
                    for h in _HREF_RE.findall(page)
                }
                if not names:  # plain-text index: one name per line
                    names = {ln.strip() for ln in page.splitlines() if ln.strip()}
                self._listing = sorted(names)
        return self._listing

    def list_zips(self) -> dict[ListName, list[str]]:
        self._listing = None  # re-read the index on every run
        return _group(self._names())

    def _download(self, name: str) -> Path:
        """Conditional GET into the cache; returns the cached path."""
        dest = self.cache / name
        meta_path = self.cache / (name + ".http.json")
        headers = {}
        if dest.exists() and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("etag"):
                headers["If-None-Match"] = meta["etag"]
            if meta.get("last_modified"):
                headers["If-Modified-Since"] = meta["last_modified"]
        req = urllib.request.Request(urljoin(self.base, name), headers=headers)  # noqa: S310
        try:
            with self._open(req) as r:
                length = r.headers.get("Content-Length")
                fd, tmp = tempfile.mkstemp(dir=self.cache, prefix=".part-")
                try:
                    with os.fdopen(fd, "wb") as f:
                        shutil.copyfileobj(r, f, 1 << 20)
                    size = os.path.getsize(tmp)
                    if length is not None and size != int(length):
                        raise RegisterError(
                            f"{name}: truncated download ({size} of {length} bytes)"
                        )
                    os.replace(tmp, dest)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
                meta_path.write_text(
                    json.dumps(
                        {
                            "etag": r.headers.get("ETag"),
                            "last_modified": r.headers.get("Last-Modified"),
                        }
                    )
                )
                self.downloads += 1
        except urllib.error.HTTPError as e:
            if e.code == 304 and dest.exists():
                self.not_modified += 1
                return dest
            raise SourceError(f"GET {req.full_url}: HTTP {e.code}") from e
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise SourceError(f"GET {_describe(req.full_url, e)}") from e
        return dest

    def fetch(self, name: str) -> Path:
        path = self._download(name)
        names = set(self._names())
        for ext in (".sha256", ".md5"):
            if name + ext in names:
                verify_checksum(path, self._download(name + ext))
                break
        return path

    def tac_file(self) -> Path | None:
        names = [n for n in self._names() if TAC_RE.fullmatch(n) and not parse_zip_name(n)]
        return self._download(names[-1]) if names else None


def open_source(
    spec: str,
    cache_dir: str | Path,
    timeout: float = 60.0,
    ssl_context: ssl.SSLContext | None = None,
) -> Source:
    """`ssl_context` (see tls_context) verifies https:// sources; None: the system trust store."""
    if spec.startswith(("http://", "https://")):
        return HttpSource(spec, cache_dir, timeout, ssl_context)
    if spec.startswith("file://"):
        spec = unquote(urlsplit(spec).path)
    p = Path(spec)
    if not p.is_dir():
        raise SourceError(f"--source {spec}: not a directory or http(s) URL")
    return DirSource(p)
