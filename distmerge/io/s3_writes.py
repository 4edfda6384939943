"""Writing to S3: small objects whole, model files as multipart uploads whose parts come from anywhere.

Why multipart uploads: S3 assembles an object from numbered parts that any process may upload
in any order, so a model file of tens of GB is written by every worker of every node at once and
no process ever holds it; the ETag S3 answers for each part is what completing the object (and
checking a resumed run's parts with ListParts) needs. Until it is completed, an upload is
invisible to readers: a partial output file never looks like a file.

Conditional writes (``If-None-Match: *`` to create, ``If-Match: <etag>`` to replace or delete)
make a lock object that only one run can hold. Errors are worded by :func:`~distmerge.io.s3.explain`
and raised as the caller's error class; botocore's standard mode retries each request.
"""

from __future__ import annotations

import base64
import hashlib
from email.utils import parsedate_to_datetime
from typing import Any

from distmerge.errors import DistmergeError, OutputError
from distmerge.io.locations import RemoteLocation, parse_remote
from distmerge.io.object_stores import StoredObject
from distmerge.io.s3 import call, client, explain

Error = type[DistmergeError]


def _code(e: BaseException) -> str:
    response = getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _conditional(e: BaseException) -> bool:
    """A write refused by its condition (S3: 412 PreconditionFailed, 409 ConditionalRequestConflict)."""
    return _code(e) in ("PreconditionFailed", "ConditionalRequestConflict")


def _bk(location: str) -> dict[str, str]:
    where = parse_remote(location)
    return {"Bucket": where.container, "Key": where.key}


def put_object(location: str, data: bytes, what: str, error: Error = OutputError, *,
               if_none_match: bool = False, if_match: str | None = None) -> str | None:
    """Write a whole object; its ETag, or None when the condition did not hold."""
    kw: dict[str, Any] = {**_bk(location), "Body": data}
    if if_none_match:
        kw["IfNoneMatch"] = "*"
    if if_match is not None:
        kw["IfMatch"] = if_match
    try:
        return str(client().put_object(**kw).get("ETag", ""))
    except Exception as e:  # noqa: BLE001 - a failed condition is an answer, anything else is worded
        if _conditional(e):
            return None
        raise error(explain(e, location, what, "writing")) from None


def get_object(location: str, what: str, error: Error = OutputError) -> StoredObject | None:
    """A small object read whole, or None when it does not exist."""
    try:
        got = client().get_object(**_bk(location))
    except Exception as e:  # noqa: BLE001 - a missing object is an answer, anything else is worded
        if _code(e) in ("NoSuchKey", "404", "NotFound"):
            return None
        raise error(explain(e, location, what)) from None
    with got["Body"] as body:
        data = body.read()
    served = got.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    modified = got.get("LastModified")
    age = (parsedate_to_datetime(served) - modified).total_seconds() if served and modified else 0.0
    return StoredObject(data, str(got.get("ETag", "")), age)


def delete_object(location: str, what: str, error: Error = OutputError, *, if_match: str | None = None) -> bool:
    """Delete an object (a missing one counts as deleted); False when ``if_match`` did not hold."""
    kw: dict[str, Any] = dict(_bk(location))
    if if_match is not None:
        kw["IfMatch"] = if_match
    try:
        client().delete_object(**kw)
    except Exception as e:  # noqa: BLE001
        if _conditional(e):
            return False
        if _code(e) in ("NoSuchKey", "404", "NotFound"):
            return True
        raise error(explain(e, location, what, "deleting")) from None
    return True


def create_upload(location: str, what: str, error: Error = OutputError) -> str:
    """Start a multipart upload of ``location``; its upload id."""
    return str(call(client().create_multipart_upload, location, what, error, "writing", **_bk(location))["UploadId"])


def upload_part(location: str, upload_id: str, number: int, data: bytes, what: str, error: Error = OutputError,
                md5: bytes | None = None) -> str:
    """Upload part ``number`` (1-based) of an upload; the ETag S3 gives it. With ``md5`` (the
    caller's digest of ``data``) S3 itself refuses a part damaged on its way."""
    checked = {"ContentMD5": base64.b64encode(md5).decode()} if md5 is not None else {}
    answer = call(client().upload_part, location, what, error, "writing", **_bk(location), UploadId=upload_id,
                  PartNumber=number, Body=data, **checked)
    return str(answer["ETag"])


