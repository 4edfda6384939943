"""The KubeRay manifests: generated from one source, valid against the real schemas, consistent.

Schema validity is checked offline against the KubeRay CRDs (shared/kuberay-crds, as the
operator installs them) and the Kubernetes OpenAPI schemas of kubernetes-validate, with
unknown fields as errors, so a typo fails here and not on a cluster after an image push.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRDS = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"


def _load(name: str) -> ModuleType:
    """cluster/ is scripts, not a package: load a module from its file."""
    spec = importlib.util.spec_from_file_location(f"distmerge_cluster_{name}", CLUSTER / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


generate = _load("generate")
validate = _load("validate")


@pytest.fixture(scope="module")
def crds() -> Path:
    for name in validate.CRD_FILES.values():
        if not (CRDS / name).is_file():
            pytest.fail(f"{CRDS / name} missing: the KubeRay CRDs are expected in shared/kuberay-crds/ "
                        "beside the repository (../shared/kuberay-crds from its root)")
    return CRDS


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "values.yaml").read_text())


def manifest(stem: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "manifests" / f"{stem}.yaml").read_text())


def test_committed_manifests_equal_the_generator_output() -> None:
    files = generate.render_files(CLUSTER / "values.yaml")
    on_disk = {p.name for p in (CLUSTER / "manifests").iterdir()}
    assert on_disk == set(files), "run: python cluster/generate.py"
    for name, text in files.items():
        assert (CLUSTER / "manifests" / name).read_text() == text, f"{name} is stale: run python cluster/generate.py"
    assert {f"{m}.yaml" for m in ("rayjob", "raycronjob", "raycluster", "pvc", "configmap")} <= set(files)
    assert generate.main(["--check"]) == 0


@pytest.mark.parametrize("stem", generate.MANIFESTS)
def test_manifest_is_valid_against_its_schema(stem: str, crds: Path) -> None:
    problems = validate.validate_file(CLUSTER / "manifests" / f"{stem}.yaml", crds)
    assert problems == []


def _worker(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


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
    ("pvc", lambda d: d["spec"].__setitem__("accessModes", "ReadWriteMany")),
    ("pvc", lambda d: d["spec"].__setitem__("size", "1Ti")),
    ("configmap", lambda d: d["data"].__setitem__("merge.yml", 3)),
    ("loader", lambda d: d["spec"]["containers"][0].pop("name")),
])
def test_broken_manifests_of_every_kind_are_caught(stem: str, breakage: Any, crds: Path) -> None:
    doc = copy.deepcopy(manifest(stem))
    breakage(doc)
    assert validate.validate_document(doc, crds)


def test_crd_shim_gives_kubernetes_extensions_their_meaning() -> None:
    schema = validate.crd_to_jsonschema({
        "type": "object",
        "properties": {
            "q": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True,
                  "pattern": "^[0-9]+Gi$"},
            "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
            "n": {"type": "string", "nullable": True},
        },
    })
    v = validate._VALIDATOR(schema, format_checker=validate._FORMATS)
    assert v.is_valid({"q": 4, "open": {"anything": [1]}, "closed": {"a": "x"}, "map": {"k": "v"}, "n": None})
    assert v.is_valid({"q": "4Gi"})
    assert not v.is_valid({"q": "4 GB"})
    assert not v.is_valid({"q": 4.5})
    assert not v.is_valid({"closed": {"b": "x"}})
    assert not v.is_valid({"map": {"k": 1}})
    assert not v.is_valid({"extra": 1})
    embedded = validate._VALIDATOR(validate.crd_to_jsonschema(
        {"type": "object", "x-kubernetes-embedded-resource": True, "x-kubernetes-preserve-unknown-fields": True}))
    assert embedded.is_valid({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}})
    assert not embedded.is_valid({"metadata": {"name": "p"}})
    unknown_cel = validate._VALIDATOR(validate.crd_to_jsonschema(
        {"type": "string", "x-kubernetes-validations": [{"rule": "self.size() > 3"}]}))
    assert not unknown_cel.is_valid("abcd"), "an unknown CEL rule must not pass unchecked"


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [t["spec"] for _, t in validate.pod_templates(doc)]


def test_every_ray_pod_mounts_models_config_and_shm_alike(values: dict[str, Any]) -> None:
    docs = [manifest("rayjob"), manifest("raycronjob"), manifest("raycluster")]
    mount = values["storage"]["mountPath"]
    for doc in docs:
        specs = _pod_specs(doc)
        assert len(specs) == 2
        for spec in specs:
            volumes = {v["name"]: v for v in spec["volumes"]}
            mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
            assert volumes["models"]["persistentVolumeClaim"]["claimName"] == values["storage"]["pvcName"]
            assert mounts["models"] == mount
            assert volumes["merge-config"]["configMap"]["name"] == values["merge"]["configMapName"]
            assert mounts["merge-config"] == values["merge"]["configMountPath"]
            assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": values["shmSize"]}
            assert mounts["dshm"] == "/dev/shm"
            resources = spec["containers"][0]["resources"]
            assert resources["requests"] == resources["limits"] and {"cpu", "memory"} <= set(resources["limits"])
    # One cluster shape for all three objects.
    assert docs[0]["spec"]["rayClusterSpec"] == docs[1]["spec"]["jobTemplate"]["rayClusterSpec"] == docs[2]["spec"]


def test_object_store_fits_shm_and_memory_holds_the_workers(values: dict[str, Any]) -> None:
    job = manifest("rayjob")["spec"]["rayClusterSpec"]
    shm = generate.quantity(values["shmSize"], "shmSize")
    for params in (job["headGroupSpec"]["rayStartParams"], _worker({"spec": {"rayClusterSpec": job}})["rayStartParams"]):
        assert int(params["object-store-memory"]) <= shm
    worker = _worker({"spec": {"rayClusterSpec": job}})
    cpus = int(worker["rayStartParams"]["num-cpus"])
    memory = generate.quantity(worker["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"], "m")
    shard = generate.size_bytes(values["merge"]["shardSize"], "shard")
    peak = cpus * (shard + 500 * 1000**2) + int(worker["rayStartParams"]["object-store-memory"])
    assert peak + generate.quantity(values["headroom"], "headroom") <= memory
    assert job["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert worker["replicas"] == worker["minReplicas"] == worker["maxReplicas"] == values["worker"]["replicas"]


def test_entrypoints_run_the_mounted_config_and_the_cron_writes_by_fingerprint(values: dict[str, Any]) -> None:
    from distmerge.config import parse_config

    job, cron = manifest("rayjob")["spec"], manifest("raycronjob")["spec"]
    config_path = f"{values['merge']['configMountPath']}/merge.yml"
    assert shlex.split(job["entrypoint"])[:4] == ["distmerge", "merge", config_path, values["merge"]["outputPath"]]
    assert shlex.split(cron["jobTemplate"]["entrypoint"])[3] == values["merge"]["cronOutputPath"]
    assert "{fingerprint}" in cron["jobTemplate"]["entrypoint"]
    assert cron["schedule"] == values["merge"]["schedule"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    for spec in (job, cron["jobTemplate"]):
        assert set(yaml.safe_load(spec["runtimeEnvYAML"])) == {"env_vars"}
    text = manifest("configmap")["data"]["merge.yml"]
    assert text == (CLUSTER / values["merge"]["configFile"]).read_text()
    parse_config(yaml.safe_load(text))  # the shipped config is one distmerge accepts


def test_submit_script_ships_no_code_and_runs_the_rayjob_command(values: dict[str, Any]) -> None:
    script = (CLUSTER / "manifests" / "submit.sh").read_text()
    submit = script[script.index("ray job submit"):]
    assert "working_dir" not in submit and "--working-dir" not in submit
    env = json.loads(re.search(r"--runtime-env-json '([^']+)'", submit).group(1))
    assert set(env) == {"env_vars"}
    assert "TOKENIZERS_PARALLELISM" not in env["env_vars"], "distmerge's ray.init sets it; Ray rejects the clash"
    assert f"-- {manifest('rayjob')['spec']['entrypoint']}" in submit
    assert f"svc/{values['name']}-head-svc" in script


def test_readme_shows_the_generated_submit_command() -> None:
    readme = (CLUSTER / "README.md").read_text()
    assert f"--runtime-env-json {shlex.quote(generate.runtime_env_json())}" in readme
    for needle in ("helm install", "kuberay-operator", "RayCronJob", "{fingerprint}", "ray job submit",
                   "excludes", "python cluster/generate.py", "kubectl apply"):
        assert needle in readme, needle


def test_dockerfile_pins_the_ray_of_pyproject_and_values(values: dict[str, Any]) -> None:
    import ray
    from packaging.requirements import Requirement

    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    assert re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311(-cpu|-gpu)?", base), base
    version = base.split(":")[1].split("-")[0]
    assert version == values["rayVersion"] == ray.__version__
    assert re.search(rf"^ARG RAY_VERSION={re.escape(version)}$", dockerfile, re.M)
    pyproject = (REPO / "pyproject.toml").read_text()
    spec = next(Requirement(r) for r in re.findall(r'"(ray\[[^"]+)"', pyproject))
    assert spec.specifier.contains(version)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.M)
    assert "ARG TORCH_VARIANT=cpu" in dockerfile and "pip install" in dockerfile
    ignore = [line for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*" and "**/*.safetensors" in ignore  # no weights in the build context


def _values_with(values: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(values)
    node = changed
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return changed


@pytest.mark.parametrize("path,value,message", [
    ("worker.memory", "4Gi", "worker.memory"),
    ("worker.objectStoreMemory", "8Gi", "shmSize"),
    ("merge.outputPath", "/tmp/out", "shared volume"),
    ("merge.cronOutputPath", "/models/merged/nightly", "{fingerprint}"),
    ("merge.shardSize", "2 bananas", "merge.shardSize"),
    ("worker.replicas", "4", "worker.replicas"),
    ("name", "Distmerge_1", "DNS-1123"),
])
def test_generator_refuses_values_that_cannot_work(values: dict[str, Any], path: str, value: Any,
                                                   message: str) -> None:
    config = (CLUSTER / values["merge"]["configFile"]).read_text()
    with pytest.raises(generate.ValuesError, match=re.escape(message)):
        generate.render(_values_with(values, path, value), config)


def test_generator_refuses_models_outside_the_shared_volume(values: dict[str, Any]) -> None:
    config = (CLUSTER / values["merge"]["configFile"]).read_text().replace("/models/llama-3.1-70b-math", "/home/me/math")
    with pytest.raises(generate.ValuesError, match="models\\[0\\]"):
        generate.render(values, config)


def test_workers_per_pod_follow_the_sizing_rule() -> None:
    gb = 1000**3
    # 16 CPUs, 64 GB: 2 GB shards fit (64 - 2 - 4) / 2.5 = 23 -> CPU-bound at 16.
    assert generate.workers_per_pod(16, 64 * gb, 2 * gb, 4 * gb, 2 * gb) == 16
    # 16 CPUs, 32 GB: (32 - 2 - 4) / 2.5 = 10 -> memory-bound at 10.
    assert generate.workers_per_pod(16, 32 * gb, 2 * gb, 4 * gb, 2 * gb) == 10
    assert generate.workers_per_pod(16, 6 * gb, 2 * gb, 4 * gb, 2 * gb) == 0


def test_gpu_workers_request_gpus(values: dict[str, Any], crds: Path) -> None:
    config = (CLUSTER / values["merge"]["configFile"]).read_text()
    docs = generate.render(_values_with(values, "worker.gpu", 1), config)
    worker = docs["rayjob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["rayStartParams"]["num-gpus"] == "1"
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert validate.validate_document(docs["rayjob"], crds) == []
