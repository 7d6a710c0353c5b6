#!/usr/bin/env python3
"""Validate the Kubernetes manifests offline, without a cluster.

    python cluster/k8s/validate.py cluster/k8s/*.yaml [--k8s-version 1.30.0]

- core objects (Service, Job, Pod templates, ...): Kubernetes' own OpenAPI schemas for that version, strict
  (unknown fields are errors), from the `kubernetes-validate` package (its schemas ship with it: no network);
- RayJob (ray.io/v1): cluster/k8s/rayjob.schema.json (written from KubeRay's v1 API types: every spec field, its
  type, what is required, no unknown fields), and each of its pod templates (head, workers, submitter) as a core
  PodTemplate, strictly;
- semantic checks a schema cannot express: worker replicas within min/max, the rayStartParams resources match
  the container's limits, a GPU worker requests GPUs, the entrypoint joins the job's Ray cluster (--address auto).

Exit status 0 when every document passes, 1 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import yaml

SCHEMA = Path(__file__).resolve().parent / "rayjob.schema.json"


def _core(doc: dict, version: str) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = "/".join(str(p) for p in e.path)
        return [f"{path or '(top)'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no Kubernetes {version} schema for {doc.get('apiVersion')}/{doc.get('kind')}"]
    return []


def _pod_template(template: dict, version: str, where: str) -> list[str]:
    doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
    return [f"{where}: {e.removeprefix('template/')}" for e in _core(doc, version)]


def _rayjob(doc: dict, version: str) -> list[str]:
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    errors = [f"{'/'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
              for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]  # fmt: skip
    if errors:
        return errors
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec", {})
    if "submitterPodTemplate" in spec:
        errors += _pod_template(spec["submitterPodTemplate"], version, "spec/submitterPodTemplate")
    groups = [("spec/rayClusterSpec/headGroupSpec", cluster["headGroupSpec"])] if cluster else []
    groups += [(f"spec/rayClusterSpec/workerGroupSpecs/{i}", g) for i, g in enumerate(cluster.get("workerGroupSpecs", []))]
    for where, group in groups:
        errors += _pod_template(group["template"], version, f"{where}/template")
        params = group["rayStartParams"]
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        if "num-gpus" in params and int(params["num-gpus"]) > 0:
            gpu_limits = [k for k in limits if k.endswith("/gpu")]
            if not gpu_limits or int(limits[gpu_limits[0]]) != int(params["num-gpus"]):
                errors.append(f"{where}: rayStartParams num-gpus {params['num-gpus']} but the container's GPU "
                              f"limit is {[limits[k] for k in gpu_limits] or 'missing'}")  # fmt: skip
        if "replicas" in group and not group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]:
            errors.append(f"{where}: replicas {group['replicas']} outside [{group['minReplicas']}, {group['maxReplicas']}]")
    entry = shlex.split(spec.get("entrypoint", ""))
    if entry[:2] == ["cellseg-batch", "run"]:
        if "--address" not in entry or entry[entry.index("--address") + 1] != "auto":
            errors.append("spec/entrypoint: cellseg-batch run must join the job's cluster (--address auto)")
    return errors


def validate(path: Path, version: str) -> list[str]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        return [f"{path}: not YAML: {e}"]
    if not docs:
        return [f"{path}: no documents"]
    problems = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            problems.append(f"{path}[{i}]: not a Kubernetes object (no apiVersion/kind)")
            continue
        name = f"{path}[{i}] {doc['kind']} {doc.get('metadata', {}).get('name', '?')}"
        errors = _rayjob(doc, version) if doc["apiVersion"] == "ray.io/v1" else _core(doc, version)
        problems += [f"{name}: {e}" for e in errors]
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--k8s-version", default="1.30.0", help="Kubernetes version whose schemas apply (default 1.30.0)")
    args = p.parse_args(argv)
    problems = [msg for f in args.files for msg in validate(f, args.k8s_version)]
    for msg in problems:
        print(msg, file=sys.stderr)
    if not problems:
        print(f"{len(args.files)} file(s) valid for Kubernetes {args.k8s_version} (+ KubeRay ray.io/v1 RayJob)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
