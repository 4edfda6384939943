"""An S3-compatible server on loopback, for tests: moto's server behind a small reverse proxy.

Why it exists: code that reads and writes models on S3 (ranged reads of shards, multipart uploads,
listings) must be tested against boto3/botocore itself, offline and deterministically. moto's
``ThreadedMotoServer`` speaks S3 but has no test hooks, so a standard-library proxy forwards every
request unchanged and adds what moto lacks: one accepted access key id (another gets S3's 403
InvalidAccessKeyId, none 403 AccessDenied; signatures are not checked), traffic counters per
``bucket/key`` and cut connections (to exercise retries). moto's store is process-wide: it is
reset when a server starts and when it closes.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import re
import socket
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
from botocore.config import Config
from moto.server import ThreadedMotoServer

from distmerge.testing.faults import Faults
from distmerge.testing.loopback_http import LoopbackHTTPServer

_CHUNK = 1 << 16
_CREDENTIAL = re.compile(r"AWS4-HMAC-SHA256 .*?Credential=([^/,\s]+)/|AWS ([^:\s]+):")  # SigV4 | V2
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/")
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect", "content-length"}
_SUBRESOURCES = {"acl", "tagging", "attributes", "retention", "legal-hold", "torrent", "uploadId", "uploads", "restore"}


class S3Server(Faults):
    """``with S3Server() as s3:`` then ``s3.client()``, or ``s3.env()`` for another process."""

    def __init__(self, access_key: str = "testing-key", secret_key: str = "testing-secret") -> None:
        super().__init__()
        self.access_key, self.secret_key = access_key, secret_key
        self.endpoint, self.upstream = "", ("", 0)  # the proxy's URL; moto's own (host, port)
        self.get_requests: Counter[str] = Counter()  # GET of an object, dropped ones included
        self.bytes_sent: Counter[str] = Counter()  # GET body bytes written to the client socket
        self.ranges: defaultdict[str, list[tuple[int, int]]] = defaultdict(list)  # a-b as asked, a- and -n as served
        self.bytes_received: Counter[str] = Counter()  # PUT object / upload-part bodies
        self.part_puts: Counter[str] = Counter()  # upload-part PUTs, per object
        self.part_delay = 0.0  # seconds each upload-part PUT waits before it is forwarded (a slow store)
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._moto: ThreadedMotoServer | None = None
        self._httpd: _Server | None = None

    def start(self) -> S3Server:
        if (log := logging.getLogger("werkzeug")).level == logging.NOTSET:
            log.setLevel(logging.WARNING)  # moto's server logs every request at INFO otherwise
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        self.upstream = self._moto.get_host_and_port()
        try:
            self._reset_moto()
            self._httpd = _Server(("127.0.0.1", 0), _Handler)
        except BaseException:
            self.close()
            raise
        self._httpd.s3 = self
        self.endpoint = self._httpd.serve_in_background()
        return self

    def close(self) -> None:
        self.hold_parts(None)
        if self._httpd is not None:
            self._httpd.shutdown()  # returns once serve_forever has; then wake keep-alive handlers
            for conn, thread in list(self._conns.items()):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                thread.join(5)
            self._httpd.server_close()
            self._httpd = None
        if self._moto is not None:
            with contextlib.suppress(OSError, http.client.HTTPException):
                self._reset_moto()
            self._moto.stop()
            self._moto._server.server_close()  # type: ignore[union-attr]  # stop() leaves it open
            self._moto = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _reset_moto(self) -> None:
        with contextlib.closing(http.client.HTTPConnection(*self.upstream, timeout=30)) as conn:
            conn.request("POST", "/moto-api/reset")
            conn.getresponse().read()

    def client(self, config: Config | None = None) -> Any:
        """A boto3 S3 client for this server (its own session: no global boto3 state)."""
        session = boto3.session.Session(self.access_key, self.secret_key, region_name="us-east-1")
        return session.client("s3", endpoint_url=self.endpoint, config=config)

    def env(self) -> dict[str, str]:
        """Variables that point boto3 in another process here: ``{**os.environ, **s3.env()}``."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip

    def reset_counters(self) -> None:
        with self._lock:
            for counter in (self.get_requests, self.bytes_sent, self.ranges, self.bytes_received, self.dropped,
                            self.part_puts):
                counter.clear()

