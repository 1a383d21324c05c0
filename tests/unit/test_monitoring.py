"""deploy/monitoring: rules pass promtool's checks and unit tests; every dashboard query parses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (.ci/run installs Debian's prometheus)")


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=60)


@needs_promtool
def test_rules_check_and_unit_tests():
    checked = promtool("check", "rules", "rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "rules_test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_alerts_cover_what_operators_need():
    rules = yaml.safe_load((MONITORING / "rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"VloraHighTTFT", "VloraHighErrorRatio", "VloraQueueGrowing", "VloraAdapterLoadFailures"} <= alerts


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return queries


def _as_promql(query: str) -> str:
    """Grafana's variables replaced by values Prometheus accepts (what Grafana sends at query time)."""
    query = query.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$adapter", ".*")
    match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
    return match.group(1) if match else query


@needs_promtool
def test_every_dashboard_query_parses(tmp_path):
    queries = _dashboard_queries()
    assert len(queries) >= 10 and all("vlora_" in q for q in queries)
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": _as_promql(q)} for i, q in enumerate(queries)]}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboard_metric_names_exist_in_the_service():
    source = (Path(__file__).resolve().parents[2] / "service" / "metrics.py").read_text()
    exported = set(re.findall(r'"(vlora_[a-z_]+)"', source))
    for query in _dashboard_queries():
        for name in re.findall(r"(?<![:\w])vlora_[a-z_]+", query):  # not recording-rule names
            base = re.sub(r"_(total|bucket|count|sum)$", "", name)
            assert base in exported, name
