"""Kubernetes without a shared volume: cluster/object-store/ (storage.mode objectStore).

The example's manifests are generated from its values like the shared-volume ones, checked
against the same schemas and hardening, and every Ray pod gets the store's settings and
credentials instead of a volume; values that would need a volume are refused.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.test_cluster_manifests import (
    CLUSTER,
    RAY_STEMS,
    _values_with,
    generate,
    pod_specs_anywhere,
    security_problems,
    validate,
)

EXAMPLE = CLUSTER / "object-store"


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load((EXAMPLE / "values.yaml").read_text())


def config_text() -> str:
    return (EXAMPLE / "merge-config.yml").read_text()


def documents(stem: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((EXAMPLE / "manifests" / f"{stem}.yaml").read_text()) if d]


def test_committed_example_equals_the_generator_output_and_has_no_volume() -> None:
    files = generate.render_files(EXAMPLE / "values.yaml")
    assert {p.name for p in (EXAMPLE / "manifests").iterdir()} == set(files)
    for name, text in files.items():
        assert (EXAMPLE / "manifests" / name).read_text() == text, f"{name} is stale: see the values file's header"
    assert "pvc.yaml" not in files and "loader.yaml" not in files
    assert generate.main(["--values", str(EXAMPLE / "values.yaml"), "--out", str(EXAMPLE / "manifests"), "--check"]) == 0


@pytest.mark.parametrize("stem", ["configmap", "networkpolicy"])
def test_core_manifests_are_valid_against_the_kubernetes_schema(stem: str) -> None:
    assert validate.validate_file(EXAMPLE / "manifests" / f"{stem}.yaml", None) == []


def test_every_ray_pod_gets_the_store_settings_a_cache_and_no_volume(values: dict[str, Any]) -> None:
    found = 0
    for stem in RAY_STEMS:
        (doc,) = documents(stem)
        assert validate.validate_pod_templates(doc) == []
        for where, spec in pod_specs_anywhere(doc):
            assert security_problems(f"{stem}: {where}", spec, values, False) == []
            if "submitterPodTemplate" in where:  # sends HTTP to the dashboard only: no credentials
                assert "envFrom" not in spec["containers"][0]
                continue
            found += 1
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert "models" not in volumes and not any("persistentVolumeClaim" in v for v in volumes.values())
            assert volumes["cache"] == {"name": "cache", "emptyDir": {"sizeLimit": "20Gi"}}
            (container,) = spec["containers"]
            assert {"name": "cache", "mountPath": generate.CACHE_PATH} in container["volumeMounts"]
            env = {e["name"]: e["value"] for e in container["env"]}
            assert env == {"DISTMERGE_CACHE": generate.CACHE_PATH, "HF_HOME": f"{generate.CACHE_PATH}/hf",
                           "AWS_REGION": "us-east-1"}
            assert container["envFrom"] == [{"secretRef": {"name": "distmerge-s3"}}]
    assert found == 6  # head + workers of the RayJob, the RayCronJob and the RayCluster
    (job,) = documents("rayjob")
    assert "/etc/distmerge/merge.yml s3://my-models/merged/llama-3.1-70b-ta --shard-size" in job["spec"]["entrypoint"]
    (cron,) = documents("raycronjob")
    assert "s3://my-models/merged/nightly-{fingerprint}" in cron["spec"]["jobTemplate"]["entrypoint"]


def test_workload_identity_and_a_private_endpoint(values: dict[str, Any]) -> None:
    changed = copy.deepcopy(values)
    changed["storage"]["objectStore"].update(credentialsSecret=None, serviceAccountName="distmerge-irsa",
                                             endpoint="https://minio.storage.svc:9000")
    docs = generate.render(changed, config_text())
    for stem in RAY_STEMS:
        for where, spec in pod_specs_anywhere(docs[stem]):
            if "submitterPodTemplate" in where:
                continue
            assert spec["serviceAccountName"] == "distmerge-irsa"
            (container,) = spec["containers"]
            assert "envFrom" not in container
            assert {"name": "AWS_ENDPOINT_URL_S3", "value": "https://minio.storage.svc:9000"} in container["env"]


def test_cloud_storage_with_a_service_account_key_from_a_secret(values: dict[str, Any]) -> None:
    changed = _values_with(values, "merge.outputPath", "gs://team-merges/llama-3.1-70b-ta")
    changed = _values_with(changed, "merge.cronOutputPath", "gs://team-merges/nightly-{fingerprint}")
    changed["storage"]["objectStore"].update(credentialsSecret=None, googleCredentialsSecret="distmerge-gcs")
    text = config_text().replace("s3://my-models/", "gs://team-models/")
    assert "s3://" not in text
    docs = generate.render(changed, text)
    found = 0
    for stem in RAY_STEMS:
        assert validate.validate_pod_templates(docs[stem]) == []
        for where, spec in pod_specs_anywhere(docs[stem]):
            assert security_problems(f"{stem}: {where}", spec, changed, False) == []
            if "submitterPodTemplate" in where:
                continue
            found += 1
            (container,) = spec["containers"]
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert volumes["google-credentials"]["secret"]["secretName"] == "distmerge-gcs"
            assert {"name": "google-credentials", "mountPath": generate.GOOGLE_KEY_DIR, "readOnly": True} \
                in container["volumeMounts"]
            assert {"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": f"{generate.GOOGLE_KEY_DIR}/key.json"} \
                in container["env"]
            assert "envFrom" not in container
    assert found == 6
    assert "merge.yml gs://team-merges/llama-3.1-70b-ta --shard-size" in docs["rayjob"]["spec"]["entrypoint"]
    with pytest.raises(generate.ValuesError, match="googleCredentialsSecret"):
        bad = copy.deepcopy(changed)
        bad["storage"]["objectStore"]["googleCredentialsSecret"] = "Key_File"
        generate.render(bad, text)


@pytest.mark.parametrize("path,value,message", [
    ("storage.mode", "s3", "storage.mode: must be one of sharedVolume, objectStore"),
    ("merge.outputPath", "/models/merged/x", "merge.outputPath: '/models/merged/x' must be an s3:// or gs://bucket/prefix URL"),
    ("merge.cronOutputPath", "s3://my-models/merged/nightly", "{fingerprint}"),
    ("storage.objectStore.credentialsSecret", "My_Secret", "storage.objectStore.credentialsSecret"),
    ("storage.objectStore.cacheSize", "lots", "storage.objectStore.cacheSize"),
])
def test_values_that_would_need_a_volume_or_cannot_work_are_refused(values: dict[str, Any], path: str, value: Any,
                                                                      message: str) -> None:
    with pytest.raises(generate.ValuesError, match=re.escape(message)):
        generate.render(_values_with(values, path, value), config_text())


@pytest.mark.parametrize("old,new,message", [
    ("s3://my-models/llama-3.1-70b-math", "/models/llama-3.1-70b-math", "models[0].model: '/models/llama-3.1-70b-math'"),
    ("base_model: s3://my-models/llama-3.1-70b", "base_model: ./base", "base_model: './base' must be an s3:// or gs:// URL"),
    ("  omega: 0.4", "  omega: 0.4\n  stats: /models/aim/stats.safetensors", "aim.stats"),
])
def test_configs_that_read_local_files_are_refused(values: dict[str, Any], old: str, new: str, message: str) -> None:
    text = config_text()
    assert old in text
    with pytest.raises(generate.ValuesError, match=re.escape(message)):
        generate.render(values, text.replace(old, new))


def test_hub_ids_are_models_every_pod_can_read(values: dict[str, Any]) -> None:
    text = config_text().replace("s3://my-models/llama-3.1-70b-code", "meta-llama/Llama-3.1-70B-Instruct@main")
    assert "meta-llama/Llama-3.1-70B-Instruct@main" in yaml.safe_dump(generate.render(values, text)["configmap"])


def test_the_readme_walks_through_the_object_store_mode() -> None:
    readme = (CLUSTER / "README.md").read_text()
    assert "cluster/object-store/values.yaml" in readme and "create secret generic distmerge-s3" in readme
    assert Path(EXAMPLE / "manifests" / "rayjob.yaml").is_file()
