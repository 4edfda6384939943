"""AIM's files where the models are: ``aim.stats`` and the calibration data in S3 or on the Hub."""

from __future__ import annotations

import json

import pytest

from distmerge.aim import save_statistics
from distmerge.aim.data import read_dataset
from distmerge.engine.run import run_merge
from distmerge.errors import ConfigError, OutputError
from distmerge.io.remote_files import _FETCHED
from distmerge.testing.hub_server import HubServer
from distmerge.testing.s3_server import S3Server
from tests.aim.test_aim_merge import _fake_stats
from tests.helpers import file_bytes, make_config

BUCKET = "aim-bucket"


@pytest.fixture
def stores(llama_family, tmp_path, monkeypatch):
    """The same statistics file locally, in S3 and in a Hub repository; the env pointing at both."""
    base, _ = llama_family
    repo = tmp_path / "repo"
    repo.mkdir()
    stats = repo / "stats.safetensors"
    save_statistics(_fake_stats(base), stats, {"base_model": str(base), "dataset": "test", "n_blocks": "1",
                                               "block_size": "8", "tokens": "8"})
    (repo / "calibration.jsonl").write_text("".join(json.dumps({"text": f"line {i} of the data"}) + "\n"
                                                    for i in range(5)))
    with S3Server() as s3, HubServer({"team/aim-stats": repo}) as hub:
        client = s3.client()
        client.create_bucket(Bucket=BUCKET)
        for f in repo.iterdir():
            client.put_object(Bucket=BUCKET, Key=f"aim/{f.name}", Body=f.read_bytes())
        for key, value in {**s3.env(), "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf"),
                           "DISTMERGE_CACHE": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(key, value)
        _FETCHED.clear()
        yield s3, stats
        _FETCHED.clear()


def merge_with(stats: str, llama_family, out) -> dict:
    base, experts = llama_family
    cfg = make_config("task_arithmetic", base, experts, [0.7, 0.5], aim={"omega": 0.3, "stats": stats},
                      execution={"shard_size": "30KB"})
    return run_merge(cfg, out, progress=False)


def test_statistics_from_s3_or_the_hub_merge_exactly_as_the_local_file(stores, llama_family, tmp_path):
    s3, stats = stores
    local = merge_with(str(stats), llama_family, tmp_path / "local")
    for name, where in (("s3", f"s3://{BUCKET}/aim/stats.safetensors"),
                        ("hub", "hf://team/aim-stats/stats.safetensors")):
        report = merge_with(where, llama_family, tmp_path / name)
        assert file_bytes(tmp_path / name) == file_bytes(tmp_path / "local"), name
        assert report["aim"]["relaxed_tensors"] == local["aim"]["relaxed_tensors"] > 0
        assert report["aim"]["stats_source"] == where
        # The same remote file is the same merge: a rerun finds it complete.
        assert merge_with(where, llama_family, tmp_path / name).get("noop") is True
    assert s3.bytes_sent[f"{BUCKET}/aim/stats.safetensors"] == stats.stat().st_size  # fetched once, then cached


def test_replaced_remote_statistics_change_the_merge_identity(stores, llama_family, tmp_path):
    s3, stats = stores
    where = f"s3://{BUCKET}/aim/stats.safetensors"
    merge_with(where, llama_family, tmp_path / "out")
    doubled = {k: v * 2 for k, v in _fake_stats(llama_family[0]).items()}
    save_statistics(doubled, tmp_path / "other.safetensors", {"base_model": "b", "dataset": "t", "n_blocks": "1",
                                                              "block_size": "8", "tokens": "8"})
    s3.client().put_object(Bucket=BUCKET, Key="aim/stats.safetensors", Body=(tmp_path / "other.safetensors").read_bytes())
    _FETCHED.clear()  # a new process would look again
    with pytest.raises(OutputError, match="aim.stats changed"):
        merge_with(where, llama_family, tmp_path / "out")


def test_calibration_data_from_s3_or_the_hub_reads_as_the_local_file(stores, tmp_path):
    _, stats = stores
    local = read_dataset(str(stats.parent / "calibration.jsonl"))
    for where in (f"s3://{BUCKET}/aim/calibration.jsonl", "hf://team/aim-stats/calibration.jsonl"):
        assert read_dataset(where).to_pylist() == local.to_pylist()


def test_missing_remote_files_say_which_and_where(stores, llama_family, tmp_path):
    for where, message in ((f"s3://{BUCKET}/aim/nothing.safetensors", "does not exist"),
                           ("hf://team/aim-stats/nothing.safetensors", "has no file 'nothing.safetensors'"),
                           (f"s3://{BUCKET}", "names a bucket or repository, not a file")):
        with pytest.raises(ConfigError, match=message) as e:
            merge_with(where, llama_family, tmp_path / "out")
        assert where in str(e.value) and "aim.stats" in str(e.value)
