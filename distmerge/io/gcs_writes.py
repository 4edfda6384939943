"""Writing to Cloud Storage: small objects whole, model files as XML API multipart uploads.

The same contracts as :mod:`distmerge.io.s3_writes` (see there for why multipart uploads and
conditional writes), in Cloud Storage's terms: an object's version is its generation number,
compared by ``x-goog-if-generation-match`` (``0``: only if no live object has the name); each
part is sent with its ``Content-MD5``, so the store itself refuses a part damaged on its way.
An object completed from parts has a CRC32C but no MD5, so its ETag says nothing about the
parts; distmerge's verification reads the checksums of every tensor back instead.
"""

from __future__ import annotations

import base64
import hashlib
import xml.etree.ElementTree as ET
from email.utils import parsedate_to_datetime
from typing import Any
from xml.sax.saxutils import escape

from distmerge.errors import DistmergeError, OutputError
from distmerge.io.gcs import (
    endpoint,
    error_answer,
    explain,
    object_url,
    send,
    xml_children,
    xml_text,
)
from distmerge.io.locations import RemoteLocation, parse_remote
from distmerge.io.object_stores import StoredObject

Error = type[DistmergeError]
COMPLETE_TIMEOUT_S = (10, 900)  # "Cloud Storage can take several minutes to process" a completion


def _url(location: str, query: str = "") -> str:
    return object_url(parse_remote(location), query)


def _xml(response: Any) -> ET.Element:
    return ET.fromstring(response.content)


def put_object(location: str, data: bytes, what: str, error: Error = OutputError, *,
               if_none_match: bool = False, if_match: str | None = None) -> str | None:
    """Write a whole object; its generation, or None when the condition did not hold."""
    headers = {"Content-MD5": base64.b64encode(hashlib.md5(data).digest()).decode()}  # noqa: S324
    if if_none_match:
        headers["x-goog-if-generation-match"] = "0"
    if if_match is not None:
        headers["x-goog-if-generation-match"] = if_match
    answer = send("PUT", _url(location), location, what, error, "writing", answers=(412,), data=data,
                  headers=headers)
    return None if answer.status_code == 412 else answer.headers.get("x-goog-generation", "")


def get_object(location: str, what: str, error: Error = OutputError) -> StoredObject | None:
    """A small object read whole, or None when it does not exist (a missing bucket is an error)."""
    got = send("GET", _url(location), location, what, error, answers=(404,))
    if got.status_code == 404:
        answer = error_answer(got)
        if answer.code == "NoSuchBucket":
            raise error(explain(answer, location, what))
        return None
    served, modified = got.headers.get("Date"), got.headers.get("Last-Modified")
    age = (parsedate_to_datetime(served) - parsedate_to_datetime(modified)).total_seconds() \
        if served and modified else 0.0
    return StoredObject(got.content, got.headers.get("x-goog-generation", ""), age)


def delete_object(location: str, what: str, error: Error = OutputError, *, if_match: str | None = None) -> bool:
    """Delete an object (a missing one counts as deleted); False when ``if_match`` did not hold."""
    headers = {"x-goog-if-generation-match": if_match} if if_match is not None else {}
    answer = send("DELETE", _url(location), location, what, error, "deleting", answers=(404, 412), headers=headers)
    return answer.status_code != 412


def create_upload(location: str, what: str, error: Error = OutputError) -> str:
    """Start a multipart upload of ``location``; its upload id."""
    answer = send("POST", _url(location, "uploads"), location, what, error, "writing",
                  headers={"Content-Length": "0"})
    upload_id = xml_text(_xml(answer), "UploadId")
    if not upload_id:
        raise error(f"{location}: Cloud Storage started an upload without an UploadId ({what})")
    return upload_id


def upload_part(location: str, upload_id: str, number: int, data: bytes, what: str, error: Error = OutputError,
                md5: bytes | None = None) -> str:
    """Upload part ``number`` (1-based); the ETag the store gives it (the store checks its MD5:
    ``md5``, the caller's digest of ``data``, or one computed here)."""
    digest = md5 if md5 is not None else hashlib.md5(data).digest()  # noqa: S324
    headers = {"Content-MD5": base64.b64encode(digest).decode()}
    answer = send("PUT", _url(location), location, what, error, "writing", data=data, headers=headers,
                  params={"partNumber": str(number), "uploadId": upload_id})
    return answer.headers.get("ETag", "")


def uploaded_parts(location: str, upload_id: str, what: str, error: Error = OutputError) -> dict[int, str] | None:
    """The parts an upload holds (number -> ETag); None when the upload no longer exists."""
    parts: dict[int, str] = {}
    marker = "0"
    while True:
        answer = send("GET", _url(location), location, what, error, answers=(404,),
                      params={"uploadId": upload_id, "part-number-marker": marker})
        if answer.status_code == 404:
            return None
        root = _xml(answer)
        for part in xml_children(root, "Part"):
            parts[int(xml_text(part, "PartNumber") or 0)] = xml_text(part, "ETag") or ""
        marker = xml_text(root, "NextPartNumberMarker") or ""
        if (xml_text(root, "IsTruncated") or "").lower() != "true" or not marker:
            return parts


def complete_upload(location: str, upload_id: str, parts: dict[int, str], what: str, error: Error = OutputError) -> None:
    """Assemble the object from its parts (numbered 1..n without gaps)."""
    listed = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{escape(parts[n])}</ETag></Part>"
                     for n in sorted(parts))
    body = f"<CompleteMultipartUpload>{listed}</CompleteMultipartUpload>".encode()
    answer = send("POST", _url(location), location, what, error, "writing", answers=(404,), data=body,
                  params={"uploadId": upload_id}, headers={"Content-Type": "application/xml"},
                  timeout=COMPLETE_TIMEOUT_S)
    if answer.status_code == 404:
        # A completion whose answer was lost is sent again and then finds no upload: the object is
        # there if the store holds it (its tensors' checksums are read back by the verification).
        if send("HEAD", _url(location), location, what, error, answers=(404,)).status_code == 200:
            return
        raise error(explain(error_answer(answer), location, what, "writing"))
    if answer.content.lstrip().startswith(b"<Error"):  # an error may come with status 200 once the body started
        raise error(explain(error_answer(answer), location, what, "writing"))


def abort_upload(location: str, upload_id: str, what: str, error: Error = OutputError) -> None:
    """Drop an upload and its parts (one already gone counts as dropped)."""
    send("DELETE", _url(location), location, what, error, "deleting", answers=(404,), params={"uploadId": upload_id})


def open_uploads(folder: RemoteLocation, what: str, error: Error = OutputError) -> list[tuple[str, str]]:
    """Unfinished uploads directly under ``folder``: (name, upload id)."""
    prefix = folder.key.rstrip("/") + "/" if folder.key.strip("/") else ""
    url = f"{endpoint()}/{folder.container}"
    params = {"uploads": "", "prefix": prefix}
    found: list[tuple[str, str]] = []
    while True:
        root = _xml(send("GET", url, str(folder), what, error, params=params))
        for upload in xml_children(root, "Upload"):
            name = (xml_text(upload, "Key") or "")[len(prefix):]
            if name and "/" not in name:
                found.append((name, xml_text(upload, "UploadId") or ""))
        if (xml_text(root, "IsTruncated") or "").lower() != "true":
            return found
        params.update({"key-marker": xml_text(root, "NextKeyMarker") or "",
                       "upload-id-marker": xml_text(root, "NextUploadIdMarker") or ""})
