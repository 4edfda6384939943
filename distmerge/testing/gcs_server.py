"""A Cloud Storage server on loopback, for tests: the XML and JSON API requests distmerge sends.

Why written here: no Cloud Storage emulator on PyPI speaks the XML API's multipart uploads, and
the code under test must be exercised over real HTTP with real credentials flows, offline. The
server keeps objects in memory with generation numbers and answers as Cloud Storage documents:
ranged GETs (206), ``x-goog-if-generation-match`` (412 PreconditionFailed), ``Content-MD5``
checks (400 BadDigest), multipart uploads (initiate, parts, list parts, complete, abort, list
uploads), JSON API listings with a delimiter, XML ``<Error><Code>`` bodies (NoSuchBucket,
NoSuchKey, NoSuchUpload). Test hooks: an OAuth token endpoint that exchanges a service
account's signed JWT for the bearer token the server then requires (google-auth's
application-default credentials, end to end), request and byte counters per object,
cut connections and held parts, as :class:`~distmerge.testing.s3_server.S3Server` has.

Longer than 300 lines because it is one protocol's server: each request kind is a short method
of one handler over one in-memory store, and splitting them would scatter that store's rules.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

from distmerge.testing.faults import Faults
from distmerge.testing.loopback_http import LoopbackHTTPServer

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
_CHUNK = 1 << 16


@dataclass
class _Object:
    data: bytes
    generation: int
    etag: str
    updated: float = field(default_factory=time.time)


@dataclass
class _Upload:
    bucket: str
    key: str
    parts: dict[int, tuple[bytes, str]] = field(default_factory=dict)


class GcsServer(Faults):
    """``with GcsServer() as gcs:`` then ``gcs.env()`` for a process that should use it.

    ``GcsServer(token="t")`` requires ``Authorization: Bearer t`` on every storage request and
    issues ``t`` at ``/token`` for a JWT signed by a key of :meth:`credentials_file` only.
    """

    def __init__(self, token: str | None = None) -> None:
        super().__init__()
        self.token = token
        self.accounts: dict[str, object] = {}  # client_email -> public key the token endpoint trusts
        self.endpoint = ""
        self.buckets: set[str] = set()
        self.objects: dict[tuple[str, str], _Object] = {}
        self.uploads: dict[str, _Upload] = {}
        self.get_requests: Counter[str] = Counter()  # ranged or whole GETs of an object
        self.bytes_sent: Counter[str] = Counter()  # object body bytes written to the client socket
        self.ranges: defaultdict[str, list[tuple[int, int]]] = defaultdict(list)
        self.part_puts: Counter[str] = Counter()
        self.token_requests = 0
        self.page_size = 1000  # listing page size (small in tests of paging)
        self._generation = 1_700_000_000_000_000
        self._lock = threading.Lock()
        self._httpd: _Server | None = None

    def start(self) -> GcsServer:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.gcs = self
        self.endpoint = self._httpd.serve_in_background()
        return self

    def close(self) -> None:
        self.hold_parts(None)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> GcsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- what a test sets up and looks at ---

    def env(self) -> dict[str, str]:
        """Variables that point google-auth and distmerge in another process here."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint, "NO_GCE_CHECK": "True"}

    def credentials_file(self, path: Path, *, trusted: bool = True) -> Path:
        """A service account key file whose token endpoint is this server; ``trusted=False``: a key
        the server does not know (a deleted or rotated key), whose tokens are refused."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        email = f"merger-{len(self.accounts)}@distmerge-tests.iam.gserviceaccount.com"
        if trusted:
            self.accounts[email] = key.public_key()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        path.write_text(json.dumps({"type": "service_account", "project_id": "distmerge-tests",
                                    "private_key_id": uuid.uuid4().hex, "private_key": pem, "client_email": email,
                                    "client_id": "1", "token_uri": f"{self.endpoint}/token"}))
        return path

    def create_bucket(self, name: str) -> None:
        self.buckets.add(name)

    def put(self, bucket: str, key: str, data: bytes) -> int:
        """Store an object directly; its generation."""
        with self._lock:
            return self._store(bucket, key, data, f'"{hashlib.md5(data).hexdigest()}"').generation  # noqa: S324

    def get(self, bucket: str, key: str) -> bytes:
        return self.objects[(bucket, key)].data

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        return sorted(k for b, k in self.objects if b == bucket and k.startswith(prefix))

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> None:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                self.put(bucket, f"{prefix}/{path.name}", path.read_bytes())

    def reset_counters(self) -> None:
        with self._lock:
            for counter in (self.get_requests, self.bytes_sent, self.ranges, self.part_puts, self.dropped):
                counter.clear()

    # --- internals ---

    def _store(self, bucket: str, key: str, data: bytes, etag: str) -> _Object:
        self._generation += 1
        made = self.objects[(bucket, key)] = _Object(data, self._generation, etag)
        return made

class _Server(LoopbackHTTPServer):
    gcs: GcsServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    # --- answers ---

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/xml") -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if body or status != 204:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        if self.path.startswith("/storage/v1/"):
            body = json.dumps({"error": {"code": status, "message": message,
                                         "errors": [{"reason": code, "message": message}]}}).encode()
            return self._send(status, body, content_type="application/json")
        xml = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{escape(message)}</Message></Error>"
        self._send(status, xml.encode())

    def _xml(self, root: str, inner: str) -> None:
        self._send(200, f"<?xml version='1.0' encoding='UTF-8'?><{root}>{inner}</{root}>".encode())

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    # --- dispatch ---

    def _handle(self) -> None:
        gcs, url, body = self.server.gcs, urlsplit(self.path), self._body()
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        if url.path == "/token":
            return self._token(body)
        if gcs.token is not None and self.headers.get("Authorization") != f"Bearer {gcs.token}":
            return self._error(401, "AuthenticationRequired", "Invalid or missing credentials")
        if url.path.startswith("/storage/v1/b/"):
            return self._json_list(url.path, query)
        bucket, _, key = unquote(url.path).lstrip("/").partition("/")
        if bucket not in gcs.buckets:
            return self._error(404, "NoSuchBucket", "The specified bucket does not exist.")
        if not key:
            if self.command == "GET" and "uploads" in query:
                return self._list_uploads(bucket, query.get("prefix", ""))
            return self._error(400, "InvalidArgument", "unsupported bucket request")
        handler = {
            ("POST", "uploads"): self._initiate, ("PUT", "uploadId"): self._part, ("GET", "uploadId"): self._list_parts,
            ("POST", "uploadId"): self._complete, ("DELETE", "uploadId"): self._abort,
        }.get((self.command, "uploads" if "uploads" in query else "uploadId" if "uploadId" in query else ""))
        if handler is not None:
            return handler(bucket, key, query, body)
        if self.command in ("GET", "HEAD"):
            return self._get(bucket, key)
        if self.command == "PUT":
            return self._put(bucket, key, body)
        if self.command == "DELETE":
            return self._delete(bucket, key)
        return self._error(405, "MethodNotAllowed", self.command)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

    def _token(self, body: bytes) -> None:
        gcs = self.server.gcs
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        with gcs._lock:
            gcs.token_requests += 1
        if not _signed_by_a_trusted_key(form.get("assertion", ""), gcs.accounts):
            return self._send(400, json.dumps({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}).encode(),
                              content_type="application/json")
        answer = {"access_token": gcs.token or "anonymous", "expires_in": 3600, "token_type": "Bearer"}
        self._send(200, json.dumps(answer).encode(), content_type="application/json")

    def _condition_fails(self, current: _Object | None) -> bool:
        wanted = self.headers.get("x-goog-if-generation-match")
        if wanted is None:
            return False
        return (current is not None) if wanted == "0" else (current is None or str(current.generation) != wanted)

    def _md5_wrong(self, body: bytes) -> bool:
        given = self.headers.get("Content-MD5")
        return given is not None and given != base64.b64encode(hashlib.md5(body).digest()).decode()  # noqa: S324

    def _object_headers(self, obj: _Object) -> dict[str, str]:
        return {"ETag": obj.etag, "x-goog-generation": str(obj.generation),
                "Last-Modified": formatdate(obj.updated, usegmt=True)}

    def _get(self, bucket: str, key: str) -> None:
        gcs = self.server.gcs
        obj = gcs.objects.get((bucket, key))
        if obj is None:
            return self._error(404, "NoSuchKey", "The specified key does not exist.")
        if self._condition_fails(obj):
            return self._error(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold.")
        headers = self._object_headers(obj)
        start, end, status = 0, len(obj.data) - 1, 200
        if (m := _RANGE.fullmatch(self.headers.get("Range", "").strip())) is not None:
            start, end, status = int(m[1]), min(int(m[2] or len(obj.data) - 1), len(obj.data) - 1), 206
            if start >= len(obj.data):
                return self._error(416, "InvalidRange", "The requested range cannot be satisfied.")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(obj.data)}"
        name = f"{bucket}/{key}"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if self.command == "HEAD":
            return
        with gcs._lock:
            gcs.get_requests[name] += 1
            gcs.ranges[name].append((start, end))
        left = end - start + 1
        if gcs.take_drop("GET"):
            left, self.close_connection = left // 2, True
        at = start
        while left > 0:
            chunk = obj.data[at:at + min(_CHUNK, left)]
            with gcs._lock:
                gcs.bytes_sent[name] += len(chunk)
            try:
                self.wfile.write(chunk)
            except OSError:
                with gcs._lock:
                    gcs.bytes_sent[name] -= len(chunk)
                self.close_connection = True
                return
            at, left = at + len(chunk), left - len(chunk)

    def _put(self, bucket: str, key: str, body: bytes) -> None:
        gcs = self.server.gcs
        if gcs.take_drop("PUT"):
            self.close_connection = True
            return
        if self._md5_wrong(body):
            return self._error(400, "BadDigest", "The Content-MD5 you specified did not match what was received.")
        with gcs._lock:
            if self._condition_fails(gcs.objects.get((bucket, key))):
                return self._error(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold.")
            obj = gcs._store(bucket, key, body, f'"{hashlib.md5(body).hexdigest()}"')  # noqa: S324
        self._send(200, headers=self._object_headers(obj))

    def _delete(self, bucket: str, key: str) -> None:
        gcs = self.server.gcs
        with gcs._lock:
            obj = gcs.objects.get((bucket, key))
            if obj is None:
                return self._error(404, "NoSuchKey", "The specified key does not exist.")
            if self._condition_fails(obj):
                return self._error(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold.")
            del gcs.objects[(bucket, key)]
        self._send(204)

    def _initiate(self, bucket: str, key: str, query: dict[str, str], body: bytes) -> None:
        upload_id = "ABPnzm" + uuid.uuid4().hex
        with self.server.gcs._lock:
            self.server.gcs.uploads[upload_id] = _Upload(bucket, key)
        self._xml("InitiateMultipartUploadResult",
                  f"<Bucket>{bucket}</Bucket><Key>{escape(key)}</Key><UploadId>{upload_id}</UploadId>")

    def _upload(self, bucket: str, key: str, query: dict[str, str]) -> _Upload | None:
        upload = self.server.gcs.uploads.get(query.get("uploadId", ""))
        if upload is None or (upload.bucket, upload.key) != (bucket, key):
            self._error(404, "NoSuchUpload", "The requested upload was not found.")
            return None
        return upload

    def _part(self, bucket: str, key: str, query: dict[str, str], body: bytes) -> None:
        gcs = self.server.gcs
        with gcs._lock:
            gcs.part_puts[f"{bucket}/{key}"] += 1
        gcs.wait_for_part()
        if gcs.take_drop("PUT"):
            self.close_connection = True
            return
        if (upload := self._upload(bucket, key, query)) is None:
            return
        if self._md5_wrong(body):
            return self._error(400, "BadDigest", "The Content-MD5 you specified did not match what was received.")
        etag = f'"{hashlib.md5(body).hexdigest()}"'  # noqa: S324
        with gcs._lock:
            upload.parts[int(query["partNumber"])] = (body, etag)
        self._send(200, headers={"ETag": etag})

    def _list_parts(self, bucket: str, key: str, query: dict[str, str], body: bytes) -> None:
        if (upload := self._upload(bucket, key, query)) is None:
            return
        marker, page = int(query.get("part-number-marker") or 0), self.server.gcs.page_size
        numbers = sorted(n for n in upload.parts if n > marker)
        shown, more = numbers[:page], len(numbers) > page
        parts = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{escape(upload.parts[n][1])}</ETag>"
                        f"<Size>{len(upload.parts[n][0])}</Size></Part>" for n in shown)
        tail = f"<NextPartNumberMarker>{shown[-1]}</NextPartNumberMarker>" if more else ""
        self._xml("ListPartsResult", f"<UploadId>{query['uploadId']}</UploadId>{parts}"
                                     f"<IsTruncated>{str(more).lower()}</IsTruncated>{tail}")

    def _complete(self, bucket: str, key: str, query: dict[str, str], body: bytes) -> None:
        gcs = self.server.gcs
        if (upload := self._upload(bucket, key, query)) is None:
            return
        try:
            listed = [(int(p.findtext("PartNumber") or 0), p.findtext("ETag") or "")
                      for p in ET.fromstring(body).iter("Part")]
        except ET.ParseError:
            return self._error(400, "MalformedXML", "The XML you provided was not well-formed.")
        numbers = [n for n, _ in listed]
        if not listed or numbers != sorted(set(numbers)):
            return self._error(400, "InvalidPartOrder", "The list of parts was not in ascending order.")
        with gcs._lock:
            for n, etag in listed:
                if n not in upload.parts or upload.parts[n][1] != etag:
                    return self._error(400, "InvalidPart", f"part {n} was not uploaded with ETag {etag}")
            data = b"".join(upload.parts[n][0] for n in numbers)
            # A composed object has a CRC32C and no MD5: its ETag is no digest of its bytes.
            obj = gcs._store(bucket, key, data, f'"C{uuid.uuid4().hex[:14]}="')
            del gcs.uploads[query["uploadId"]]
        self._xml("CompleteMultipartUploadResult", f"<Bucket>{bucket}</Bucket><Key>{escape(key)}</Key>"
                                                   f"<ETag>{escape(obj.etag)}</ETag>")

    def _abort(self, bucket: str, key: str, query: dict[str, str], body: bytes) -> None:
        if self._upload(bucket, key, query) is None:
            return
        with self.server.gcs._lock:
            del self.server.gcs.uploads[query["uploadId"]]
        self._send(204)

    def _list_uploads(self, bucket: str, prefix: str) -> None:
        found = sorted((u.key, upload_id) for upload_id, u in self.server.gcs.uploads.items()
                       if u.bucket == bucket and u.key.startswith(prefix))
        inner = "".join(f"<Upload><Key>{escape(k)}</Key><UploadId>{i}</UploadId></Upload>" for k, i in found)
        self._xml("ListMultipartUploadsResult", f"<Bucket>{bucket}</Bucket>{inner}<IsTruncated>false</IsTruncated>")

    def _json_list(self, path: str, query: dict[str, str]) -> None:
        gcs = self.server.gcs
        parts = path.split("/")  # '', storage, v1, b, BUCKET, o
        if len(parts) != 6 or parts[5] != "o" or self.command != "GET":
            return self._error(400, "invalid", "unsupported JSON API request")
        bucket = unquote(parts[4])
        if bucket not in gcs.buckets:
            return self._error(404, "notFound", "The specified bucket does not exist.")
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        names = []
        for key in gcs.keys(bucket, prefix):
            if not (delimiter and delimiter in key[len(prefix):]):
                names.append(key)
        start = int(query.get("pageToken") or 0)
        page = names[start:start + gcs.page_size]
        answer: dict[str, object] = {"kind": "storage#objects", "items": [
            {"name": k, "size": str(len(gcs.objects[(bucket, k)].data)),
             "generation": str(gcs.objects[(bucket, k)].generation)} for k in page]}
        if start + gcs.page_size < len(names):
            answer["nextPageToken"] = str(start + gcs.page_size)
        self._send(200, json.dumps(answer).encode(), content_type="application/json")



def _signed_by_a_trusted_key(assertion: str, accounts: dict[str, object]) -> bool:
    """Whether a JWT bearer assertion (RS256) is signed by the key of the account it names."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    def decoded(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    try:
        header, payload, signature = assertion.split(".")
        key = accounts.get(json.loads(decoded(payload))["iss"])
        if key is None:
            return False
        key.verify(decoded(signature), f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())  # type: ignore[attr-defined]
    except (ValueError, KeyError, InvalidSignature):
        return False
    return True
