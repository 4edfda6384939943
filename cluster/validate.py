"""Validate distmerge's manifests offline, the way the API server would on `kubectl apply`.

Why offline: a typo in a RayJob (a string where an integer goes, a field KubeRay does not
know) otherwise surfaces only on a real cluster, often after the image was built and
pushed. Two sources of truth, no network:

- KubeRay objects (RayJob, RayCronJob, RayCluster) against the CustomResourceDefinitions the
  operator installs: their ``openAPIV3Schema`` is translated into JSON Schema (Draft 7) with
  the Kubernetes extensions given their meaning (see ``crd_to_jsonschema``);
- core objects (PersistentVolumeClaim, ConfigMap, Pod, NetworkPolicy, and every pod template
  inside the Ray objects) against the Kubernetes OpenAPI schemas that the
  ``kubernetes-validate`` package ships, in their strict variant (unknown fields are errors).

The CRDs are not part of this repository: they are found in ``--crds``, else in the folder
named by $DISTMERGE_KUBERAY_CRDS, else in ../shared/kuberay-crds beside the repository. The
kuberay-operator Helm chart ships them under crds/ (``helm pull kuberay/kuberay-operator
--version 1.6.0 --untar`` leaves them in kuberay-operator/crds/).

Unknown fields are errors everywhere, as with ``kubectl apply --validate=strict`` (kubectl's
default): without it the API server silently drops them, which hides typos.

    python cluster/validate.py [--crds DIR] [FILES...]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema import Draft7Validator, ValidationError
from jsonschema.validators import extend

HERE = Path(__file__).resolve().parent
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml",
             "RayCluster": "ray.io_rayclusters.yaml"}
KUBERNETES_VERSION = "1.33"
CRDS_ENV = "DISTMERGE_KUBERAY_CRDS"
# Where a checkout beside a shared/ folder finds them without configuration.
SHARED_CRDS = HERE.parents[1] / "shared" / "kuberay-crds"
CRDS_HINT = (
    f"set {CRDS_ENV} to a folder holding {', '.join(CRD_FILES.values())} "
    "(the KubeRay Helm chart kuberay-operator ships them under crds/)")
CRDS_NOT_FOUND = f"KubeRay CRDs not found: {CRDS_HINT}"


class CRDsMissing(FileNotFoundError):
    """A Ray object cannot be validated: its CRD file is not where the CRDs were looked for."""


def find_crd_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """The folder of the KubeRay CRDs: $DISTMERGE_KUBERAY_CRDS if set (even if wrong, so a bad
    pointer fails loudly instead of silently skipping), else ../shared/kuberay-crds where it
    exists, else None."""
    pointed = (os.environ if environ is None else environ).get(CRDS_ENV)
    if pointed:
        return Path(pointed).expanduser()
    return SHARED_CRDS if SHARED_CRDS.is_dir() else None


def missing_crd_files(crd_dir: Path) -> list[str]:
    """The CRD files that ``crd_dir`` lacks; empty when every Ray kind can be validated."""
    return sorted(name for name in CRD_FILES.values() if not (Path(crd_dir) / name).is_file())

# The API server fills metadata of every object from ObjectMeta; a CRD schema leaves it open.
OBJECT_META: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "generateName": {"type": "string"},
    },
    "additionalProperties": False,
}

# CEL rules (x-kubernetes-validations) of these CRDs, evaluated in Python. A rule not listed
# here fails validation loudly rather than passing unchecked; transition rules (oldSelf)
# constrain updates only and hold on create.
CEL_RULES: dict[str, Callable[[Any], bool]] = {
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))":
        lambda s: not (("onSuccess" in s or "onFailure" in s) and "deletionRules" in s),
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))":
        lambda s: ("onSuccess" in s and "onFailure" in s) or "deletionRules" in s,
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))":
        lambda s: not ("jobStatus" in s and "jobDeploymentStatus" in s),
    "has(self.jobStatus) || has(self.jobDeploymentStatus)":
        lambda s: "jobStatus" in s or "jobDeploymentStatus" in s,
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']":
        lambda s: s in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"),
}


def crd_to_jsonschema(node: Any) -> Any:
    """Translate a structural CRD schema into plain JSON Schema.

    - ``x-kubernetes-int-or-string``: an integer or a string (a pattern then applies to strings);
    - ``x-kubernetes-preserve-unknown-fields``: unknown fields are kept, so allowed;
    - an object with ``properties`` and neither of those: unknown fields are rejected;
    - ``x-kubernetes-embedded-resource``: an object with apiVersion, kind and ObjectMeta;
    - ``nullable``: null is allowed too;
    - ``x-kubernetes-list-type``/``-validations`` stay as keywords checked by ``_VALIDATOR``;
    - ``x-kubernetes-map-type`` changes how updates merge, not what is valid.
    """
    if isinstance(node, list):
        return [crd_to_jsonschema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {k: crd_to_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = crd_to_jsonschema(value)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    elif node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props["metadata"] = OBJECT_META
        out["required"] = sorted({*out.get("required", []), "apiVersion", "kind"})
    if (node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in node):
        out["additionalProperties"] = False
    return out


def _list_type(validator: Any, list_type: str, instance: Any, schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    """x-kubernetes-list-type: "set" items are unique; "map" items are unique by their keys."""
    if not isinstance(instance, list):
        return
    if list_type == "set" and len({repr(x) for x in instance}) != len(instance):
        yield ValidationError("duplicate items in a list of type set")
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        props = (schema.get("items") or {}).get("properties", {})
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(item.get(k, props.get(k, {}).get("default")) for k in keys)
            if key in seen:
                yield ValidationError(f"duplicate entry for map keys {dict(zip(keys, key, strict=True))}")
            seen.add(key)


def _cel(validator: Any, rules: list[dict[str, Any]], instance: Any, schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    for rule in rules:
        text = rule["rule"]
        if "oldSelf" in text:
            continue
        check = CEL_RULES.get(text)
        if check is None:
            yield ValidationError(f"CEL rule not evaluated offline (add it to CEL_RULES): {text}")
        elif not check(instance):
            yield ValidationError(f"{rule.get('message', 'CEL rule failed')} ({text})")


_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("int32")
def _int32(value: Any) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _int64(value: Any) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


_VALIDATOR = extend(Draft7Validator, {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel})


@functools.cache
def crd_validator(crd_path: Path, version: str = "v1") -> Any:
    """A validator for the custom resources of one CRD file (kind, group/version pinned)."""
    crd = yaml.safe_load(Path(crd_path).read_text())
    try:
        raw = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    except StopIteration:
        raise ValueError(f"{crd_path}: no version {version}") from None
    schema = crd_to_jsonschema(raw)
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{version}"}
    schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"].pop("status", None)  # written by the operator, never by a manifest
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    _VALIDATOR.check_schema(schema)
    return _VALIDATOR(schema, format_checker=_FORMATS)


@functools.cache
def core_validator(schema_name: str, kubernetes_version: str = KUBERNETES_VERSION) -> Any:
    """A strict validator for one core Kubernetes schema shipped by ``kubernetes-validate``.

    ``schema_name`` is a file stem of its schema folder, e.g. ``podtemplatespec-v1``.
    """
    import kubernetes_validate.utils as kv
    from referencing import Registry, Resource

    folder = f"kubernetes-json-schema/v{kv.major_minor(_known_version(kubernetes_version))}.0-local-strict"
    schema = kv.schema_contents(f"{folder}/{schema_name}.json", kubernetes_version)
    definitions = kv.schema_contents(f"{folder}/_definitions.json", kubernetes_version)
    registry = Resource.from_contents(schema) @ (Resource.from_contents(definitions) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry, format_checker=_FORMATS)


def _known_version(wanted: str) -> str:
    import kubernetes_validate.utils as kv

    versions = [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(wanted)]
    if not versions:
        raise ValueError(f"kubernetes-validate has no schemas for Kubernetes {wanted}")
    return versions[-1]


def pod_templates(doc: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, template) of every pod template inside a Ray object: the head, the workers and
    the RayJob's submitter."""
    spec = doc.get("spec") or {}
    prefix = "spec"
    if doc.get("kind") == "RayCronJob":
        spec, prefix = spec.get("jobTemplate") or {}, "spec.jobTemplate"
    if doc.get("kind") in ("RayJob", "RayCronJob"):
        if "submitterPodTemplate" in spec:
            yield f"{prefix}.submitterPodTemplate", spec["submitterPodTemplate"]
        spec, prefix = spec.get("rayClusterSpec") or {}, f"{prefix}.rayClusterSpec"
    head = spec.get("headGroupSpec") or {}
    if "template" in head:
        yield f"{prefix}.headGroupSpec.template", head["template"]
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        if "template" in group:
            yield f"{prefix}.workerGroupSpecs[{i}].template", group["template"]


