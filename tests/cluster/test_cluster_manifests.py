"""The KubeRay manifests: generated from one source, valid against the real schemas, consistent.

Schema validity is checked offline against the Kubernetes OpenAPI schemas of
kubernetes-validate, with unknown fields as errors, so a typo fails here and not on a cluster
after an image push; test_cluster_crds.py checks the Ray objects against the KubeRay CRDs,
which are not in the repository. Everything here runs in any checkout.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"


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
def values() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "values.yaml").read_text())


def manifest(stem: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "manifests" / f"{stem}.yaml").read_text())


def documents(stem: str) -> list[dict[str, Any]]:
    """Every document of a manifest file (networkpolicy.yaml holds several)."""
    return [d for d in yaml.safe_load_all((CLUSTER / "manifests" / f"{stem}.yaml").read_text()) if d]


def _config_text(values: dict[str, Any]) -> str:
    return (CLUSTER / values["merge"]["configFile"]).read_text()


RAY_STEMS = ("rayjob", "raycronjob", "raycluster")
CORE_STEMS = tuple(stem for stem in generate.MANIFESTS if stem not in RAY_STEMS)


def test_committed_manifests_equal_the_generator_output() -> None:
    files = generate.render_files(CLUSTER / "values.yaml")
    on_disk = {p.name for p in (CLUSTER / "manifests").iterdir()}
    assert on_disk == set(files), "run: python cluster/generate.py"
    for name, text in files.items():
        assert (CLUSTER / "manifests" / name).read_text() == text, f"{name} is stale: run python cluster/generate.py"
    assert {f"{m}.yaml" for m in generate.MANIFESTS} <= set(files)
    assert generate.main(["--check"]) == 0


@pytest.mark.parametrize("stem", CORE_STEMS)
def test_core_manifest_is_valid_against_the_kubernetes_schema(stem: str) -> None:
    """No CRD needed: these run in any checkout."""
    problems = validate.validate_file(CLUSTER / "manifests" / f"{stem}.yaml", None)
    assert problems == []


@pytest.mark.parametrize("stem", RAY_STEMS)
def test_ray_object_pod_templates_are_valid_kubernetes_pod_templates(stem: str) -> None:
    """The part of a Ray object that the core schemas cover, checked even without the CRDs."""
    doc = manifest(stem)
    assert list(validate.pod_templates(doc))
    assert validate.validate_pod_templates(doc) == []


def test_ray_objects_are_not_passed_unchecked_without_crds(tmp_path: Path) -> None:
    with pytest.raises(validate.CRDsMissing, match=validate.CRDS_ENV):
        validate.validate_document(manifest("rayjob"), None)
    with pytest.raises(validate.CRDsMissing, match="ray.io_rayjobs.yaml missing"):
        validate.validate_document(manifest("rayjob"), tmp_path)
    assert validate.main(["--crds", str(tmp_path), str(CLUSTER / "manifests" / "rayjob.yaml")]) == 2
    assert validate.main(["--crds", str(tmp_path), str(CLUSTER / "manifests" / "networkpolicy.yaml")]) == 0


def test_crds_are_found_where_the_user_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert validate.find_crd_dir({validate.CRDS_ENV: str(tmp_path)}) == tmp_path
    # A named folder is returned even when wrong, so the CRD tests fail rather than skip.
    assert validate.find_crd_dir({validate.CRDS_ENV: str(tmp_path / "nope")}) == tmp_path / "nope"
    monkeypatch.setattr(validate, "SHARED_CRDS", tmp_path / "shared" / "kuberay-crds")
    assert validate.find_crd_dir({}) is None
    (tmp_path / "shared" / "kuberay-crds").mkdir(parents=True)
    assert validate.find_crd_dir({}) == tmp_path / "shared" / "kuberay-crds"
    assert validate.find_crd_dir({validate.CRDS_ENV: str(tmp_path)}) == tmp_path  # the variable wins
    assert validate.missing_crd_files(tmp_path) == sorted(validate.CRD_FILES.values())
    for name in validate.CRD_FILES.values():
        (tmp_path / name).write_text("kind: CustomResourceDefinition\n")
    assert validate.missing_crd_files(tmp_path) == []
    assert "DISTMERGE_KUBERAY_CRDS" in validate.CRDS_NOT_FOUND and "crds/" in validate.CRDS_NOT_FOUND


def _worker(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


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


def _ray_pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The head's and the workers' pod specs (not the submitter's)."""
    return [t["spec"] for where, t in validate.pod_templates(doc) if "submitterPodTemplate" not in where]