def uploaded_parts(location: str, upload_id: str, what: str, error: Error = OutputError) -> dict[int, str] | None:
    """The parts an upload holds (number -> ETag); None when the upload no longer exists."""
    parts: dict[int, str] = {}
    marker = 0
    while True:
        try:
            page = client().list_parts(**_bk(location), UploadId=upload_id, PartNumberMarker=marker)
        except Exception as e:  # noqa: BLE001
            if _code(e) == "NoSuchUpload":
                return None
            raise error(explain(e, location, what)) from None
        for part in page.get("Parts", []):
            parts[int(part["PartNumber"])] = str(part["ETag"])
        marker = int(page.get("NextPartNumberMarker") or 0)
        if not page.get("IsTruncated") or not marker:
            return parts


def multipart_etag(part_etags: list[str]) -> str:
    """The ETag S3 gives an object completed from parts with these ETags (MD5s, unencrypted)."""
    digests = b"".join(bytes.fromhex(e.strip('"')) for e in part_etags)
    return f'"{hashlib.md5(digests).hexdigest()}-{len(part_etags)}"'  # noqa: S324 - S3's own scheme


def _md5_like(etag: str) -> bool:
    plain = etag.strip('"')
    return len(plain) == 32 and all(c in "0123456789abcdef" for c in plain)


def complete_upload(location: str, upload_id: str, parts: dict[int, str], what: str, error: Error = OutputError) -> None:
    """Assemble the object from its parts (numbered 1..n without gaps)."""
    listed = [{"PartNumber": n, "ETag": parts[n]} for n in sorted(parts)]
    expected = multipart_etag([p["ETag"] for p in listed]) if all(_md5_like(p["ETag"]) for p in listed) else None
    try:
        done = client().complete_multipart_upload(**_bk(location), UploadId=upload_id,
                                                  MultipartUpload={"Parts": listed})
        got = str(done.get("ETag", ""))
        if expected is not None and got.strip('"').count("-") and got != expected:
            raise OutputError(f"{location}: the store assembled an object with ETag {got}, not the {expected} of the "
                              "parts sent; rerun with --overwrite")
    except DistmergeError:
        raise
    except Exception as e:  # noqa: BLE001
        # A completion whose answer was lost is retried by botocore and then finds no upload:
        # the object is there if its ETag is the one these parts make.
        if _code(e) == "NoSuchUpload" and _etag(location) == multipart_etag([p["ETag"] for p in listed]):
            return
        raise error(explain(e, location, what, "writing")) from None


def _etag(location: str) -> str | None:
    try:
        return str(client().head_object(**_bk(location)).get("ETag", ""))
    except Exception:  # noqa: BLE001 - "not known" is the answer
        return None


def abort_upload(location: str, upload_id: str, what: str, error: Error = OutputError) -> None:
    """Drop an upload and its parts (one already gone counts as dropped)."""
    try:
        client().abort_multipart_upload(**_bk(location), UploadId=upload_id)
    except Exception as e:  # noqa: BLE001
        if _code(e) != "NoSuchUpload":
            raise error(explain(e, location, what, "deleting")) from None


def open_uploads(folder: RemoteLocation, what: str, error: Error = OutputError) -> list[tuple[str, str]]:
    """Unfinished uploads directly under ``folder``: (name, upload id)."""
    prefix = folder.key.rstrip("/") + "/" if folder.key.strip("/") else ""
    found: list[tuple[str, str]] = []
    kw: dict[str, Any] = {"Bucket": folder.container, "Prefix": prefix}
    while True:
        page = call(client().list_multipart_uploads, str(folder), what, error, **kw)
        for upload in page.get("Uploads", []):
            name = upload["Key"][len(prefix):]
            if "/" not in name:
                found.append((name, str(upload["UploadId"])))
        if not page.get("IsTruncated"):
            return found
        kw.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))
