"""A Hugging Face Hub-compatible HTTP server on loopback, for tests (standard library only).

Why it exists: code that reads models from the Hub (model_info, hf_hub_download, ranged reads of
shards) must be tested against huggingface_hub itself, offline and deterministically. This serves
local folders as model repos with the URLs, headers and X-Error-Codes huggingface_hub 2.4 relies on
(/api/models/{repo}[/revision/{rev}|/tree/{rev}], /{repo}/resolve/{rev}/{file} with Range), plus
hooks to count traffic per file and to drop connections (to exercise retries).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import threading
from collections import Counter
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from distmerge.testing.loopback_http import LoopbackHTTPServer

_CHUNK = 1 << 20
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
Key = tuple[str, str]  # (repo_id, filename)


def repo_sha(repo_id: str) -> str:
    """The fixed 40-hex commit sha of a served repo (sha1 of its id)."""
    return hashlib.sha1(repo_id.encode()).hexdigest()


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Inclusive (start, end) of one ``bytes=a-b`` / ``a-`` / ``-n`` range; None: unsatisfiable."""
    m = _RANGE.fullmatch(header.strip())
    if m is None or m.groups() == ("", ""):
        return None
    a, b = m.groups()  # no start: a suffix, the last b bytes
    start = int(a) if a else max(size - int(b), 0)
    end = min(int(b), size - 1) if a and b else size - 1
    return (start, end) if start <= end else None