class _Server(LoopbackHTTPServer):
    s3: S3Server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; Expect: 100-continue is answered here
    server: _Server
    upstream: http.client.HTTPConnection

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:  # one upstream connection per client connection, kept alive too
        super().setup()
        self.upstream = http.client.HTTPConnection(*self.server.s3.upstream, timeout=60)
        self.server.s3._conns[self.connection] = threading.current_thread()  # for close()

    def finish(self) -> None:
        self.server.s3._conns.pop(self.connection, None)
        self.upstream.close()
        with contextlib.suppress(OSError):
            super().finish()

    def _error(self, status: int, code: str, message: str) -> None:
        xml = f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>s3server</RequestId></Error>"
        body = b'<?xml version="1.0" encoding="UTF-8"?>\n' + xml.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            parts.append(self.rfile.read(size + 2)[:-2])  # each chunk ends with CRLF
        while self.rfile.readline().strip():  # trailers
            pass
        return b"".join(parts)

    def _proxy(self) -> None:
        s3, url, method, body = self.server.s3, urlsplit(self.path), self.command, self._body()
        query = parse_qs(url.query, keep_blank_values=True)
        bucket, _, key = unquote(url.path).lstrip("/").partition("/")  # path-style addressing
        name = f"{bucket}/{key}" if key else ""
        is_get = method == "GET" and bool(name) and not _SUBRESOURCES & query.keys()
        is_put = method == "PUT" and bool(name) and "x-amz-copy-source" not in self.headers and (
            not query or {"partNumber", "uploadId"} <= query.keys())  # fmt: skip
        m, arg = _CREDENTIAL.match(self.headers.get("Authorization", "")), lambda k: query.get(k, [""])[0]
        akid = (m[1] or m[2]) if m else arg("X-Amz-Credential").split("/")[0] or arg("AWSAccessKeyId")
        if not akid:  # presigned URLs carry the key id in the query
            return self._error(403, "AccessDenied", "Access Denied")
        if akid != s3.access_key:
            return self._error(403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.")
        if is_put:
            with s3._lock:
                s3.bytes_received[name] += len(body)
                s3.part_puts[name] += "partNumber" in query
            if "partNumber" in query:
                s3.wait_for_part()
                time.sleep(s3.part_delay)
            if s3.take_drop("PUT"):
                self.close_connection = True  # the body was read: the client sees a disconnect
                return
        try:
            self.upstream.putrequest(method, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in _HOP:  # Host included: unchanged
                    self.upstream.putheader(k, v)
            if body or method in ("PUT", "POST"):
                self.upstream.putheader("Content-Length", str(len(body)))
            self.upstream.endheaders(body or None)
            resp = self.upstream.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self.upstream.close()
            return self._error(502, "BadGateway", f"moto: {exc!r}")
        length = resp.getheader("Content-Length")
        data = b"" if length is not None or method == "HEAD" else resp.read()  # small XML answers
        self.send_response_only(resp.status, resp.reason)  # moto's Server and Date follow
        for k, v in resp.getheaders():
            if k.lower() not in _HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", length if length is not None else str(len(data)))
        self.end_headers()
        if method == "HEAD" or length is None:
            self.wfile.write(data)
            resp.read()  # nothing left: frees the upstream connection for the next request
            return
        left, data_get = int(length), is_get and resp.status in (200, 206)
        if data_get:
            m = _RANGE.fullmatch(self.headers.get("Range", "").strip()) or _CONTENT_RANGE.match(resp.getheader("Content-Range", ""))
            with s3._lock:
                s3.get_requests[name] += 1
                if m is not None:
                    s3.ranges[name].append((int(m.group(1)), int(m.group(2))))
            if s3.take_drop("GET"):
                left, self.close_connection = left // 2, True
        self._stream(resp, left, name if data_get else "")
        if self.close_connection or not resp.isclosed():
            self.upstream.close()  # its answer was not read to the end: not reusable

    def _stream(self, resp: http.client.HTTPResponse, left: int, name: str) -> None:
        sent = self.server.s3.bytes_sent if name else Counter()
        while left > 0 and (chunk := resp.read(min(_CHUNK, left))):
            with self.server.s3._lock:  # counted first: a client that has it all sees the count
                sent[name] += len(chunk)
            try:
                self.wfile.write(chunk)
            except OSError:  # the client went away mid-body: this chunk counts as not sent
                with self.server.s3._lock:
                    sent[name] -= len(chunk)
                self.close_connection = True
                return
            left -= len(chunk)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = _proxy