def _core_schema_name(doc: Mapping[str, Any]) -> str:
    group_version = str(doc.get("apiVersion", ""))
    group, _, version = group_version.rpartition("/")
    prefix = f"{group.split('.')[0]}-" if group else ""
    return f"{str(doc.get('kind', '')).lower()}-{prefix}{version}"


def _where(error: ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<root>"


def validate_pod_templates(doc: Mapping[str, Any]) -> list[str]:
    """Problems of the pod templates inside a Ray object, against the core PodTemplateSpec:
    the part of a Ray object that can be checked without its CRD."""
    validator = core_validator("podtemplatespec-v1")
    return [f"{where}.{_where(e)}: {e.message}"
            for where, template in pod_templates(doc) for e in validator.iter_errors(template)]


def validate_document(doc: Mapping[str, Any], crd_dir: Path | None) -> list[str]:
    """Every problem of one manifest, as 'path: message' lines; empty when it is valid.

    A Ray object needs ``crd_dir`` (raises CRDsMissing without it): skipping its CRD check
    silently would report a typo'd RayJob as valid.
    """
    if not isinstance(doc, Mapping) or "kind" not in doc:
        return ["<root>: not a Kubernetes object (no kind)"]
    kind = str(doc["kind"])
    if kind not in CRD_FILES:
        validator = core_validator(_core_schema_name(doc))
        return [f"{_where(e)}: {e.message}" for e in validator.iter_errors(doc)]
    if crd_dir is None:
        raise CRDsMissing(f"{kind}: {CRDS_NOT_FOUND}, or pass --crds DIR")
    path = Path(crd_dir) / CRD_FILES[kind]
    if not path.is_file():
        raise CRDsMissing(f"{path} missing: {CRDS_HINT}, or pass --crds DIR")
    problems = [f"{_where(e)}: {e.message}" for e in crd_validator(path).iter_errors(doc)]
    return problems + validate_pod_templates(doc)


def validate_file(path: Path, crd_dir: Path | None) -> list[str]:
    """Problems of every document of a YAML file, prefixed with the file and document kind."""
    problems = []
    for doc in yaml.safe_load_all(Path(path).read_text()):
        if doc is None:
            continue
        name = f"{path}: {doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"
        problems += [f"{name}: {p}" for p in validate_document(doc, crd_dir)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Validate manifests against KubeRay CRDs and Kubernetes schemas.")
    parser.add_argument("files", nargs="*", type=Path, help="YAML files (default: cluster/manifests/*.yaml)")
    parser.add_argument("--crds", type=Path, default=None,
                        help=f"folder of the KubeRay CRD files (default: ${CRDS_ENV}, else ../shared/kuberay-crds)")
    args = parser.parse_args(argv)
    files = args.files or sorted((HERE / "manifests").glob("*.yaml"))
    crd_dir = args.crds or find_crd_dir()
    try:
        problems = [p for f in files for p in validate_file(f, crd_dir)]
    except CRDsMissing as e:
        print(f"validate: error: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{len(files)} files, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
