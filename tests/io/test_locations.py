"""Location strings: what is a path, a bucket URL or a Hub repository (pure parsing)."""

from __future__ import annotations

import pytest

from distmerge.io.locations import (
    LocationError,
    RemoteLocation,
    hub_reference,
    is_remote,
    parse_remote,
    redacted,
)


def test_object_store_urls_parse_into_bucket_and_key():
    assert parse_remote("s3://my-bucket/team/model") == RemoteLocation("s3", "my-bucket", "team/model")
    assert parse_remote("S3://my-bucket") == RemoteLocation("s3", "my-bucket", "")
    assert str(parse_remote("gs://b.example/x/y.safetensors")) == "gs://b.example/x/y.safetensors"
    assert parse_remote("s3://my-bucket/a").child("config.json") == RemoteLocation("s3", "my-bucket", "a/config.json")
    assert parse_remote("s3://my-bucket").child("config.json").key == "config.json"
    assert is_remote("s3://b/k") and is_remote("hf://o/n") and not is_remote("/tmp/s3:/x") and not is_remote(None)


@pytest.mark.parametrize("url, message", [
    ("s3://Upper/key", "not a valid bucket name"),
    ("s3://ab/key", "not a valid bucket name"),
    ("s3://bucket-name//key", "empty, '.' or '..' part"),
    ("s3://bucket-name/a/../b", "empty, '.' or '..' part"),
    ("s3://KEYID:secret@bucket-name/k", "credentials in the URL are refused"),
    ("ftp://host/x", "not a remote location distmerge reads"),
    ("hf://justone", "expected hf://org/name"),
    ("hf://org/na me", "not a Hub repository id"),
])
def test_bad_urls_are_refused_with_a_reason(url, message):
    with pytest.raises(LocationError, match=message) as e:
        parse_remote(url)
    assert "secret" not in str(e.value)


def test_hub_ids_follow_mergekit_an_existing_folder_wins(tmp_path, monkeypatch):
    assert hub_reference("org/name") == RemoteLocation("hf", "org/name", "", None)
    assert hub_reference("org/name@v1.2") == RemoteLocation("hf", "org/name", "", "v1.2")
    assert hub_reference("hf://org/name@main") == RemoteLocation("hf", "org/name", "", "main")
    for not_hub in ("/abs/path", "./org/name", "a/b/c", "name", "s3://bucket/x", "org/name+adapter/x"):
        assert hub_reference(not_hub) is None, not_hub
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_reference("org/name") is None  # a local folder of that name is read as a folder
    with pytest.raises(LocationError, match="subfolders are not supported"):
        hub_reference("hf://org/name@main/sub")


def test_credentials_in_urls_never_reach_messages():
    assert redacted("https://user:token@mirror.example/api") == "https://***@mirror.example/api"
    assert redacted("http://127.0.0.1:9000/x") == "http://127.0.0.1:9000/x"
