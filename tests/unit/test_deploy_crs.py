"""The inference-pool overlay's custom resources against the real CRD schemas (deploy/k8s/crds), and the
validator catching what is wrong (make deploy-check runs it on every rendered overlay)."""

from __future__ import annotations

from pathlib import Path

import yaml

from tools.validate_crs import check, load_crds

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "deploy/k8s/overlays/inference-pool"


def test_inference_pool_overlay_resources_match_their_crds():
    schemas = load_crds(ROOT / "deploy/k8s/crds")
    assert ("inference.networking.k8s.io", "v1", "InferencePool") in schemas
    for name in ("inferencepool.yaml", "httproute.yaml", "objectives.yaml"):
        assert check(OVERLAY / name, schemas) == [], name


def test_a_wrong_custom_resource_is_refused(tmp_path):
    schemas = load_crds(ROOT / "deploy/k8s/crds")
    pool = yaml.safe_load((OVERLAY / "inferencepool.yaml").read_text())
    pool["spec"]["targetPorts"] = [{"number": "eight thousand"}]
    del pool["spec"]["selector"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(pool) + "---\napiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n")
    problems = check(bad, schemas)
    assert any("targetPorts/0/number" in p for p in problems), problems
    assert any("'selector' is a required property" in p for p in problems), problems
    assert any("Widget w: no CRD" in p for p in problems), problems
