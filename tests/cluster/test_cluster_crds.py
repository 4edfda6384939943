"""The Ray objects (RayJob, RayCronJob, RayCluster) against the KubeRay CRDs, offline.

The CRDs are the operator's, not part of the repository: they are found in the folder named
by $DISTMERGE_KUBERAY_CRDS, else in ../shared/kuberay-crds beside the repository (the
kuberay-operator Helm chart ships them under crds/). Where neither exists this module skips
as a whole, with one reason, and test_cluster_manifests.py still checks what the Kubernetes
core schemas cover; a $DISTMERGE_KUBERAY_CRDS that lacks a file fails: the pointer is wrong.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.test_cluster_manifests import (
    CLUSTER,
    RAY_STEMS,
    _config_text,
    _values_with,
    _worker,
    generate,
    manifest,
    validate,
)

CRD_DIR = validate.find_crd_dir()
if CRD_DIR is None:
    pytest.skip(validate.CRDS_NOT_FOUND, allow_module_level=True)


@pytest.fixture(scope="module")
def crds() -> Path:
    """The CRD folder, complete: a folder named but lacking a CRD fails rather than skips."""
    assert CRD_DIR is not None
    missing = validate.missing_crd_files(CRD_DIR)
    if missing:
        pytest.fail(f"{CRD_DIR}: {', '.join(missing)} missing: {validate.CRDS_HINT}")
    return CRD_DIR


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "values.yaml").read_text())


@pytest.mark.parametrize("stem", RAY_STEMS)
def test_ray_object_is_valid_against_its_crd(stem: str, crds: Path) -> None:
    problems = validate.validate_file(CLUSTER / "manifests" / f"{stem}.yaml", crds)
    assert problems == []


def _head_container(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


BROKEN = {
    "replicas is a string": lambda d: _worker(d).__setitem__("replicas", "4"),
    "unknown field in spec": lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", True),
    "unknown field in a worker group": lambda d: _worker(d).__setitem__("replica", 4),
    "missing groupName": lambda d: _worker(d).pop("groupName"),
    "missing head template": lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].pop("template"),
    "ttl beyond int32": lambda d: d["spec"].__setitem__("ttlSecondsAfterFinished", 2**31),
    "boolean as string": lambda d: d["spec"].__setitem__("shutdownAfterJobFinishes", "true"),
    "unknown container field": lambda d: _head_container(d).__setitem__("imagePullPolicyy", "Always"),
    "memory not a quantity": lambda d: _head_container(d)["resources"]["limits"].__setitem__("memory", "16 GB"),
    "duplicate container port": lambda d: _head_container(d)["ports"].append({"containerPort": 6379, "name": "x"}),
    "deletionStrategy half set (CEL)": lambda d: d["spec"].__setitem__("deletionStrategy", {"onSuccess": {"policy": "DeleteCluster"}}),
    "wrong apiVersion": lambda d: d.__setitem__("apiVersion", "ray.io/v2"),
    "missing metadata name": lambda d: d["metadata"].pop("name"),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_broken_rayjob_is_caught(breakage: str, crds: Path) -> None:
    doc = copy.deepcopy(manifest("rayjob"))
    BROKEN[breakage](doc)
    assert validate.validate_document(doc, crds), f"{breakage} passed validation"


@pytest.mark.parametrize("stem,breakage", [
    ("raycronjob", lambda d: d["spec"].pop("schedule")),
    ("raycronjob", lambda d: d["spec"]["jobTemplate"].__setitem__("entrypoint", ["distmerge"])),
    ("raycluster", lambda d: d["spec"]["workerGroupSpecs"][0].__setitem__("minReplicas", "4")),
    ("raycluster", lambda d: d["spec"].__setitem__("authOptions", {"mode": "password"})),
])
def test_broken_ray_objects_of_every_kind_are_caught(stem: str, breakage: Any, crds: Path) -> None:
    doc = copy.deepcopy(manifest(stem))
    breakage(doc)
    assert validate.validate_document(doc, crds)


@pytest.mark.parametrize("path,value", [("worker.gpu", 1), ("autoscaling.enabled", True)])
def test_variants_are_valid_against_the_crds(values: dict[str, Any], crds: Path, path: str, value: Any) -> None:
    docs = generate.render(_values_with(values, path, value), _config_text(values))
    for stem in RAY_STEMS:
        assert validate.validate_document(docs[stem], crds) == [], stem


@pytest.mark.parametrize("stem", RAY_STEMS)
def test_object_store_mode_ray_objects_are_valid_against_the_crds(stem: str, crds: Path) -> None:
    assert validate.validate_file(CLUSTER / "object-store" / "manifests" / f"{stem}.yaml", crds) == []