def _without_cluster_label(spec: dict[str, Any]) -> dict[str, Any]:
    """A cluster spec with its pods' per-object label blanked, to compare the shapes."""
    spec = copy.deepcopy(spec)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        group["template"]["metadata"]["labels"].pop(generate.RAY_CLUSTER_LABEL)
    return spec


def test_every_ray_pod_mounts_models_config_and_shm_alike(values: dict[str, Any]) -> None:
    docs = [manifest("rayjob"), manifest("raycronjob"), manifest("raycluster")]
    mount = values["storage"]["mountPath"]
    for doc in docs:
        specs = _ray_pod_specs(doc)
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
    # One cluster shape for all three objects; only the label naming the object differs.
    shapes = [docs[0]["spec"]["rayClusterSpec"], docs[1]["spec"]["jobTemplate"]["rayClusterSpec"], docs[2]["spec"]]
    assert _without_cluster_label(shapes[0]) == _without_cluster_label(shapes[1]) == _without_cluster_label(shapes[2])
    for doc, shape in zip(docs, shapes, strict=True):
        for template in (shape["headGroupSpec"]["template"], shape["workerGroupSpecs"][0]["template"]):
            assert template["metadata"]["labels"][generate.RAY_CLUSTER_LABEL] == doc["metadata"]["name"]


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
    assert "TOKENIZERS_PARALLELISM" not in env["env_vars"], "the image sets it"
    assert f"-- {manifest('rayjob')['spec']['entrypoint']}" in submit
    assert f"svc/{values['name']}-head-svc" in script


