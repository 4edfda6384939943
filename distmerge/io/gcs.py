"""``gs://bucket/key``: Cloud Storage objects read by ranged GETs of its XML API.

Why plain HTTP through google-auth and not the google-cloud-storage client: the output side
needs XML API multipart uploads whose parts are sent by different processes on different nodes
and completed by the driver, which the client library only offers through private modules
(``_media``) that change between releases; the XML API is a documented, stable HTTP protocol
(the S3 one), so a dozen requests written here serve reads, conditional writes and multipart
uploads alike. google-auth (already installed with Ray) finds the credentials where every
Google tool does: ``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's application-default login, the
metadata server of a GCE/GKE node (workload identity). distmerge never sees, logs or stores
them. ``STORAGE_EMULATOR_HOST`` points requests at an emulator, as Google's own clients do;
there requests go without credentials unless ``GOOGLE_APPLICATION_CREDENTIALS`` names some.

Listings use the JSON API (the same host): it gives each object's generation, the number a
conditional request compares. Bounded concurrency: one ranged request at a time per worker.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from distmerge.errors import DistmergeError
from distmerge.io.locations import RemoteLocation, parse_remote
from distmerge.io.object_stores import ObjectStat
from distmerge.io.remote import PerSettings, RemoteReader, RemoteStorage, SizeCache, pinned_version
from distmerge.io.retry import with_retries

ENDPOINT = "https://storage.googleapis.com"
SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
STREAM_CHUNK = 1 << 20
TIMEOUT_S = (10, 60)  # connect, read; completing a multipart upload may take minutes: its own timeout
_SETTINGS = ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")
_SIZES = SizeCache()


@dataclass
class StoreAnswer(Exception):
    """A request Cloud Storage answered with an error status (``code`` from its XML or JSON body)."""

    status: int
    code: str = ""
    message: str = ""

    def __str__(self) -> str:
        return f"{self.status} {self.code} {self.message}".strip()


def endpoint() -> str:
    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip().rstrip("/")
    if not host:
        return ENDPOINT
    return host if "://" in host else f"http://{host}"


def _credentials() -> Any:
    """Application-default credentials; None (no Authorization header) against an emulator."""
    if os.environ.get("STORAGE_EMULATOR_HOST") and not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return None
    import google.auth

    credentials, _ = google.auth.default(scopes=[SCOPE])
    return credentials


def session() -> Any:
    """This process's HTTP session (with credentials, refreshed as they expire), made on first use."""
    return _SESSIONS.get()


def _new_session() -> Any:
    import requests
    from google.auth.transport.requests import AuthorizedSession

    credentials = _credentials()
    made = requests.Session() if credentials is None else AuthorizedSession(credentials)
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=4)
    made.mount("http://", adapter)
    made.mount("https://", adapter)
    return made


_SESSIONS = PerSettings(_SETTINGS, _new_session)


def object_url(where: RemoteLocation, query: str = "") -> str:
    url = f"{endpoint()}/{where.container}/{quote(where.key, safe='/~')}"
    return f"{url}?{query}" if query else url


def error_answer(response: Any) -> StoreAnswer:
    """The error a response carries: XML API ``<Error><Code>``, JSON API ``{"error": ...}``."""
    body = b"" if response.request.method == "HEAD" else response.content[:65536]
    code = message = ""
    text = body.decode("utf-8", "replace").strip()
    if text.startswith("<"):
        try:
            root = ET.fromstring(text)
            code = xml_text(root, "Code") or ""
            message = xml_text(root, "Message") or xml_text(root, "Details") or ""
        except ET.ParseError:
            message = text[:200]
    elif text.startswith("{"):
        import json

        try:
            error = json.loads(text).get("error", {})
            message = str(error.get("message", ""))
            reasons = error.get("errors") or [{}]
            code = str(reasons[0].get("reason", ""))
        except (ValueError, AttributeError):
            message = text[:200]
    return StoreAnswer(response.status_code, code, message)


def xml_text(node: ET.Element, tag: str) -> str | None:
    """The text of ``node``'s child ``tag``, whatever XML namespace the store answered in."""
    for child in node:
        if child.tag.rsplit("}", 1)[-1] == tag:
            return child.text or ""
    return None


def xml_children(node: ET.Element, tag: str) -> list[ET.Element]:
    return [child for child in node if child.tag.rsplit("}", 1)[-1] == tag]


def transient(e: BaseException) -> bool:
    """Errors worth asking again for: dropped connections, timeouts, throttling and 5xx answers."""
    if isinstance(e, StoreAnswer):
        return e.status >= 500 or e.status in (408, 429)
    try:
        import requests
    except ImportError:
        return False
    if isinstance(e, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout,
                      requests.exceptions.ChunkedEncodingError)):
        return True
    return type(e).__name__ in ("ProtocolError", "ReadTimeoutError", "IncompleteRead", "TransportError")