class HubServer:
    """``with HubServer({"org/name": folder}, token=None) as hub:`` then use ``hub.url``."""

    def __init__(self, repos: Mapping[str, Path | str], token: str | None = None) -> None:
        self.repos = {rid: Path(folder).resolve() for rid, folder in repos.items()}
        self.token, self.url = token, ""
        self.requests: Counter[Key] = Counter()  # HEAD + GET on /resolve
        self.data_requests: Counter[Key] = Counter()  # GET on /resolve, dropped ones included
        self.bytes_served: Counter[Key] = Counter()  # body bytes written to the socket
        self.dropped = self._drops = 0
        self._lock = threading.Lock()
        self._hashes: dict[tuple[Path, int, int], str] = {}
        self._conns: set[socket.socket] = set()
        self._httpd: _Server | None = None

    def start(self) -> HubServer:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self.url = self._httpd.serve_in_background()
        return self

    def close(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()  # returns once serve_forever has; then wake keep-alive handlers
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._httpd.server_close()
        self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def reset_counters(self) -> None:
        with self._lock:
            for counter in (self.requests, self.data_requests, self.bytes_served):
                counter.clear()
            self.dropped = 0

    def drop_next(self, n: int = 1) -> None:
        """Make the next ``n`` GET /resolve requests close the connection without any answer."""
        with self._lock:
            self._drops = n

    def _files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        rels = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
        return sorted(r.as_posix() for r in rels if ".git" not in r.parts)

    def _digest(self, path: Path) -> str:
        """sha256 of a file (the ETag, as for LFS files), cached on (path, size, mtime)."""
        st = path.stat()
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            digest = hashlib.sha256()
            with path.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    digest.update(chunk)
            self._hashes[key] = digest.hexdigest()
        return self._hashes[key]


class _Server(LoopbackHTTPServer):
    hub: HubServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer has a Content-Length
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:  # track open connections so that close() can end idle keep-alives
        super().setup()
        self.server.hub._conns.add(self.connection)

    def finish(self) -> None:
        self.server.hub._conns.discard(self.connection)
        super().finish()

    def _start(self, status: int, headers: Mapping[str, str], length: int) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(length)}.items():
            self.send_header(name, value)
        self.end_headers()

    def _json(self, payload: object, status: int = 200, **headers: str) -> None:
        body = json.dumps(payload).encode()
        self._start(status, {"Content-Type": "application/json", **headers}, len(body))
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, **extra: str) -> None:
        codes = {} if code is None else {"X-Error-Code": code}
        self._json({"error": message}, status, **{"X-Error-Message": message, **codes, **extra})

    def do_GET(self) -> None:
        hub, url = self.server.hub, urlsplit(self.path)
        auth, query = self.headers.get("Authorization"), parse_qs(url.query)
        if hub.token is not None and auth != f"Bearer {hub.token}":
            if auth:  # the Hub's answer to a bad token: hf_raise_for_status -> HfHubHTTPError(401)
                return self._error(401, None, "Invalid credentials in Authorization header")
            return self._error(401, "RepoNotFound", "Repository not found")  # private, anonymous
        if url.path.startswith("/api/models/"):
            rest = url.path[len("/api/models/") :]
            found = [r for r in hub.repos if rest == r or rest.startswith(r + "/")]
            repo = max(found, key=len, default="")
            kind, _, tail = rest[len(repo) + 1 :].partition("/")
            rev, _, sub = tail.partition("/")
        elif "/resolve/" in url.path:
            repo, _, rest = url.path[1:].partition("/resolve/")
            kind, (rev, _, sub) = "resolve", rest.partition("/")
        else:
            return self._error(404, None, "Not found")
        repo, rev, sub = unquote(repo), unquote(rev or "main"), unquote(sub)
        if repo not in hub.repos:  # the Hub: 401 when anonymous, 404 with a token
            return self._error(401 if auth is None else 404, "RepoNotFound", "Repository not found")
        if rev not in ("main", repo_sha(repo)):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        if kind == "resolve":
            return self._resolve(repo, sub)
        if kind == "tree":
            return self._tree(repo, sub.strip("/"), query.get("recursive", [""])[0].lower() == "true")
        if kind in ("", "revision") and not sub:
            return self._info(repo, query.get("blobs", [""])[0].lower() == "true")
        self._error(404, None, "Not found")

    do_HEAD = do_GET

    def _info(self, repo: str, blobs: bool) -> None:
        hub, sha, siblings = self.server.hub, repo_sha(repo), []
        for name in hub._files(repo):
            path = hub.repos[repo] / name
            extra = {"size": path.stat().st_size, "blobId": hub._digest(path)[:40]} if blobs else {}
            siblings.append({"rfilename": name, **extra})
        self._json({"_id": sha[:24], "id": repo, "modelId": repo, "sha": sha, "private": hub.token is not None,
                    "gated": False, "disabled": False, "lastModified": "2024-01-01T00:00:00.000Z",
                    "tags": [], "downloads": 0, "likes": 0, "siblings": siblings})  # fmt: skip

    def _tree(self, repo: str, prefix: str, recursive: bool) -> None:
        hub, base = self.server.hub, f"{prefix}/" if prefix else ""
        names = [f for f in hub._files(repo) if f.startswith(base)]
        if prefix and not names:
            return self._error(404, "EntryNotFound", f"{prefix} does not exist")
        entries: dict[str, dict[str, object]] = {}
        for name in names:
            parts = name[len(base) :].split("/")
            for i in range(1, len(parts) if recursive else min(len(parts), 2)):
                d = base + "/".join(parts[:i])
                entries[d] = {"type": "directory", "path": d, "size": 0, "oid": repo_sha(d)}
            if recursive or len(parts) == 1:
                path = hub.repos[repo] / name
                size, oid = path.stat().st_size, hub._digest(path)[:40]
                entries[name] = {"type": "file", "path": name, "size": size, "oid": oid}
        self._json(list(entries.values()))

    def _resolve(self, repo: str, filename: str) -> None:
        hub, key, head = self.server.hub, (repo, filename), self.command == "HEAD"
        with hub._lock:
            hub.requests[key] += 1
            if drop := not head and hub._drops > 0:
                hub._drops, hub.dropped = hub._drops - 1, hub.dropped + 1
            if not head:
                hub.data_requests[key] += 1
        if drop:
            self.close_connection = True  # no status line at all: the client sees a disconnect
            return
        path = hub.repos[repo] / filename
        if filename not in hub._files(repo):  # also rejects "..", folders and .git/
            return self._error(404, "EntryNotFound", "Entry not found", **{"X-Repo-Commit": repo_sha(repo)})
        size = path.stat().st_size
        headers = {"X-Repo-Commit": repo_sha(repo), "ETag": f'"{hub._digest(path)}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}  # fmt: skip
        start, end, status = 0, size - 1, 200
        if (header := self.headers.get("Range")) is not None:
            span = _parse_range(header, size)
            if span is None:
                return self._error(416, None, "Range Not Satisfiable", **{"Content-Range": f"bytes */{size}"})
            (start, end), status = span, 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._start(status, headers, end - start + 1)
        left = 0 if head else end - start + 1
        with path.open("rb") as fh:
            fh.seek(start)
            while left > 0 and (chunk := fh.read(min(_CHUNK, left))):
                with hub._lock:  # counted before the write: the client may finish before it returns
                    hub.bytes_served[key] += len(chunk)
                try:
                    self.wfile.write(chunk)
                except OSError:  # the client went away mid-body
                    with hub._lock:
                        hub.bytes_served[key] -= len(chunk)
                    self.close_connection = True
                    return
                left -= len(chunk)