def test_readme_shows_the_generated_submit_command() -> None:
    readme = (CLUSTER / "README.md").read_text()
    assert f"--runtime-env-json {shlex.quote(generate.runtime_env_json())}" in readme
    for needle in ("helm install", "kuberay-operator", "RayCronJob", "{fingerprint}", "ray job submit",
                   "excludes", "python cluster/generate.py", "kubectl apply", "networkpolicy.yaml",
                   validate.CRDS_ENV, "crds/", "runAsNonRoot", "readOnlyRootFilesystem",
                   "automountServiceAccountToken", generate.RAY_CLUSTER_LABEL):
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
    ("security.runAsUser", 0, "security.runAsUser: 0 is root"),
    ("security.runAsGroup", 0, "security.runAsGroup: 0 is root"),
    ("security.fsGroup", 0, "security.fsGroup: 0 is root"),
    ("security.runAsUser", "1000", "numeric id"),
    ("security.runAsUser", True, "numeric id"),
    ("security.runAsUser", -1, "numeric id"),
    ("security.allowRoot", "yes", "security.allowRoot"),
    ("security.automountServiceAccountToken", "false", "security.automountServiceAccountToken"),
    ("autoscaling.enabled", "no", "autoscaling.enabled"),
    ("autoscaling.minWorkers", 9, "autoscaling.minWorkers"),
    ("networkPolicy.clients", {"podSelector": {"matchLabels": {"a": "b"}}}, "a list"),
    ("networkPolicy.clients", [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "no ipBlock"),
    ("networkPolicy.clients", [{}], "no ipBlock"),
    ("networkPolicy.clients", [{"podSelector": {}}], "empty selector"),
    ("networkPolicy.clients", [{"namespaceSelector": {"matchLabels": {}}}], "empty selector"),
    ("networkPolicy.clients", [{"podSelector": {"matchExpressions": [
        {"key": "app", "operator": "NotIn", "values": ["x"]}]}}], "empty selector"),
    ("networkPolicy.clients", [{"podSelector": {"matchLabels": {"app": 1}}}], "string value"),
    ("networkPolicy.clients", [{"podSelector": {"app": "x"}}], "only matchLabels"),
    ("networkPolicy.operator", {"namespace": "kuberay-system", "podLabels": {}}, "podLabels"),
    ("networkPolicy.operator", {"namespace": "Kube_Ray", "podLabels": {"a": "b"}}, "namespace"),
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


def test_gpu_workers_request_gpus(values: dict[str, Any]) -> None:
    docs = generate.render(_values_with(values, "worker.gpu", 1), _config_text(values))
    worker = docs["rayjob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["rayStartParams"]["num-gpus"] == "1"
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert validate.validate_pod_templates(docs["rayjob"]) == []


# Pod security: every pod of every manifest, found by shape, so a new pod template is checked too.

def pod_specs_anywhere(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, PodSpec) of every mapping with a list of containers, wherever it sits in a document."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield where or "<root>", node
        for key, value in node.items():
            yield from pod_specs_anywhere(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from pod_specs_anywhere(item, f"{where}[{i}]")


def _as_documents(rendered: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Stem -> its documents, whether a manifest renders as one object or a list."""
    return {stem: obj if isinstance(obj, list) else [obj] for stem, obj in rendered.items()}


def security_problems(where: str, spec: dict[str, Any], values: dict[str, Any], token: bool) -> list[str]:
    """What a pod spec lacks of the settings every pod must have (empty when it has them all)."""
    security = values["security"]
    want_pod = {"runAsNonRoot": True, "runAsUser": security["runAsUser"], "runAsGroup": security["runAsGroup"],
                "fsGroup": security["fsGroup"], "seccompProfile": {"type": "RuntimeDefault"}}
    pod = spec.get("securityContext") or {}
    problems = [f"{where}: securityContext.{k} is {pod.get(k)!r}, not {v!r}"
                for k, v in want_pod.items() if pod.get(k) != v]
    if spec.get("automountServiceAccountToken") is not token:
        problems.append(f"{where}: automountServiceAccountToken is {spec.get('automountServiceAccountToken')!r}")
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        problems.append(f"{where}: shares a host namespace")
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(kind) or []:
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}.{kind}[{c['name']}]: allowPrivilegeEscalation is not false")
            if (sc.get("capabilities") or {}).get("drop") != ["ALL"] or (sc.get("capabilities") or {}).get("add"):
                problems.append(f"{where}.{kind}[{c['name']}]: capabilities are not drop [ALL]")
            if sc.get("privileged") or sc.get("runAsUser") == 0 or sc.get("runAsNonRoot") is False:
                problems.append(f"{where}.{kind}[{c['name']}]: overrides the pod's non-root settings")
    return problems


# Pod specs per manifest: head + workers (+ the RayJob's submitter), the loader. A count that
# changes means a pod template was added or lost: update this with the generator.
POD_SPECS = {"rayjob": 3, "raycronjob": 3, "raycluster": 2, "loader": 1}


def test_pod_walk_finds_pod_templates_anywhere() -> None:
    batch_cron = {"kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template": {"spec": {
        "containers": [{"name": "x"}]}}}}}}
    assert [w for w, _ in pod_specs_anywhere(batch_cron)] == ["spec.jobTemplate.spec.template.spec"]
    assert [w for w, _ in pod_specs_anywhere({"spec": {"containers": []}})] == ["spec"]
    bare = {"spec": {"containers": [{"name": "x"}]}}
    assert security_problems("spec", bare["spec"], {"security": {"runAsUser": 1000, "runAsGroup": 100,
                                                                 "fsGroup": 100}}, False)


@pytest.mark.parametrize("variant", ["committed", "autoscaling", "gpu"])
def test_every_pod_runs_as_the_image_user_without_privileges(values: dict[str, Any], variant: str) -> None:
    if variant == "committed":
        docs = {stem: documents(stem) for stem in generate.MANIFESTS}
    else:
        path, value = {"autoscaling": ("autoscaling.enabled", True), "gpu": ("worker.gpu", 1)}[variant]
        values = _values_with(values, path, value)
        docs = _as_documents(generate.render(values, _config_text(values)))
    assert values["security"] == {"runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100, "allowRoot": False,
                                  "automountServiceAccountToken": False}
    found = {stem: [w_spec for doc in stem_docs for w_spec in pod_specs_anywhere(doc)]
             for stem, stem_docs in docs.items()}
    assert {stem: len(specs) for stem, specs in found.items() if specs} == POD_SPECS
    problems = []
    for stem, specs in found.items():
        for where, spec in specs:
            # Only the autoscaler (a sidecar in the head) needs the Kubernetes API.
            token = variant == "autoscaling" and "headGroupSpec" in where
            problems += security_problems(f"{stem}: {where}", spec, values, token)
    assert problems == []
    for stem in RAY_STEMS:  # every pod spec found is one that validate.py checks against the core schema
        assert {f"{w}.spec" for w, _ in validate.pod_templates(docs[stem][0])} == {w for w, _ in found[stem]}


def test_autoscaler_gets_its_token_and_the_hardened_sidecar(values: dict[str, Any]) -> None:
    changed = _values_with(_values_with(values, "autoscaling.enabled", True), "autoscaling.minWorkers", 2)
    docs = generate.render(changed, _config_text(values))
    for spec in (docs["rayjob"]["spec"]["rayClusterSpec"], docs["raycluster"]["spec"]):
        assert spec["enableInTreeAutoscaling"] is True
        # KubeRay copies no securityContext into the autoscaler sidecar it injects.
        assert spec["autoscalerOptions"]["securityContext"] == generate.container_security_context()
        worker = spec["workerGroupSpecs"][0]
        assert (worker["minReplicas"], worker["maxReplicas"]) == (2, values["worker"]["replicas"])
        assert spec["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True
        assert worker["template"]["spec"]["automountServiceAccountToken"] is False
    assert "enableInTreeAutoscaling" not in manifest("raycluster")["spec"]


def test_root_only_when_explicitly_allowed(values: dict[str, Any]) -> None:
    changed = _values_with(_values_with(values, "security.allowRoot", True), "security.runAsUser", 0)
    docs = generate.render(changed, _config_text(values))
    context = docs["loader"]["spec"]["securityContext"]
    assert context["runAsUser"] == 0 and context["runAsNonRoot"] is False  # else the kubelet refuses it


def test_submitter_is_kuberays_with_our_hardening(values: dict[str, Any]) -> None:
    for spec in (manifest("rayjob")["spec"], manifest("raycronjob")["spec"]["jobTemplate"]):
        pod = spec["submitterPodTemplate"]["spec"]
        container = pod["containers"][0]
        assert container["name"] == "ray-job-submitter" and container["image"] == values["image"]
        assert "command" not in container, "KubeRay fills in `ray job submit` only when there is no command"
        assert pod["restartPolicy"] == "Never"
        assert "volumes" not in pod  # it talks HTTP to the dashboard and needs no data


# NetworkPolicy: evaluated on the pods KubeRay would create from the templates, with its labels.

NAMESPACE_LABEL = "kubernetes.io/metadata.name"


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics (an empty selector matches everything)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        has, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": has and value in e.get("values", []), "NotIn": not has or value not in e.get("values", []),
              "Exists": has, "DoesNotExist": not has}[e["operator"]]
        if not ok:
            return False
    return True


def _admits(policy: dict[str, Any], peer: tuple[str, dict[str, str]], port: int) -> bool:
    """Whether one NetworkPolicy lets `peer` (namespace, labels) connect to TCP `port` of a pod it selects."""
    namespace, labels = peer
    for rule in policy["spec"].get("ingress") or []:
        ports = rule.get("ports")
        if ports and not any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports):
            continue
        if not rule.get("from"):
            return True  # no `from`: every source
        for source in rule["from"]:
            assert "ipBlock" not in source
            ns_selector = source.get("namespaceSelector")
            in_namespace = (namespace == policy["metadata"]["namespace"] if ns_selector is None
                            else _matches(ns_selector, {NAMESPACE_LABEL: namespace}))
            if in_namespace and _matches(source.get("podSelector") or {}, labels):
                return True
    return False


def _kuberay_pods(doc: dict[str, Any], namespace: str) -> dict[tuple[str, str], tuple[str, dict[str, str]]]:
    """(object, role) -> (namespace, labels) of the pods KubeRay creates for one Ray object.

    As KubeRay's labelPod: its labels first, the template's over them, except ray.io/cluster,
    ray.io/node-type and ray.io/group; a RayJob's cluster is named `<job>-<random>`. The
    submitter gets ray.io/originated-from-* on top of its template's labels.
    """
    name = doc["metadata"]["name"]
    cluster = name if doc["kind"] == "RayCluster" else f"{name}-x7k2p"
    pods = {}
    for where, template in validate.pod_templates(doc):
        labels = dict(template["metadata"]["labels"])
        if "submitterPodTemplate" in where:
            labels.update({"ray.io/originated-from-cr-name": f"{name}-29412345",
                           "ray.io/originated-from-crd": "RayJob", "app.kubernetes.io/created-by": "kuberay-operator"})
            pods[(name, "submitter")] = (namespace, labels)
            continue
        node_type = "head" if "headGroupSpec" in where else "worker"
        fixed = {"ray.io/cluster": cluster, "ray.io/node-type": node_type,
                 "ray.io/group": "headgroup" if node_type == "head" else "merge-workers"}
        base = {"ray.io/is-ray-node": "yes", "app.kubernetes.io/name": "kuberay",
                "app.kubernetes.io/created-by": "kuberay-operator", "ray.io/identifier": f"{cluster}-{node_type}"}
        pods[(name, node_type)] = (namespace, {**base, **labels, **fixed})
    return pods


def _pod_catalogue(rendered: dict[str, Any], values: dict[str, Any]) -> dict[tuple[str, str], tuple[str, dict[str, str]]]:
    ns = values["namespace"]
    pods = {}
    for stem in RAY_STEMS:
        pods.update(_kuberay_pods(rendered[stem], ns))
    pods[("loader", "pod")] = (ns, rendered["loader"]["metadata"]["labels"])
    pods[("other", "same-namespace")] = (ns, {"app": "notebook"})
    pods[("other", "forged-operator")] = (ns, {"app.kubernetes.io/name": "kuberay-operator"})
    pods[("operator", "pod")] = ("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator",
                                                    "app.kubernetes.io/instance": "kuberay-operator"})
    pods[("client", "labelled")] = ("ml-notebooks", {"app": "ray-client"})
    pods[("client", "unlabelled")] = ("ml-notebooks", {"app": "other"})
    pods[("client", "wrong-namespace")] = (ns, {"app": "ray-client"})
    return pods


PROBE_PORTS = (6379, 8265, 10001, 52365, 23456)  # GCS, dashboard, client, agent, a worker's port
CLIENT = [{"namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: "ml-notebooks"}},
           "podSelector": {"matchLabels": {"app": "ray-client"}}}]


@pytest.mark.parametrize("clients", [[], CLIENT], ids=["default", "with-client"])
def test_network_policy_admits_only_the_intended_peers(values: dict[str, Any], clients: list[Any]) -> None:
    if clients:
        values = _values_with(values, "networkPolicy.clients", clients)
        rendered: dict[str, Any] = generate.render(values, _config_text(values))
    else:
        rendered = {stem: manifest(stem) for stem in generate.MANIFESTS if stem != "networkpolicy"}
        rendered["networkpolicy"] = documents("networkpolicy")
    pods = _pod_catalogue(rendered, values)
    policies = rendered["networkpolicy"]
    assert [validate.validate_document(p, None) for p in policies] == [[]] * len(policies)
    names = generate.ray_object_names(values)
    assert [p["metadata"]["name"] for p in policies] == [f"{names[s]}-ray" for s in RAY_STEMS]
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), "a rule without `from` admits every source"
            for source in rule["from"]:
                assert set(source) <= {"podSelector", "namespaceSelector"}
                assert all(sel.get("matchLabels") for sel in source.values()), "an empty selector admits all"
    selected_by = {key: [p["metadata"]["name"] for p in policies
                         if pod[0] == p["metadata"]["namespace"] and _matches(p["spec"]["podSelector"], pod[1])]
                   for key, pod in pods.items()}
    for key, selecting in selected_by.items():  # each Ray pod by exactly its object's policy, nothing else
        expected = [f"{key[0]}-ray"] if key[1] in ("head", "worker") else []
        assert selecting == expected, key
    for stem in RAY_STEMS:
        obj = names[stem]
        policy = next(p for p in policies if p["metadata"]["name"] == f"{obj}-ray")
        for peer_key, port in itertools.product(pods, PROBE_PORTS):
            admitted = _admits(policy, pods[peer_key], port)
            if peer_key[0] == obj and peer_key[1] in ("head", "worker"):
                expected = True  # the Ray pods of the same cluster: every port
            elif peer_key == (obj, "submitter") or (peer_key == ("operator", "pod") and stem != "raycluster"):
                expected = port == 8265  # job submission and status: the dashboard only
            elif peer_key == ("client", "labelled") and clients:
                expected = port in (8265, 10001)
            else:
                expected = False
            assert admitted == expected, (obj, peer_key, port)


@pytest.mark.parametrize("stem,breakage", [
    ("pvc", lambda d: d["spec"].__setitem__("accessModes", "ReadWriteMany")),
    ("pvc", lambda d: d["spec"].__setitem__("size", "1Ti")),
    ("configmap", lambda d: d["data"].__setitem__("merge.yml", 3)),
    ("loader", lambda d: d["spec"]["containers"][0].pop("name")),
    ("loader", lambda d: d["spec"]["securityContext"].__setitem__("runAsNonRoot", "true")),
    ("networkpolicy", lambda d: d["spec"].__setitem__("policyTypes", "Ingress")),
    ("networkpolicy", lambda d: d["spec"].__setitem__("ingres", [])),
    ("networkpolicy", lambda d: d["spec"]["ingress"][1]["ports"][0].__setitem__("protocol", 6)),
    ("networkpolicy", lambda d: d["spec"]["podSelector"].__setitem__("matchLabel", {})),
])
def test_broken_core_manifests_are_caught(stem: str, breakage: Any) -> None:
    doc = copy.deepcopy(documents(stem)[0])
    breakage(doc)
    assert validate.validate_document(doc, None)
