"""``s3://bucket/key``: objects read by ranged GETs through boto3.

Why boto3 and not pyarrow's S3 filesystem (already a dependency): the output side needs
multipart uploads whose parts are written by different processes on different nodes and
completed by the driver (pyarrow only offers one writer's stream), and one client library per
store keeps credentials, endpoints and retries in one place. boto3 reads credentials and the
endpoint where every AWS tool does (``AWS_ACCESS_KEY_ID``/``AWS_PROFILE``/instance and
workload identity; ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for MinIO, Ceph, R2 and
test servers); distmerge never sees, logs or stores them.

Bounded concurrency: each worker process issues one ranged request at a time, so a node never
has more requests in flight than it has merge workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from distmerge.errors import DistmergeError
from distmerge.io.locations import RemoteLocation, parse_remote
from distmerge.io.object_stores import ObjectStat
from distmerge.io.remote import PerSettings, RemoteReader, RemoteStorage, SizeCache, pinned_version
from distmerge.io.retry import attempts

STREAM_CHUNK = 1 << 20
_SIZES = SizeCache()


def _boto3() -> Any:
    try:
        import boto3
        import botocore.config
    except ImportError:
        raise DistmergeError("s3:// locations need boto3, which is not installed: pip install 'distmerge[remote]'") \
            from None
    return boto3, botocore.config


# The settings a client is made from: a process whose environment changes gets a new client.
_SETTINGS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
             "AWS_DEFAULT_REGION", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "DISTMERGE_REMOTE_ATTEMPTS")


def client() -> Any:
    """This process's S3 client, made on first use and shared by its threads."""
    return _CLIENTS.get()


def _new_client() -> Any:
    boto3, config = _boto3()
    retries = {"total_max_attempts": attempts(), "mode": "standard"}
    return boto3.session.Session().client(
        "s3", config=config.Config(retries=retries, connect_timeout=10, read_timeout=60, max_pool_connections=4))


_CLIENTS = PerSettings(_SETTINGS, _new_client)


def transient(e: BaseException) -> bool:
    """Errors worth asking again for: dropped connections, timeouts, throttling and 5xx answers."""
    try:
        from botocore import exceptions as bx
    except ImportError:
        return False
    if isinstance(e, (ConnectionError, TimeoutError, bx.ConnectionError, bx.ReadTimeoutError,
                      bx.IncompleteReadError, bx.ResponseStreamingError)):
        return True
    if isinstance(e, bx.ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429 or e.response.get("Error", {}).get("Code") in ("SlowDown", "Throttling")
    return type(e).__name__ in ("ProtocolError", "ReadTimeoutError", "IncompleteRead")


def explain(e: BaseException, location: str, what: str, action: str = "reading") -> str:
    """A message a user can act on, for an error of a request about ``location`` (``action``:
    reading or writing ``what``)."""
    try:
        from botocore import exceptions as bx
    except ImportError:
        return f"{location}: {what}: {e}"
    if isinstance(e, bx.NoCredentialsError):
        return (f"{location}: no AWS credentials found for {action} {what}; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the node an instance or workload identity")
    if isinstance(e, bx.EndpointConnectionError):
        where = urlsplit(str(e.kwargs.get("endpoint_url", "")))
        return (f"{location}: cannot reach the S3 endpoint {where.scheme}://{where.hostname} for {action} {what}; "
                "check the "
                "network, or AWS_ENDPOINT_URL_S3 for an S3-compatible store")
    if isinstance(e, bx.ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code == "PreconditionFailed" or status == 412:
            return (f"{location}: the object changed since the merge was planned (its ETag is no longer the "
                    f"planned one) while reading {what}; rerun the merge to plan it again with the new object")
        if code == "NoSuchBucket":
            return f"{location}: the bucket does not exist ({action} {what}); check the bucket name"
        if code in ("NoSuchKey", "404", "NotFound"):
            return f"{location}: {what} does not exist in the bucket"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken") \
                or status == 403:
            rights = "s3:GetObject/s3:ListBucket" if action == "reading" else "s3:PutObject/s3:DeleteObject"
            return (f"{location}: access denied {action} {what} ({code or status}): the credentials in use are "
                    f"wrong, expired, or lack {rights} on it")
        return f"{location}: S3 answered {code or status} {action} {what}"
    return f"{location}: {what}: {type(e).__name__}: {str(e)[:300]}"


def call(fn: Any, location: str, what: str, error: type[DistmergeError], action: str = "reading", **kw: Any) -> Any:
    """One API call; botocore's standard mode already retries it (connection errors, 5xx, throttling)."""
    try:
        return fn(**kw)
    except DistmergeError:
        raise
    except Exception as e:  # noqa: BLE001 - worded for the user
        raise error(explain(e, location, what, action)) from None


def stat(location: str, what: str, error: type[DistmergeError] = DistmergeError) -> ObjectStat:
    """Size and ETag of one object (a HEAD request)."""
    where = parse_remote(location)
    head = call(client().head_object, location, what, error, Bucket=where.container, Key=where.key)
    return ObjectStat(int(head["ContentLength"]), str(head.get("ETag", "")))


def list_folder(folder: RemoteLocation, what: str, error: type[DistmergeError] = DistmergeError
                ) -> dict[str, ObjectStat]:
    """The objects directly under ``folder`` (a prefix read as a folder): name -> stat."""
    prefix = folder.key.rstrip("/") + "/" if folder.key.strip("/") else ""
    found: dict[str, ObjectStat] = {}
    token: str | None = None
    while True:
        kw: dict[str, Any] = {"Bucket": folder.container, "Prefix": prefix, "Delimiter": "/"}
        if token:
            kw["ContinuationToken"] = token
        page = call(client().list_objects_v2, str(folder), what, error, **kw)
        for obj in page.get("Contents", []):
            found[obj["Key"][len(prefix):]] = ObjectStat(int(obj["Size"]), str(obj.get("ETag", "")))
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return found


class S3Storage(RemoteStorage):
    """Ranged GETs of S3 objects (any S3-compatible server the endpoint settings point to)."""

    def open_reader(self, location: Any, what: str, error: type[DistmergeError] = DistmergeError) -> RemoteReader:
        location = str(location)
        where = parse_remote(location)
        size = _SIZES.get(location, lambda: stat(location, what, error).size)
        pinned = {"IfMatch": version} if (version := pinned_version(location)) else {}

        def stream(offset: int, length: int) -> Iterator[bytes]:
            body = client().get_object(Bucket=where.container, Key=where.key,
                                       Range=f"bytes={offset}-{offset + length - 1}", **pinned)["Body"]
            try:
                yield from body.iter_chunks(STREAM_CHUNK)
            finally:
                body.close()

        return RemoteReader(location, size, stream, transient, lambda e: error(explain(e, location, what)))


S3 = S3Storage()
