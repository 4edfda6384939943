"""Cloud Storage requests one by one (``io/gcs.py``, ``io/gcs_writes.py``) against the loopback server.

The merges in ``test_gcs.py`` use these requests in the usual order; here each is driven into
its corners: listings and part lists longer than a page, conditional writes that fail, a
completion whose answer was lost, an upload aborted twice, a part damaged on its way.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
import requests

from distmerge.errors import OutputError
from distmerge.io.locations import parse_remote
from distmerge.io.object_stores import object_store
from distmerge.testing.gcs_server import GcsServer

BUCKET = "requests-bucket"


@pytest.fixture
def gcs(monkeypatch):
    with GcsServer() as server:
        server.create_bucket(BUCKET)
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        yield server, object_store(f"gs://{BUCKET}")


def test_listings_and_part_lists_longer_than_a_page_are_read_whole(gcs):
    server, store = gcs
    server.page_size = 3
    for i in range(8):
        server.put(BUCKET, f"folder/file-{i}", bytes(i))
    server.put(BUCKET, "folder/deeper/not-listed", b"x")
    listed = store.list_folder(parse_remote(f"gs://{BUCKET}/folder"), "a folder")
    assert sorted(listed) == [f"file-{i}" for i in range(8)]
    assert listed["file-5"].size == 5 and listed["file-5"].version == str(server.objects[(BUCKET, "folder/file-5")].generation)
    url = f"gs://{BUCKET}/folder/big"
    upload = store.create_upload(url, "a big file")
    etags = {n: store.upload_part(url, upload, n, bytes([n]) * 10, "a part") for n in range(1, 8)}
    assert store.uploaded_parts(url, upload, "the parts") == etags
    assert all(e.strip('"') == hashlib.md5(bytes([n]) * 10).hexdigest() for n, e in etags.items())  # noqa: S324
    others = [store.create_upload(f"gs://{BUCKET}/folder/other", "x"), store.create_upload(f"gs://{BUCKET}/elsewhere", "x")]
    assert sorted(store.open_uploads(parse_remote(f"gs://{BUCKET}/folder"), "uploads")) == \
        sorted([("big", upload), ("other", others[0])])
    store.complete_upload(url, upload, etags, "a big file")
    assert server.get(BUCKET, "folder/big") == b"".join(bytes([n]) * 10 for n in range(1, 8))
    # A completion sent again after its answer was lost finds no upload, and the object there.
    store.complete_upload(url, upload, etags, "a big file")
    assert store.uploaded_parts(url, upload, "the parts") is None
    store.abort_upload(f"gs://{BUCKET}/folder/other", others[0], "an upload")
    store.abort_upload(f"gs://{BUCKET}/folder/other", others[0], "an upload")  # gone already: fine
    assert [u for _, u in store.open_uploads(parse_remote(f"gs://{BUCKET}"), "uploads")] == [others[1]]


def test_conditional_writes_hold_only_for_the_generation_they_name(gcs):
    server, store = gcs
    url = f"gs://{BUCKET}/lock"
    first = store.put_object(url, b"mine", "a lock", if_none_match=True)
    assert first and store.put_object(url, b"theirs", "a lock", if_none_match=True) is None
    held = store.get_object(url, "a lock")
    assert held.data == b"mine" and held.etag == first and 0 <= held.age_s < 5
    second = store.put_object(url, b"mine again", "a lock", if_match=first)
    assert second and second != first
    assert store.put_object(url, b"late", "a lock", if_match=first) is None  # another run's heartbeat
    assert store.delete_object(url, "a lock", if_match=first) is False
    assert store.delete_object(url, "a lock", if_match=second) is True
    assert store.get_object(url, "a lock") is None and store.delete_object(url, "a lock") is True
    with pytest.raises(OutputError, match="gs://no-such-bucket/lock: the bucket does not exist"):
        store.get_object("gs://no-such-bucket/lock", "a lock")


def test_a_part_damaged_on_its_way_is_refused_by_the_store(gcs):
    server, store = gcs
    url = f"{server.endpoint}/{BUCKET}/damaged"
    upload = store.create_upload(f"gs://{BUCKET}/damaged", "a file")
    claimed = base64.b64encode(hashlib.md5(b"the bytes sent").digest()).decode()  # noqa: S324
    answer = requests.put(url, params={"partNumber": 1, "uploadId": upload}, data=b"the bytes that came",
                          headers={"Content-MD5": claimed}, timeout=10)
    assert answer.status_code == 400 and "BadDigest" in answer.text
    assert store.uploaded_parts(f"gs://{BUCKET}/damaged", upload, "parts") == {}
    server.drop_next(1, "PUT")  # a part whose connection is cut is sent again
    etag = store.upload_part(f"gs://{BUCKET}/damaged", upload, 1, b"part one", "a part")
    assert server.dropped["PUT"] == 1 and store.uploaded_parts(f"gs://{BUCKET}/damaged", upload, "p") == {1: etag}
