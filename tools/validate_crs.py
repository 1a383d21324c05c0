"""Validate the custom resources of rendered manifests against their CRDs' schemas, offline.

    python tools/validate_crs.py RENDERED.yaml [RENDERED.yaml ...] [--crds deploy/k8s/crds]

kubernetes-validate knows the built-in kinds only; the Inference Extension's and Gateway API's resources
(InferencePool, InferenceObjective, HTTPRoute, ...) are checked here against the `openAPIV3Schema` of the CRD
files kept in deploy/k8s/crds (copied unchanged from upstream; nothing is fetched). A custom resource whose
CRD is not there fails, unless its kind is listed as known-unvalidated (ServiceMonitor: prometheus-operator's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jsonschema
import yaml

UNVALIDATED = {("monitoring.coreos.com", "ServiceMonitor")}
BUILTIN_GROUPS = {"", "apps", "batch", "policy", "autoscaling", "networking.k8s.io", "rbac.authorization.k8s.io"}


def load_crds(folder: Path) -> dict[tuple[str, str, str], dict]:
    """(group, version, kind) -> the version's openAPIV3Schema."""
    schemas = {}
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                schemas[(spec["group"], version["name"], spec["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return schemas


def check(rendered: Path, schemas: dict) -> list[str]:
    problems = []
    for doc in yaml.safe_load_all(rendered.read_text()):
        if not doc:
            continue
        group, _, version = doc.get("apiVersion", "").rpartition("/")
        kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
        if group in BUILTIN_GROUPS or (group, kind) in UNVALIDATED:
            continue
        schema = schemas.get((group, version, kind))
        if schema is None:
            problems.append(f"{rendered.name}: {kind} {name}: no CRD for {group}/{version} in the CRD folder")
            continue
        for error in jsonschema.Draft7Validator(schema).iter_errors(doc):
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            problems.append(f"{rendered.name}: {kind} {name}: {where}: {error.message}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rendered", nargs="+", type=Path)
    parser.add_argument("--crds", type=Path, default=Path(__file__).resolve().parents[1] / "deploy/k8s/crds")
    args = parser.parse_args()
    schemas = load_crds(args.crds)
    problems = [p for path in args.rendered for p in check(path, schemas)]
    for problem in problems:
        print(problem)
    if problems:
        sys.exit(1)
    print(f"custom resources valid against {len(schemas)} CRD schemas")


if __name__ == "__main__":
    main()