def explain(e: BaseException, location: str, what: str, action: str = "reading") -> str:
    """A message a user can act on, for an error of a request about ``location``."""
    kind = type(e).__name__
    if kind == "DefaultCredentialsError":
        return (f"{location}: no Google Cloud credentials found for {action} {what}; set "
                "GOOGLE_APPLICATION_CREDENTIALS to a key file, run `gcloud auth application-default login`, "
                "or give the node a service account (workload identity)")
    if kind in ("RefreshError", "TransportError") and type(e).__module__.startswith("google.auth"):
        said = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        return (f"{location}: the Google Cloud credentials in use could not get an access token for {action} "
                f"{what} ({said[:200]}); they are wrong, revoked or expired")
    if isinstance(e, StoreAnswer):
        if e.status == 412:
            return (f"{location}: the object changed since the merge was planned (its generation is no longer "
                    f"the planned one) while {action} {what}; rerun the merge to plan it again with the new object")
        if e.code == "NoSuchBucket" or (e.status == 404 and e.code == "notFound" and "bucket" in e.message.lower()):
            return f"{location}: the bucket does not exist ({action} {what}); check the bucket name"
        if e.status == 404:
            return f"{location}: {what} does not exist in the bucket"
        if e.status in (401, 403):
            rights = ("storage.objects.get/storage.objects.list (roles/storage.objectViewer)" if action == "reading"
                      else "storage.objects.create/storage.objects.delete (roles/storage.objectUser)")
            return (f"{location}: access denied {action} {what} ({e.code or e.status}): the credentials in use are "
                    f"wrong, expired, or lack {rights} on it")
        return f"{location}: Cloud Storage answered {e.status} {e.code} {action} {what}".rstrip()
    try:
        import requests

        if isinstance(e, requests.ConnectionError):
            return (f"{location}: cannot reach Cloud Storage at {endpoint()} for {action} {what}; check the "
                    "network, or STORAGE_EMULATOR_HOST for an emulator")
    except ImportError:
        pass
    return f"{location}: {what}: {kind}: {str(e)[:300]}"


def send(method: str, url: str, location: str, what: str, error: type[DistmergeError], action: str = "reading",
         answers: tuple[int, ...] = (), timeout: Any = TIMEOUT_S, **kw: Any) -> Any:
    """One request, retried while it fails transiently; a status in ``answers`` is returned for the
    caller to read (404 of a lookup, 412 of a condition), any other error raised worded."""

    def once() -> Any:
        response = session().request(method, url, timeout=timeout, **kw)
        if response.status_code < 300 or response.status_code in answers:
            return response
        raise error_answer(response)

    try:
        return with_retries(once, f"{action} {location}", transient)
    except DistmergeError:
        raise
    except Exception as e:  # noqa: BLE001 - worded for the user
        raise error(explain(e, location, what, action)) from None


def stat(location: str, what: str, error: type[DistmergeError] = DistmergeError) -> ObjectStat:
    """Size and generation of one object (a HEAD request)."""
    where = parse_remote(location)
    head = send("HEAD", object_url(where), location, what, error, answers=(404,))
    if head.status_code == 404:  # a HEAD has no body to say whether the object or its bucket is missing
        got = send("GET", object_url(where), location, what, error, answers=(404,), stream=True)
        with got:
            answer = error_answer(got) if got.status_code == 404 else StoreAnswer(404)
        raise error(explain(answer, location, what))
    return ObjectStat(int(head.headers["Content-Length"]), head.headers.get("x-goog-generation", ""))


def list_folder(folder: RemoteLocation, what: str, error: type[DistmergeError] = DistmergeError
                ) -> dict[str, ObjectStat]:
    """The objects directly under ``folder`` (a prefix read as a folder): name -> stat."""
    prefix = folder.key.rstrip("/") + "/" if folder.key.strip("/") else ""
    url = f"{endpoint()}/storage/v1/b/{quote(folder.container, safe='')}/o"
    found: dict[str, ObjectStat] = {}
    params: dict[str, str] = {"prefix": prefix, "delimiter": "/", "fields": "items(name,size,generation),nextPageToken"}
    while True:
        page = send("GET", url, str(folder), what, error, params=params).json()
        for item in page.get("items", []):
            found[item["name"][len(prefix):]] = ObjectStat(int(item["size"]), str(item.get("generation", "")))
        token = page.get("nextPageToken")
        if not token:
            return found
        params["pageToken"] = token


class GcsStorage(RemoteStorage):
    """Ranged GETs of Cloud Storage objects."""

    def open_reader(self, location: Any, what: str, error: type[DistmergeError] = DistmergeError) -> RemoteReader:
        location = str(location)
        url = object_url(parse_remote(location))
        size = _SIZES.get(location, lambda: stat(location, what, error).size)
        pinned = {"x-goog-if-generation-match": version} if (version := pinned_version(location)) else {}

        def stream(offset: int, length: int) -> Iterator[bytes]:
            headers = {"Range": f"bytes={offset}-{offset + length - 1}", **pinned}
            response = session().get(url, headers=headers, stream=True, timeout=TIMEOUT_S)
            try:
                if response.status_code >= 300:
                    raise error_answer(response)
                if response.status_code != 206 and offset:  # the whole object from its start is no span
                    raise StoreAnswer(response.status_code, "RangeIgnored", "the server ignored the Range header")
                yield from response.iter_content(STREAM_CHUNK)
            finally:
                response.close()

        return RemoteReader(location, size, stream, transient, lambda e: error(explain(e, location, what)))


GCS = GcsStorage()
